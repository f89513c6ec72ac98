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

import contextlib
import dataclasses
import os
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import _arrays, _checkpoint, _npyzip, _safetensors, _structure, _torchfile
from ._fs import (
    FileFormatError,
    UnsafeFileError,
    atomic_dir,
    atomic_file,
    check_input,
    check_not_nested,
    one_line,
    open_entry,
    open_regular,
    short,
)
from ._structure import STRUCTURE
from .convert import to_numpy
from .errors import TonumpyError, UnsupportedLeafError

__all__ = [
    "Contents",
    "FileFormatError",
    "UnsafeFileError",
    "convert",
    "load",
    "read",
    "save",
]

PathLike = str | os.PathLike[str]
Progress = Callable[[int, int], None]

_TORCH_SUFFIXES = frozenset({".pt", ".pth", ".bin", ".ckpt"})
_OUTPUT_SUFFIXES = (".npz", ".npy", ".safetensors")


@dataclasses.dataclass
class Contents:
    """What [`read`][] found in a file, before any conversion.

    Attributes:
        tree: Containers (``dict``, ``list``, ``tuple``) of leaves: torch tensors for ``torch``
            and ``safetensors`` files and for bfloat16/float8 data stored bit-exact, NumPy
            arrays otherwise, and plain Python values.
        format: A short description: ``"torch"``, ``"tonumpy npz"``, ``"npz"``, ``"npy"``,
            ``"npy directory"``, ``"tonumpy npy directory"``, ``"safetensors"`` or
            ``"hugging face checkpoint"`` (a ``save_pretrained`` directory).
        classes: Key path -> name of the class a container had when saved (display only).
        sources: Key path -> what a leaf was before it was saved (``dtype``, ``device``,
            ``requires_grad``), where the file records it.
        metadata: The ``__metadata__`` strings of a ``.safetensors`` source (such as
            ``{"format": "pt"}``), kept when it is converted to ``.safetensors``.
    """

    tree: Any
    format: str
    classes: dict[tuple[Any, ...], str] = dataclasses.field(default_factory=dict)
    sources: dict[tuple[Any, ...], dict[str, Any]] = dataclasses.field(default_factory=dict)
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)
    # checks a leaf's stored checksums before its data is used (torch.save files)
    _verify: Callable[[Any], None] | None = dataclasses.field(
        default=None, init=False, repr=False, compare=False
    )


# ------------------------------------------------------------------------------- public API


def save(
    file: PathLike,
    tree: Any,
    /,
    *,
    ml_dtypes: bool = False,
    overwrite: bool = True,
    compress: bool = False,
) -> None:
    """Write ``tree`` to a ``.npz`` file: every array leaf, and the structure as JSON.

    Tensors are converted as by [`tonumpy.to_numpy`][]. Containers keep their keys and key
    order; namedtuples, dataclasses, ``ModelOutput`` and other classes are stored as mappings
    with their class name recorded for display. ``str``, ``int``, ``float``, ``bool``, ``None``,
    ``bytes`` and ``complex`` leaves are stored in the JSON.

    Examples:
        >>> import os, tempfile, torch
        >>> path = os.path.join(tempfile.mkdtemp(), "out.npz")
        >>> save(path, {"logits": torch.ones(2, requires_grad=True), "step": 3})
        >>> load(path)
        {'logits': array([1., 1.], dtype=float32), 'step': 3}

    Args:
        file: Where to write; ``.npz`` is the usual suffix. Written atomically; a new file
            gets the mode ``0666 & ~umask``, a replaced one keeps its mode (as ``cp`` does).
        tree: A tensor, an array, or any nesting of containers holding them.
        ml_dtypes: Store bfloat16 and float8 tensors bit-exact (their bits, with the dtype
            name in the JSON; [`load`][] with ``ml_dtypes=True`` gives them back as
            ``ml_dtypes`` arrays) instead of widened to float32. ``ml_dtypes`` arrays in the
            tree are always stored bit-exact.
        overwrite: Replace an existing file (atomically). ``False`` raises
            ``FileExistsError`` instead.
        compress: Deflate each member, as ``numpy.savez_compressed`` does.

    Raises:
        FileExistsError: ``file`` exists and ``overwrite=False``.
        ConversionError: A leaf cannot be stored without pickle (an object array, an
            arbitrary object); the message names its path.
        OSError: The file cannot be written (a full disk, say); the message names ``file``.
    """
    plan = _structure.plan(tree, ml_dtypes=ml_dtypes)
    _write_npz(Path(file), plan, overwrite=overwrite, compress=compress, progress=None)


