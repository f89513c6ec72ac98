"""Files: save and load trees of arrays without pickle; read tensor files safely.

[`save`][] writes a ``.npz`` that any NumPy can open: one ``.npy`` member per array leaf,
named after its key path (``output.logits``), plus a member ``__tonumpy__`` holding the tree's
structure as JSON (containers, keys and their order, plain Python leaves, class names for
display). [`load`][] rebuilds the tree from it, and also reads plain NumPy ``.npz``/``.npy``
files, directories of ``.npy`` files, ``.safetensors`` files, Hugging Face checkpoint
directories and ``torch.save`` files.

Every file is treated as hostile. Nothing is unpickled unless asked with ``unsafe_load=True``
(``torch.save`` files are read with ``torch.load(weights_only=True)``, memory-mapped, after a dry
run of their pickle); nothing is allocated from a size a file declares without the data to back
it; anything that is not a regular file is refused before it is opened; inside a directory,
symbolic links are refused. See ``docs/cli.md`` for the guarantees and their limits.

Every write is atomic: the data goes to a temporary file (or directory) next to the destination,
which is renamed into place only when complete; a failure leaves nothing behind. New files get
the mode ``cp`` would give them (``0666 & ~umask``), replaced ones keep theirs.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import _options, _tree
from .._format import _arrays, _structure
from .._format._arrays import LazyArray, nbytes, value_chunks
from .._format._fs import atomic_dir, atomic_file, check_not_nested, escape, exists_error, short
from .._format._names import STRUCTURE, is_safe_name
from .._format._structure import Node
from .._rowfiles import _parquet
from .._rowfiles._shards import SHARD
from ..convert import to_numpy
from ..errors import FileFormatError, OptionError, UnsafeFileError, UnsupportedLeafError
from . import _safetensors, _torchsave
from ._readers import FORMATS, Contents, is_stored_leaf, materialise, read_file

__all__ = [
    "Contents",
    "FileFormatError",
    "LazyArray",
    "Node",
    "UnsafeFileError",
    "convert",
    "escape",
    "load",
    "nbytes",
    "read",
    "save",
    "short",
    "value_chunks",
    "walk",
]

PathLike = str | os.PathLike[str]
Progress = Callable[[int, int], None]


# ------------------------------------------------------------------------------- public API


def save(
    file: PathLike,
    tree: Any,
    /,
    *,
    ml_dtypes: bool = False,
    overwrite: bool = True,
    compress: bool = False,
    plain_containers: bool = False,
    is_leaf: Callable[[Any], bool] | None = None,
) -> None:
    """Write ``tree`` to a file whose kind follows its name: every array leaf, and the structure.

    ``save`` walks the tree as [`tonumpy.to_numpy`][] does, and converts tensors as it does:
    every container ``to_numpy`` knows (a type registered with optree in the ``"tonumpy"``
    namespace included) keeps its keys and key order; lists and deques are stored as lists,
    tuples as tuples, mappings, namedtuples, dataclasses, ``ModelOutput`` and other classes as
    mappings of their keys, fields and attributes, with their class name recorded for display.
    ``str``, ``int``, ``float``, ``bool``, ``None``, ``bytes`` and ``complex`` leaves are
    stored in the JSON. A tensor at several places in the tree is stored once. A
    ``BatchEncoding`` is stored as its items: its tokenizer's ``Encoding`` objects are tokenizer
    state, which no file holds. At most 250 levels of containers are stored.

    The kind of file follows the name, by the one rule [`convert`][] follows (its docstring
    and ``docs/cli.md`` describe each format): ``.npz`` (the structured format, the usual
    one), ``.safetensors`` (each tensor named by its exact key path, dotted: a state dict
    keeps its keys), ``.pt``, ``.pth``, ``.bin`` and ``.ckpt`` (a ``torch.save`` file that
    ``torch.load(weights_only=True)`` reads), ``.npy`` (a tree that is a single array),
    ``.parquet`` (one row per example, a column per array leaf whose first dimension is the
    number of rows, everything else in the file's metadata; it needs ``pyarrow``, the
    ``parquet`` extra), and a name without a suffix, or ending in ``/``, for a directory of
    ``.npy`` files. Any other suffix is refused. ``save(file, tree)`` writes what
    ``convert`` would write to ``file`` from ``save("tree.npz", tree, ml_dtypes=True)``,
    except that ``ml_dtypes`` and ``compress`` apply as described below.

    Examples:
        >>> import os, tempfile, torch
        >>> folder = tempfile.mkdtemp()
        >>> path = os.path.join(folder, "out.npz")
        >>> save(path, {"logits": torch.ones(2, requires_grad=True), "step": 3})
        >>> load(path)
        {'logits': array([1., 1.], dtype=float32), 'step': 3}

        A state dict keeps its keys and dtypes in ``.safetensors`` and ``.pt`` files:

        >>> from safetensors import safe_open
        >>> state = {"layer.weight": torch.eye(2, dtype=torch.bfloat16), "layer.b": torch.ones(2)}
        >>> save(os.path.join(folder, "model.safetensors"), state)
        >>> with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
        ...     sorted(f.keys()), f.get_tensor("layer.weight").dtype
        (['layer.b', 'layer.weight'], torch.bfloat16)
        >>> save(os.path.join(folder, "model.pt"), state)
        >>> back = torch.load(os.path.join(folder, "model.pt"), weights_only=True)
        >>> back.keys(), back["layer.weight"].dtype
        (dict_keys(['layer.weight', 'layer.b']), torch.bfloat16)

    Args:
        file: Where to write. Written atomically; a new file gets the mode ``0666 & ~umask``,
            a replaced one keeps its mode (as ``cp`` does). A directory replaces only an empty
            directory or a previous ``.npy`` export.
        tree: A tensor, an array, or any nesting of containers holding them.
        ml_dtypes: For ``.npz``, ``.npy``, directory and ``.parquet`` output: store bfloat16
            and float8 tensors bit-exact (their bits, with the dtype name in the JSON;
            [`load`][] with ``ml_dtypes=True`` gives them back as ``ml_dtypes`` arrays)
            instead of widened to float32. ``ml_dtypes`` arrays in the tree are always stored
            bit-exact; ``.safetensors`` and ``torch.save`` output always keeps those dtypes.
        overwrite: Replace an existing file (atomically). ``False`` raises
            ``FileExistsError`` instead.
        compress: Deflate each member of a ``.npz``, as ``numpy.savez_compressed`` does, or
            compress the columns of a ``.parquet`` file with zstd. Other kinds store their
            data uncompressed: ``compress=True`` is refused for them.
        plain_containers: For ``torch.save`` output: write a container of another class (a
            namedtuple, a dataclass, a ``ModelOutput``) as a dict. Without it such a
            container is refused, naming its key path: ``torch.load(weights_only=True)``
            cannot rebuild those classes. An ``OrderedDict`` is always written as one.
            Refused for other kinds.
        is_leaf: Called on each node, as by [`tonumpy.to_numpy`][]; a node it returns True for
            is a leaf: stored as an array if it is one, in the JSON if it is a plain value
            (a tuple of numbers, say), refused otherwise.

    Raises:
        FileExistsError: ``file`` exists and ``overwrite=False``.
        FileFormatError: ``file`` has a suffix tonumpy does not write, or the tree does not
            fit the kind (a ``.npy`` file holds one array).
        ConversionError: A leaf cannot be stored without pickle (an object array, an
            arbitrary object), or in the kind of ``file`` (complex128 in ``.safetensors``, a
            dataclass in a ``torch.save`` file, say), or the tree has a cycle or is too deep;
            the message names where.
        UnsupportedLeafError: A tensor cannot be converted (a meta tensor, say), or an object
            tonumpy cannot rebuild holds one; the message names where.
        OptionError: ``ml_dtypes``, ``overwrite``, ``compress`` or ``plain_containers`` is not
            exactly True/False, or ``compress``/``plain_containers`` is True for a kind of
            file that does not use it.
        OSError: The file cannot be written (a full disk, say); the message names ``file``.
    """
    _options.check_flags(
        "save",
        ml_dtypes=ml_dtypes,
        overwrite=overwrite,
        compress=compress,
        plain_containers=plain_containers,
    )
    text = os.fspath(file)
    format = _output_format(text, "save", compress=compress, plain_containers=plain_containers)
    _write(
        Path(text),
        format,
        tree,
        None,
        is_leaf=is_leaf,
        ml_dtypes=ml_dtypes,
        compress=compress,
        overwrite=overwrite,
        plain_containers=plain_containers,
        progress=None,
    )


def load(file: PathLike, /, *, ml_dtypes: bool = False, unsafe_load: bool = False) -> Any:
    """Read a file into a tree of NumPy arrays, without unpickling anything by default.

    Reads what [`save`][] writes (``.npz`` and ``.parquet``), plain NumPy ``.npz`` and ``.npy``
    files, directories of ``.npy`` files, ``.safetensors`` files, Parquet files, Hugging Face
    checkpoint directories (what ``save_pretrained`` writes: ``model.safetensors``, or shards
    joined through their index) and ``torch.save`` files (``.pt``, ``.pth``, ``.bin``,
    ``.ckpt``). ``dict``, ``list``, ``tuple``, ``None``, ``str``, ``int``, ``float`` and ``bool``
    come back exactly; every other container comes back as a ``dict``.

    Examples:
        >>> import os, tempfile, numpy as np
        >>> path = os.path.join(tempfile.mkdtemp(), "plain.npz")
        >>> np.savez(path, a=np.arange(3), b=np.ones(2))
        >>> load(path)
        {'a': array([0, 1, 2]), 'b': array([1., 1.])}

    Args:
        file: The file (or directory) to read.
        ml_dtypes: Return bfloat16 and float8 data as ``ml_dtypes`` arrays, bit-exact,
            instead of widened to float32.
        unsafe_load: For ``torch.save`` files only: unpickle with ``weights_only=False``,
            which RUNS any code the file names. Only for files you trust.

    Returns:
        The tree, with NumPy arrays as leaves.

    Raises:
        FileNotFoundError: ``file`` does not exist.
        FileFormatError: The file is not a regular file, is truncated, corrupt, or of an
            unknown kind, or tonumpy wrote it and it holds an array its structure does not
            list (one added later: it would be hidden), which the message names.
        UnsafeFileError: A ``torch.save`` file names code that would run on loading, or would
            allocate more than it holds.
        OptionError: ``ml_dtypes`` or ``unsafe_load`` is not exactly True/False.
    """
    _options.check_flags("load", ml_dtypes=ml_dtypes, unsafe_load=unsafe_load)
    contents = read(file, unsafe_load=unsafe_load)
    try:
        return to_numpy(contents.tree, ml_dtypes=ml_dtypes)
    except UnsupportedLeafError as exc:
        leaf = _leaf_at(contents.tree, exc.path)
        if isinstance(leaf, torch.Tensor) and leaf.is_meta and exc.path is not None:
            place = _tree.place(_tree.flatten(contents.tree)[1], exc.path)
            raise _structure.meta_error(Path(file), exc.path, place, leaf) from None
        raise


def read(file: PathLike, /, *, unsafe_load: bool = False, lazy: bool = False) -> Contents:
    """Read a file as it is stored, for inspection: tensors stay tensors.

    Examples:
        >>> import os, tempfile, torch
        >>> path = os.path.join(tempfile.mkdtemp(), "x.pt")
        >>> torch.save({"w": torch.zeros(2, dtype=torch.bfloat16)}, path)
        >>> contents = read(path)
        >>> contents.format, contents.tree["w"].dtype
        ('torch', torch.bfloat16)

        With ``lazy=True``, the members of a ``.npz`` stay in the file:

        >>> import numpy as np
        >>> path = os.path.join(tempfile.mkdtemp(), "a.npz")
        >>> np.savez(path, w=np.ones((2, 3)))
        >>> member = read(path, lazy=True).tree["w"]
        >>> isinstance(member, LazyArray), member.shape, member.dtype
        (True, (2, 3), dtype('float64'))

    Args:
        file: The file (or directory) to read.
        unsafe_load: As for [`load`][].
        lazy: Read headers only, to look inside files larger than memory (what ``tonumpy
            show`` does): the members of a ``.npz`` (and of a ``.parquet`` file tonumpy
            wrote) are [`LazyArray`][] leaves, read when asked, and no checksum is verified
            yet: where ``Contents.verify`` is not None, call it on a leaf before using the
            leaf's data.

    Returns:
        A [`Contents`][]. Arrays of ``.npy`` files, stored ``.safetensors`` tensors and the
        tensors of zip ``torch.save`` files are memory-mapped (copy-on-write) and, unless
        ``lazy``, checked: the CRC-32 of every ``torch.save`` record and ``.npz`` member is
        verified.

    Raises:
        FileNotFoundError: ``file`` does not exist.
        FileFormatError: The file is not a regular file, is truncated, corrupt, or of an
            unknown kind, or tonumpy wrote it and it holds an array its structure does not
            list (one added later: it would be hidden), which the message names.
        UnsafeFileError: As for [`load`][].
        OptionError: ``unsafe_load`` or ``lazy`` is not exactly True/False.
    """
    _options.check_flags("read", unsafe_load=unsafe_load, lazy=lazy)
    contents = read_file(Path(file), unsafe_load=unsafe_load, lazy=lazy)
    verify = contents.verify
    if verify is not None and not lazy:
        leaves, _ = _tree.flatten(contents.tree, is_leaf=is_stored_leaf)
        for leaf in leaves:
            verify(leaf)
    return contents


def walk(tree: Any, /) -> tuple[list[Any], list[Node]]:
    """The leaves of a tree as [`save`][] stores them, and every node, parents first.

    The tree is walked as [`save`][] and [`convert`][] walk it: a [`LazyArray`][] is a leaf,
    and every container ``to_numpy`` knows is one node (a dataclass that ``unsafe_load=True``
    brought back, say). Each [`Node`][] gives the range of its leaves in the list, so that
    whatever is summed over leaves can be summed over any container.

    Examples:
        >>> leaves, nodes = walk({"b": (1, None), "a": [2]})
        >>> leaves  # in the walker's order (sorted keys); None is a node, not a leaf
        [2, 1]
        >>> [(node.path, node.kind, node.first, node.size) for node in nodes][:3]
        [((), 'dict', 0, 2), (('b',), 'tuple', 1, 1), (('b', 0), 'leaf', 1, 1)]

    Raises:
        ConversionError: The tree contains a cycle or is too deep (the message names where).
        UnsupportedLeafError: A leaf tonumpy cannot rebuild holds a tensor.
    """
    walked = _structure.walk(tree, is_leaf=_arrays.is_lazy)
    return walked.leaves, walked.nodes


def convert(
    src: PathLike,
    dst: PathLike,
    /,
    *,
    overwrite: bool = False,
    ml_dtypes: bool = False,
    unsafe_load: bool = False,
    plain_containers: bool = False,
    progress: Progress | None = None,
) -> Contents:
    """Read ``src`` (any kind [`load`][] reads) and write it to ``dst``, atomically.

    The kind of ``dst`` follows its name: ``.npz`` (the structured format of [`save`][]),
    ``.safetensors`` (each tensor named by its exact key path, dotted: a state dict keeps its
    keys; a tensor at several places is written at each; bfloat16/float8 stay exact, other
    leaves go into the header metadata, the ``__metadata__`` of a ``.safetensors`` source is
    kept, ``"format": "pt"`` added where it has none), ``.npy`` (a single array),
    ``.pt``, ``.pth``, ``.bin`` or ``.ckpt`` (the names tonumpy, PyTorch and Hugging Face read
    as ``torch.save`` files: one that ``torch.load(weights_only=True)`` reads, tensors of the
    source's exact dtypes, bfloat16 included, in dicts, lists and tuples),
    ``.parquet`` (one row per example, as [`save`][] writes it), or
    a name without a suffix, or ending in ``/``, for a directory of ``.npy`` files, one per
    leaf, named after sanitised key paths, with the structure in ``__tonumpy__.json``.

    Data is streamed: members of a ``.npz`` source are copied a chunk at a time (memory does
    not grow with their size, except for a ``.safetensors`` or ``.npy`` destination of a
    Fortran-ordered member), other sources are memory-mapped.

    Examples:
        >>> import os, tempfile, torch
        >>> folder = tempfile.mkdtemp()
        >>> src, dst = os.path.join(folder, "a.pt"), os.path.join(folder, "arrays")
        >>> torch.save({"layer.weight": torch.eye(2), "../evil": torch.ones(1)}, src)
        >>> _ = convert(src, dst)
        >>> sorted(os.listdir(dst))
        ['__tonumpy__.json', 'evil.npy', 'layer.weight.npy']

    Args:
        src: The file (or directory) to read.
        dst: The file or directory to write; never the source, a directory holding it, or a
            path inside it.
        overwrite: Replace an existing ``dst``. A directory is only ever replaced if it is
            empty or holds a previous ``.npy`` export and nothing else.
        ml_dtypes: Keep bfloat16/float8 bit-exact in ``.npz`` and ``.npy`` output (see
            [`save`][]); otherwise they are widened to float32. ``.safetensors`` and ``.pt``
            output always keeps them exact.
        unsafe_load: As for [`load`][].
        plain_containers: For ``torch.save`` output: write a container that was another
            class in the source (a namedtuple, a dataclass, a ``ModelOutput``, whose name the
            source records) as a dict. Without it such a container is refused, naming its key
            path: ``torch.load(weights_only=True)`` cannot rebuild those classes. An
            ``OrderedDict`` is always written as one. Refused for other kinds of ``dst``.
        progress: Called as ``progress(bytes_done, bytes_total)`` while writing.

    Returns:
        The [`Contents`][] that were read from ``src``. Leaves of a ``.npz`` source are
        described (shape, dtype), not read into memory.

    Raises:
        FileExistsError: ``dst`` exists and ``overwrite`` is False.
        FileFormatError: ``src`` cannot be read (a file tonumpy wrote that holds an array
            its structure does not list included), or ``dst`` names an unsupported kind or
            the source itself.
        UnsafeFileError: As for [`load`][].
        ConversionError: A leaf cannot be written in ``dst``'s format (complex128 to
            ``.safetensors``, say, or two leaves whose key paths give one tensor name); the
            message names it and the formats that can.
        OptionError: ``overwrite``, ``ml_dtypes``, ``unsafe_load`` or ``plain_containers`` is
            not exactly True/False, or ``plain_containers`` is True for a ``dst`` that is not
            a ``torch.save`` file.
        OSError: ``dst`` cannot be written (a full disk, say); the message names ``dst``.
    """
    _options.check_flags(
        "convert",
        overwrite=overwrite,
        ml_dtypes=ml_dtypes,
        unsafe_load=unsafe_load,
        plain_containers=plain_containers,
    )
    src_path, dst_text = Path(src), os.fspath(dst)
    dst_path = Path(dst_text)
    # before reading: a bad DST fails fast
    format = _output_format(dst_text, "convert", compress=False, plain_containers=plain_containers)
    if os.path.lexists(dst_path) and not overwrite:
        raise exists_error(dst_path)
    if os.path.lexists(src_path):
        check_not_nested(src_path, dst_path)
    contents = read_file(src_path, unsafe_load=unsafe_load, lazy=True)
    _write(
        dst_path,
        format,
        contents.tree,
        (src_path, contents),
        is_leaf=None,
        ml_dtypes=ml_dtypes,
        compress=False,
        overwrite=overwrite,
        plain_containers=plain_containers,
        progress=progress,
    )
    return contents


def _leaf_at(tree: Any, path: tuple[Any, ...] | None) -> Any:
    for key in path or ():
        try:
            tree = tree[key]
        except (KeyError, IndexError, TypeError):
            return None
    return tree


# ------------------------------------------------------------------------ file formats


def _output_format(dst: str, caller: str, *, compress: bool, plain_containers: bool) -> str:
    """The format to write ``dst`` in (a format of [`FORMATS`][], or ``dir``), options checked.

    ``caller`` is the function asked (``save``, ``convert``), for errors about its options.
    """
    name = os.path.basename(dst)
    if dst == "-":
        raise FileFormatError(
            "-: tonumpy does not write to standard output; name the file to write (out.npz)"
        )
    in_dir = dst.endswith(("/", os.sep))
    suffix = "" if in_dir else Path(dst).suffix.lower()
    if not in_dir and name.lower() in FORMATS:
        raise FileFormatError(
            f"{dst}: a name that is only a suffix; name the file (out{name}, say)"
        )
    if not in_dir and name.endswith("."):
        raise FileFormatError(
            f"{dst}: a name ending in '.'; did you mean {dst.rstrip('.')}? (a directory of "
            ".npy files is named without a suffix)"
        )
    format = FORMATS.get(suffix, "dir" if suffix == "" else "")
    if not format:
        raise FileFormatError(
            f"{dst}: cannot write {short(suffix)} files; the destination must end in .npz, .npy, "
            ".safetensors, .parquet, or .pt, .pth, .bin or .ckpt (a torch.save file), or have no "
            "suffix (or end in /) for a directory of .npy files"
        )
    what = f"{suffix} file" if suffix else "directory of .npy files"
    if compress and format not in ("npz", "parquet"):
        raise OptionError(
            f"{caller}(compress=True): a {what} stores its data uncompressed; only .npz and "
            ".parquet files are compressed: pass compress=False, or write one of those"
        )
    if plain_containers and format != "torch":
        raise OptionError.naming(
            f"{caller}(",
            "plain_containers",
            f"): a {what} records the class of every container; only torch.save files (.pt, "
            ".pth, .bin, .ckpt) need plain containers: leave it out",
        )
    return format


# --------------------------------------------------------------------------- writers


def _write(
    dst: Path,
    format: str,
    tree: Any,
    read_from: tuple[Path, Contents] | None,
    *,
    is_leaf: Callable[[Any], bool] | None,
    ml_dtypes: bool,
    compress: bool,
    overwrite: bool,
    plain_containers: bool,
    progress: Progress | None,
) -> None:
    """Write ``tree`` to ``dst`` as a file of ``kind``: what [`save`][] and [`convert`][] share.

    ``read_from`` is the file the tree was read from and what its reader recorded (classes,
    sources, metadata, checksums), or None for a tree in memory (walked with ``is_leaf``).
    """
    contents = read_from[1] if read_from is not None else None
    if format == "parquet":
        _parquet.write(
            dst,
            tree if contents is None else materialise(tree),
            overwrite=overwrite,
            compress=compress,
            ml_dtypes=ml_dtypes,
            is_leaf=is_leaf if contents is None else is_stored_leaf,
            caller="save" if contents is None else "convert",
            progress=progress,
        )
        return
    if format == "torch":
        if contents is None:
            tree, classes, verify = *_plain(tree, is_leaf), None
        else:
            classes, verify = contents.classes, contents.verify
        _torchsave.write(
            dst,
            tree,
            classes,
            overwrite=overwrite,
            plain_containers=plain_containers,
            verify=verify,
            progress=progress,
        )
        return
    layout = _structure.layout(
        tree,
        ml_dtypes=ml_dtypes or format == "safetensors",
        is_leaf=is_leaf if contents is None else _arrays.is_lazy,
        classes=None if contents is None else contents.classes,
        sources=None if contents is None else contents.sources,
        once=format != "safetensors",  # it names every place: a tensor at two has two copies
    )
    if read_from is not None:
        layout.source_file, layout.verify = read_from[0], read_from[1].verify
    if format == "safetensors":
        # "format": "pt", as save_pretrained writes it; a source's own metadata is kept
        metadata = {"format": "pt", **(contents.metadata if contents is not None else {})}
        _write_safetensors(dst, layout, metadata, overwrite=overwrite, progress=progress)
    elif format == "npz":
        _write_npz(dst, layout, overwrite=overwrite, compress=compress, progress=progress)
    elif format == "npy":
        _write_npy(dst, layout, overwrite=overwrite)
    else:
        _write_npy_dir(dst, layout, overwrite=overwrite, progress=progress)


def _plain(tree: Any, is_leaf: Callable[[Any], bool] | None) -> tuple[Any, dict[Any, str]]:
    """A tree in memory as a reader gives it: plain containers, array leaves, class names.

    The containers are those the ``.npz`` of the tree holds (its JSON structure, decoded), the
    leaves its converted arrays (bfloat16/float8 tensors as tensors of their dtype), each
    converted once: a tensor at several places stays one.
    """
    layout = _structure.layout(tree, ml_dtypes=True, is_leaf=is_leaf)
    arrays: dict[int, Any] = {}

    def get_array(index: int, _dtype: str | None) -> Any:
        if index not in arrays:
            array, bits = layout.array(index)
            arrays[index] = array if bits is None else _arrays.from_bits(array, bits)
        return arrays[index]

    classes: dict[tuple[Any, ...], str] = {}
    stored = json.loads(layout.structure_bytes())["tree"]  # as stored: keys, values, plain
    plain = _structure.decode_tree(stored, get_array, classes, {})
    return plain, classes


def _write_npz(
    dst: Path,
    layout: _structure.Layout,
    *,
    overwrite: bool,
    compress: bool,
    progress: Progress | None,
) -> None:
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    total, done = layout.nbytes, 0
    with (
        atomic_file(dst, overwrite=overwrite) as tmp,
        zipfile.ZipFile(tmp, "w", compression=method, allowZip64=True) as zf,
    ):
        for index, name in enumerate(layout.names):
            with zf.open(f"{name}.npy", "w", force_zip64=True) as member:
                layout.write(index, member)
            done += _arrays.nbytes(layout.leaves[index])
            if progress is not None:
                progress(done, total)
        structure = np.frombuffer(layout.structure_bytes(), dtype=np.uint8)
        with zf.open(f"{STRUCTURE}.npy", "w") as member:
            _arrays.write_array(member, structure)


def _write_npy(dst: Path, layout: _structure.Layout, *, overwrite: bool) -> None:
    if len(layout.leaves) != 1 or layout.structure["tree"].get("t") != "array":
        raise FileFormatError(
            f"{dst}: a .npy file holds one array, and this file holds a tree of "
            f"{len(layout.leaves)} arrays; write a .npz file or a directory instead"
        )
    with atomic_file(dst, overwrite=overwrite) as tmp, tmp.open("wb") as f:
        layout.write(0, f)


def _is_replaceable_dir(path: Path) -> bool:
    """True for an empty directory or one holding a previous export and nothing else.

    An export: the structure, ``.npy`` files, and an ``Accumulator``'s ``__shard__.json``.
    """
    entries = list(path.iterdir())
    if not entries:
        return True
    names = {e.name for e in entries}
    ours = (f"{STRUCTURE}.json", f"{SHARD}.json")
    return f"{STRUCTURE}.json" in names and all(
        e.is_file() and not e.is_symlink() and (e.suffix == ".npy" or e.name in ours)
        for e in entries
    )


def _write_npy_dir(
    dst: Path, layout: _structure.Layout, *, overwrite: bool, progress: Progress | None
) -> None:
    with atomic_dir(dst, overwrite=overwrite, replaceable=_is_replaceable_dir) as tmp:
        total, done = layout.nbytes, 0
        for index, name in enumerate(layout.names):
            target = tmp / f"{name}.npy"
            if target.parent != tmp or not is_safe_name(name):  # pragma: no cover
                raise FileFormatError(f"unsafe file name {name!r}")
            with target.open("xb") as f:
                layout.write(index, f)
            done += _arrays.nbytes(layout.leaves[index])
            if progress is not None:
                progress(done, total)
        (tmp / f"{STRUCTURE}.json").write_bytes(layout.structure_bytes())


def _write_safetensors(
    dst: Path,
    layout: _structure.Layout,
    metadata: dict[str, str],
    *,
    overwrite: bool,
    progress: Progress | None,
) -> None:
    total = layout.nbytes
    done = [0]

    def step(index: int) -> None:
        done[0] += _arrays.nbytes(layout.leaves[index])
        if progress is not None:
            progress(done[0], total)

    with atomic_file(dst, overwrite=overwrite) as tmp, tmp.open("wb") as f:
        _safetensors.write(f, layout, metadata, step)