def load(file: PathLike, /, *, ml_dtypes: bool = False, unsafe_load: bool = False) -> Any:
    """Read a file into a tree of NumPy arrays, without unpickling anything by default.

    Reads what [`save`][] writes, plain NumPy ``.npz`` and ``.npy`` files, directories of
    ``.npy`` files, ``.safetensors`` files, Hugging Face checkpoint directories (what
    ``save_pretrained`` writes: ``model.safetensors``, or shards joined through their index)
    and ``torch.save`` files (``.pt``, ``.pth``, ``.bin``, ``.ckpt``). ``dict``, ``list``,
    ``tuple``, ``None``, ``str``, ``int``, ``float`` and ``bool`` come back exactly; every other
    container comes back as a ``dict``.

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
            unknown kind.
        UnsafeFileError: A ``torch.save`` file names code that would run on loading, or would
            allocate more than it holds.
    """
    contents = read(file, unsafe_load=unsafe_load)
    try:
        return to_numpy(contents.tree, ml_dtypes=ml_dtypes)
    except UnsupportedLeafError as exc:
        leaf = _leaf_at(contents.tree, exc.path)
        if isinstance(leaf, torch.Tensor) and leaf.is_meta and exc.path is not None:
            raise _structure.meta_error(Path(file), exc.path, leaf) from None
        raise


def read(file: PathLike, /, *, unsafe_load: bool = False) -> Contents:
    """Read a file as it is stored, for inspection: tensors stay tensors.

    Examples:
        >>> import os, tempfile, torch
        >>> path = os.path.join(tempfile.mkdtemp(), "x.pt")
        >>> torch.save({"w": torch.zeros(2, dtype=torch.bfloat16)}, path)
        >>> contents = read(path)
        >>> contents.format, contents.tree["w"].dtype
        ('torch', torch.bfloat16)

    Args:
        file: The file (or directory) to read.
        unsafe_load: As for [`load`][].

    Returns:
        A [`Contents`][]. Arrays of ``.npy`` files, stored ``.safetensors`` tensors and the
        tensors of zip ``torch.save`` files are memory-mapped (copy-on-write) and checked:
        the CRC-32 of every ``torch.save`` record and ``.npz`` member is verified.

    Raises:
        FileNotFoundError: ``file`` does not exist.
        FileFormatError: The file is not a regular file, is truncated, corrupt, or of an
            unknown kind.
        UnsafeFileError: As for [`load`][].
    """
    contents = _read(Path(file), unsafe_load=unsafe_load, lazy=False)
    verify = contents._verify  # noqa: SLF001 - the readers' own field
    if verify is not None:
        for leaf in _structure.leaves(contents.tree):
            verify(leaf)
    return contents


def convert(
    src: PathLike,
    dst: PathLike,
    /,
    *,
    overwrite: bool = False,
    ml_dtypes: bool = False,
    unsafe_load: bool = False,
    progress: Progress | None = None,
) -> Contents:
    """Read ``src`` (any kind [`load`][] reads) and write it to ``dst``, atomically.

    The kind of ``dst`` follows its name: ``.npz`` (the structured format of [`save`][]),
    ``.safetensors`` (bfloat16/float8 stay exact, other leaves go into the header metadata,
    the ``__metadata__`` of a ``.safetensors`` source is kept), ``.npy`` (a single array), or
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
            [`save`][]); otherwise they are widened to float32.
        unsafe_load: As for [`load`][].
        progress: Called as ``progress(bytes_done, bytes_total)`` while writing.

    Returns:
        The [`Contents`][] that were read from ``src``. Leaves of a ``.npz`` source are
        described (shape, dtype), not read into memory.

    Raises:
        FileExistsError: ``dst`` exists and ``overwrite`` is False.
        FileFormatError: ``src`` cannot be read, or ``dst`` names an unsupported kind or
            the source itself.
        UnsafeFileError: As for [`load`][].
        ConversionError: A leaf cannot be written in ``dst``'s format (complex128 to
            ``.safetensors``, say); the message names it and the formats that can.
        OSError: ``dst`` cannot be written (a full disk, say); the message names ``dst``.
    """
    src_path, dst_text = Path(src), os.fspath(dst)
    dst_path = Path(dst_text)
    kind = _output_kind(dst_text)  # before reading: a bad DST fails fast
    if os.path.lexists(dst_path) and not overwrite:
        raise FileExistsError(f"{dst_path} exists; pass --force (overwrite=True) to replace it")
    if os.path.lexists(src_path):
        check_not_nested(src_path, dst_path)
    contents = _read(src_path, unsafe_load=unsafe_load, lazy=True)
    plan = _structure.plan(
        contents.tree,
        ml_dtypes=ml_dtypes or kind == "safetensors",
        classes=contents.classes,
        sources=contents.sources,
    )
    plan.source_file = src_path
    plan.verify = contents._verify  # noqa: SLF001 - the readers' own field
    if kind == "safetensors":
        _write_safetensors(
            dst_path, plan, contents.metadata, overwrite=overwrite, progress=progress
        )
    elif kind == "npz":
        _write_npz(dst_path, plan, overwrite=overwrite, compress=False, progress=progress)
    elif kind == "npy":
        _write_npy(dst_path, plan, overwrite=overwrite)
    else:
        _write_npy_dir(dst_path, plan, overwrite=overwrite, progress=progress)
    return contents


def _leaf_at(tree: Any, path: tuple[Any, ...] | None) -> Any:
    for key in path or ():
        try:
            tree = tree[key]
        except (KeyError, IndexError, TypeError):
            return None
    return tree


# ------------------------------------------------------------------------ kinds of file


def _output_kind(dst: str) -> str:
    name = os.path.basename(dst)
    if dst == "-":
        raise FileFormatError(
            "-: tonumpy does not write to standard output; name the file to write (out.npz)"
        )
    if dst.endswith(("/", os.sep)):
        return "dir"
    if name.lower() in _OUTPUT_SUFFIXES:
        raise FileFormatError(
            f"{dst}: a name that is only a suffix; name the file (out{name}, say)"
        )
    if name.endswith("."):
        raise FileFormatError(
            f"{dst}: a name ending in '.'; did you mean {dst.rstrip('.')}? (a directory of "
            ".npy files is named without a suffix)"
        )
    suffix = Path(dst).suffix.lower()
    if suffix in _OUTPUT_SUFFIXES:
        return suffix[1:]
    if suffix == "":
        return "dir"
    raise FileFormatError(
        f"{dst}: cannot write {short(suffix)} files; the destination must end in .npz, .npy or "
        ".safetensors, or have no suffix (or end in /) for a directory of .npy files"
    )


def _kind_of(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in _TORCH_SUFFIXES:
        return "torch"
    if suffix in _OUTPUT_SUFFIXES:
        return suffix[1:]
    kind = _sniff(path)
    if kind is None:
        raise FileFormatError(
            f"{path}: not a file tonumpy reads (.pt/.pth/.bin/.ckpt from torch.save, .npz, "
            ".npy, .safetensors, or a directory of .npy files or of a checkpoint)"
        )
    return kind


def _sniff(path: Path) -> str | None:
    """Guess a file's kind from its first bytes (for names without a known suffix)."""
    with open_regular(path) as f:
        head = f.read(16)
        if head.startswith(b"\x93NUMPY"):
            return "npy"
        if head.startswith(b"PK"):
            f.seek(0)
            with contextlib.suppress(Exception), zipfile.ZipFile(f) as zf:
                names = zf.namelist()
                if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
                    return "torch"
                if names and all(n.endswith(".npy") for n in names):
                    return "npz"
            return None
    if head[:1] == b"\x80":  # a pickle: the legacy torch.save format
        return "torch"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    return None


def _guard(path: Path, reader: Callable[[], Contents]) -> Contents:
    """Run a reader; turn what a corrupt file makes the parsers raise into a FileFormatError.

    MemoryError included: a corrupt size field can ask for a lot.
    """
    try:
        return reader()
    except (TonumpyError, FileNotFoundError, PermissionError, IsADirectoryError):
        raise
    except RecursionError:
        raise FileFormatError(f"{path}: the structure is nested too deeply to read") from None
    except Exception as exc:
        raise FileFormatError(f"{path}: cannot read it: {one_line(exc)}") from exc


# --------------------------------------------------------------------------- readers


def _read(path: Path, *, unsafe_load: bool, lazy: bool) -> Contents:
    """Read ``path``; with ``lazy``, ``.npz`` members stay unread (``LazyArray``)."""
    if check_input(path):
        return _guard(path, lambda: _read_dir(path, unsafe_load=unsafe_load, lazy=lazy))
    kind = _kind_of(path)
    if kind == "torch":
        return _guard(path, lambda: _read_torch(path, unsafe_load=unsafe_load))
    if kind == "npz":
        return _guard(path, lambda: _read_npz(path, lazy=lazy))
    if kind == "npy":
        return _guard(path, lambda: Contents(_npyzip.map_npy(path, str(path)), "npy"))
    return _guard(path, lambda: _read_safetensors(path))


def _read_torch(path: Path, *, unsafe_load: bool) -> Contents:
    tree, classes, sources, checksums = _torchfile.read_torch(path, unsafe_load=unsafe_load)
    contents = Contents(tree, "torch", classes, sources)
    contents._verify = checksums.verify if checksums is not None else None  # noqa: SLF001
    return contents


def _read_npz(path: Path, *, lazy: bool) -> Contents:
    archive = _npyzip.Archive(path)
    try:
        members: dict[str, _npyzip.Member] = {}
        for info in archive.infos:
            if not info.filename.endswith(".npy"):
                raise FileFormatError(
                    f"{path}: member {short(info.filename, 80)} is not a .npy array"
                )
            members[info.filename[:-4]] = archive.member(info)
        if STRUCTURE not in members:
            tree: Any = dict(members)
            contents = Contents(tree, "npz")
        else:
            raw = members.pop(STRUCTURE)
            if raw.dtype != np.uint8 or len(raw.shape) != 1:
                raise FileFormatError(f"{path}: the {STRUCTURE} member is not JSON bytes")

            def get_array(name: str, dtype: str | None) -> Any:
                if name not in members:
                    raise FileFormatError("the structure names an array that is missing")
                return members[name].with_bits(dtype)

            tree, classes, sources = _structure.decode(raw.array().tobytes(), str(path), get_array)
            contents = Contents(tree, "tonumpy npz", classes, sources)
        if not lazy:
            contents.tree = _materialise(contents.tree)
    finally:
        if not lazy:
            archive.close()
    return contents


def _materialise(tree: Any) -> Any:
    """The tree with every lazy member read (each member once, however often it appears)."""
    done: dict[int, Any] = {}

    def walk(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, list):
            return [walk(v) for v in x]
        if isinstance(x, tuple):
            return tuple(walk(v) for v in x)
        if isinstance(x, _arrays.LazyArray):
            if id(x) not in done:
                array = x.array()
                done[id(x)] = _arrays.from_bits(array, x.bits) if x.bits else array
            return done[id(x)]
        return x

    return walk(tree)


def _read_safetensors(path: Path) -> Contents:
    tensors, metadata = _safetensors.read(path)
    raw = metadata.pop(STRUCTURE, None)
    if raw is None:
        return Contents(tensors, "safetensors", metadata=metadata)

    def get_array(name: str, dtype: str | None) -> Any:
        if name not in tensors:
            raise FileFormatError("the structure names a tensor that is missing")
        return tensors[name]

    tree, classes, sources = _structure.decode(raw.encode("utf-8"), str(path), get_array)
    return Contents(tree, "safetensors", classes, sources, metadata)


def _read_dir(path: Path, *, unsafe_load: bool, lazy: bool) -> Contents:
    names = sorted(entry.name for entry in path.iterdir())
    if f"{STRUCTURE}.json" in names:
        return _read_export(path)
    if _checkpoint.is_checkpoint(names):

        def read_shard(shard: Path) -> tuple[Any, Callable[[Any], None] | None]:
            shard_contents = _read_torch(shard, unsafe_load=unsafe_load)
            return shard_contents.tree, shard_contents._verify  # noqa: SLF001

        tree, metadata, verify = _checkpoint.read(path, names, read_shard)
        contents = Contents(tree, "hugging face checkpoint", metadata=metadata)
        contents._verify = verify  # noqa: SLF001 - the readers' own field
        return contents
    arrays = [n for n in names if n.endswith(".npy")]
    if not arrays:
        raise FileFormatError(
            f"{path}: a directory without .npy files, a tonumpy export or a checkpoint "
            "(model.safetensors, shards with their index, or pytorch_model.bin)"
        )
    tree = {}
    for name in arrays:
        with open_entry(path, name) as f:
            tree[name[:-4]] = _npyzip.map_npy(path / name, str(path / name), f)
    return Contents(tree, "npy directory")


def _read_export(path: Path) -> Contents:
    """A directory that [`convert`][] wrote: ``.npy`` files and ``__tonumpy__.json``."""
    with open_entry(path, f"{STRUCTURE}.json") as f:
        raw = f.read()

    def get_array(name: str, dtype: str | None) -> Any:
        if not _structure.is_safe_name(name):  # never follow a name out of the directory
            raise FileFormatError(f"the structure names an unsafe file {short(name, 60)}")
        with open_entry(path, f"{name}.npy") as f:
            array = _npyzip.map_npy(path / f"{name}.npy", str(path / f"{name}.npy"), f)
        return _arrays.from_bits(array, dtype) if dtype else array

    tree, classes, sources = _structure.decode(raw, str(path), get_array)
    return Contents(tree, "tonumpy npy directory", classes, sources)


# --------------------------------------------------------------------------- writers


def _write_npz(
    dst: Path,
    plan: _structure.Plan,
    *,
    overwrite: bool,
    compress: bool,
    progress: Progress | None,
) -> None:
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    total, done = plan.nbytes, 0
    with (
        atomic_file(dst, overwrite=overwrite) as tmp,
        zipfile.ZipFile(tmp, "w", compression=method, allowZip64=True) as zf,
    ):
        for index, name in enumerate(plan.names):
            with zf.open(f"{name}.npy", "w", force_zip64=True) as member:
                plan.write(index, member)
            done += _arrays.nbytes(plan.leaves[index])
            if progress is not None:
                progress(done, total)
        structure = np.frombuffer(plan.structure_bytes(), dtype=np.uint8)
        with zf.open(f"{STRUCTURE}.npy", "w") as member:
            _arrays.write_array(member, structure)


def _write_npy(dst: Path, plan: _structure.Plan, *, overwrite: bool) -> None:
    if len(plan.leaves) != 1 or plan.structure["tree"].get("t") != "array":
        raise FileFormatError(
            f"{dst}: a .npy file holds one array, and this file holds a tree of "
            f"{len(plan.leaves)} arrays; write a .npz file or a directory instead"
        )
    with atomic_file(dst, overwrite=overwrite) as tmp, tmp.open("wb") as f:
        plan.write(0, f)


def _is_replaceable_dir(path: Path) -> bool:
    """True for an empty directory or one holding a previous export and nothing else."""
    entries = list(path.iterdir())
    if not entries:
        return True
    names = {e.name for e in entries}
    return f"{STRUCTURE}.json" in names and all(
        e.is_file() and not e.is_symlink() and (e.suffix == ".npy" or e.name == f"{STRUCTURE}.json")
        for e in entries
    )


def _write_npy_dir(
    dst: Path, plan: _structure.Plan, *, overwrite: bool, progress: Progress | None
) -> None:
    with atomic_dir(dst, overwrite=overwrite, replaceable=_is_replaceable_dir) as tmp:
        total, done = plan.nbytes, 0
        for index, name in enumerate(plan.names):
            target = tmp / f"{name}.npy"
            if target.parent != tmp or not _structure.is_safe_name(name):  # pragma: no cover
                raise FileFormatError(f"unsafe file name {name!r}")
            with target.open("xb") as f:
                plan.write(index, f)
            done += _arrays.nbytes(plan.leaves[index])
            if progress is not None:
                progress(done, total)
        (tmp / f"{STRUCTURE}.json").write_bytes(plan.structure_bytes())


def _write_safetensors(
    dst: Path,
    plan: _structure.Plan,
    metadata: dict[str, str],
    *,
    overwrite: bool,
    progress: Progress | None,
) -> None:
    total = plan.nbytes
    done = [0]

    def step(index: int) -> None:
        done[0] += _arrays.nbytes(plan.leaves[index])
        if progress is not None:
            progress(done[0], total)

    with atomic_file(dst, overwrite=overwrite) as tmp, tmp.open("wb") as f:
        _safetensors.write(f, plan, metadata, step)
