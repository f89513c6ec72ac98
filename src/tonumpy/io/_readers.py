"""Reading every kind of file tonumpy reads into [`Contents`][tonumpy.io.Contents], safely.

``torch.save`` files ([`tonumpy.io._torch`][]), ``.npz`` and ``.npy`` files
([`tonumpy._format._npyzip`][]), ``.safetensors`` files ([`tonumpy.io._safetensors`][]), directories
of ``.npy`` files (with the structure in ``__tonumpy__.json``, as ``convert`` and
``Accumulator(directory=)`` write them, or without), and Hugging Face checkpoint directories
([`tonumpy.io._checkpoint`][]). [`read_file`][tonumpy.io._readers.read_file] is the one entry; the
public functions of [`tonumpy.io`][] and the command line call it. Whatever a parser raises on
a damaged file becomes a [`FileFormatError`][tonumpy.FileFormatError] naming the file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .. import _tree
from .._format import _arrays, _npyheader, _npyzip, _structure
from .._format._fs import check_input, one_line, open_entry, open_regular, short
from .._format._names import STRUCTURE, is_safe_name
from .._rowfiles import _parquet, _shards
from ..errors import FileFormatError, TonumpyError
from . import _checkpoint, _safetensors
from ._torch import read_torch

__all__ = ["FORMATS", "Contents", "is_stored_leaf", "materialise", "read_file"]

#: The one table of file formats: a suffix (lower case) -> the format read from, and written to,
#: a file so named. ``torch``: a ``torch.save`` file. A directory (a name without a suffix, for
#: a destination) is the format ``dir``.
FORMATS = {
    ".npz": "npz",
    ".npy": "npy",
    ".safetensors": "safetensors",
    ".parquet": "parquet",
    ".pt": "torch",
    ".pth": "torch",
    ".bin": "torch",
    ".ckpt": "torch",
}


@dataclasses.dataclass
class Contents:
    """What [`read`][tonumpy.io.read] found in a file, before any conversion.

    Attributes:
        tree: Containers (``dict``, ``list``, ``tuple``) of leaves: torch tensors for ``torch``
            and ``safetensors`` files and for bfloat16/float8 data stored bit-exact, NumPy
            arrays otherwise, and plain Python values.
        format: A short description: ``"torch"``, ``"tonumpy npz"``, ``"npz"``, ``"npy"``,
            ``"npy directory"``, ``"tonumpy npy directory"``, ``"tonumpy shards"`` (a set of
            ``Accumulator`` shards, one per rank), ``"tonumpy parquet directory"`` (an
            ``Accumulator(format="parquet")`` directory), ``"safetensors"``, ``"tonumpy parquet"``,
            ``"parquet"`` (a Parquet file tonumpy did not write) or
            ``"hugging face checkpoint"`` (a ``save_pretrained`` directory).
        classes: Key path -> name of the class a container had when saved (display only).
        sources: Key path -> what a leaf was before it was saved (``dtype``, ``device``,
            ``requires_grad``), where the file records it.
        metadata: The ``__metadata__`` strings of a ``.safetensors`` source (such as
            ``{"format": "pt"}``), kept when it is converted to ``.safetensors``.
        verify: For ``torch.save`` files and checkpoints of them: checks the stored checksums
            (CRC-32) of a leaf's data, once, before the data is used ([`read`][tonumpy.io.read]
            has checked every leaf's); ``None`` for files that have none.
    """

    tree: Any
    format: str
    classes: dict[tuple[Any, ...], str] = dataclasses.field(default_factory=dict)
    sources: dict[tuple[Any, ...], dict[str, Any]] = dataclasses.field(default_factory=dict)
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)
    verify: Callable[[Any], None] | None = dataclasses.field(
        default=None, repr=False, compare=False
    )


def is_stored_leaf(x: Any) -> bool:
    """Whether ``x`` is a leaf of a tree that a reader made (whose containers are plain).

    Readers build ``dict``, ``list`` and ``tuple`` containers only; anything else, a lazy
    ``.npz`` member included, is a leaf, never walked into or searched.

    Examples:
        >>> is_stored_leaf({"a": 1}), is_stored_leaf(None), is_stored_leaf(range(3))
        (False, True, True)
    """
    return type(x) not in (dict, list, tuple)


def read_file(path: Path, *, unsafe_load: bool, lazy: bool) -> Contents:
    """Read ``path``, any kind tonumpy reads.

    With ``lazy``, the members of a ``.npz`` stay unread ([`tonumpy._format._arrays.LazyArray`][]:
    their headers only, for ``show`` and for streaming copies); otherwise every member is read
    and checked, and the leaves of a ``torch.save`` file are not yet verified
    (``Contents.verify``).

    Examples:
        >>> import os, tempfile, numpy as np
        >>> path = os.path.join(tempfile.mkdtemp(), "a.npz")
        >>> np.savez(path, w=np.ones(2))
        >>> contents = read_file(Path(path), unsafe_load=False, lazy=True)
        >>> contents.format, contents.tree["w"].shape, contents.tree["w"].dtype
        ('npz', (2,), dtype('float64'))

    Raises:
        FileNotFoundError: ``path`` does not exist.
        FileFormatError: It is not a regular file, is truncated, corrupt, or of an unknown kind.
        UnsafeFileError: A ``torch.save`` file names code, or would allocate more than it holds.
    """
    if check_input(path):
        return _guard(path, lambda: _read_dir(path, unsafe_load=unsafe_load, lazy=lazy))
    format = _format_of(path)
    if format == "torch":
        return _guard(path, lambda: _read_torch(path, unsafe_load=unsafe_load))
    if format == "npz":
        return _guard(path, lambda: _read_npz(path, lazy=lazy))
    if format == "npy":
        return _guard(path, lambda: Contents(_npyzip.map_npy(path, str(path)), "npy"))
    if format == "parquet":
        return _guard(path, lambda: _read_parquet(path, lazy=lazy))
    return _guard(path, lambda: _read_safetensors(path))


def _format_of(path: Path) -> str:
    format = FORMATS.get(path.suffix.lower()) or _sniff(path)
    if format is None:
        raise FileFormatError(
            f"{path}: not a file tonumpy reads (.pt/.pth/.bin/.ckpt from torch.save, .npz, "
            ".npy, .safetensors, .parquet, or a directory of .npy files or of a checkpoint)"
        )
    return format


def _sniff(path: Path) -> str | None:
    """Guess a file's kind from its first bytes (for names without a known suffix)."""
    with open_regular(path) as f:
        head = f.read(16)
        if _npyheader.is_npy(head):
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
    if head.startswith(b"PAR1"):
        return "parquet"
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


def _read_torch(path: Path, *, unsafe_load: bool) -> Contents:
    tree, classes, sources, checksums = read_torch(path, unsafe_load=unsafe_load)
    verify = checksums.verify if checksums is not None else None
    return Contents(tree, "torch", classes, sources, verify=verify)


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

            tree, classes, sources = _structure.decode(
                raw.array().tobytes(),
                str(path),
                get_array,
                members,
                f"the member {STRUCTURE}.npy",
            )
            contents = Contents(tree, "tonumpy npz", classes, sources)
        if not lazy:
            contents.tree = materialise(contents.tree)
    finally:
        if not lazy:
            archive.close()
    return contents


def materialise(tree: Any) -> Any:
    """The tree with every lazy member read (each member once, however often it appears)."""
    leaves, spec = _tree.flatten(tree, is_leaf=is_stored_leaf)
    done: dict[int, Any] = {}
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, _arrays.LazyArray):
            if id(leaf) not in done:
                array = leaf.array()
                done[id(leaf)] = _arrays.from_bits(array, leaf.bits) if leaf.bits else array
            leaves[i] = done[id(leaf)]
    return _tree.unflatten(spec, leaves)


def _read_parquet(path: Path, *, lazy: bool) -> Contents:
    tree, classes, sources, format = _parquet.read(path, lazy=lazy)
    return Contents(tree, format, classes, sources)


def _read_safetensors(path: Path) -> Contents:
    tensors, metadata = _safetensors.read(path)
    raw = metadata.pop(STRUCTURE, None)
    if raw is None:
        return Contents(tensors, "safetensors", metadata=metadata)

    def get_array(name: str, dtype: str | None) -> Any:
        if name not in tensors:
            raise FileFormatError("the structure names a tensor that is missing")
        return tensors[name]

    tree, classes, sources = _structure.decode(
        raw.encode("utf-8"),
        str(path),
        get_array,
        tensors,
        f"the {STRUCTURE} entry of its __metadata__",
    )
    return Contents(tree, "safetensors", classes, sources, metadata)


def _read_dir(path: Path, *, unsafe_load: bool, lazy: bool) -> Contents:
    names = sorted(entry.name for entry in path.iterdir())
    if f"{STRUCTURE}.json" in names:
        return _read_export(path, names)
    if _shards.is_set(names):
        tree, classes, sources = _shards.read_set(path, names)
        return Contents(tree, "tonumpy shards", classes, sources)
    parquet = _shards.read_parquet_dir(path, names)
    if parquet is not None:
        tree, classes, sources = parquet
        return Contents(tree, "tonumpy parquet directory", classes, sources)
    if _checkpoint.is_checkpoint(names):

        def read_shard(shard: Path) -> tuple[Any, Callable[[Any], None] | None]:
            shard_contents = _read_torch(shard, unsafe_load=unsafe_load)
            return shard_contents.tree, shard_contents.verify

        tree, metadata, verify = _checkpoint.read(path, names, read_shard)
        return Contents(tree, "hugging face checkpoint", metadata=metadata, verify=verify)
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


def _read_export(path: Path, names: list[str]) -> Contents:
    """A directory of ``.npy`` files with ``__tonumpy__.json`` (``convert``, ``Accumulator``).

    ``names`` are the directory's entries: every ``.npy`` file must have a place in the tree,
    except an ``Accumulator``'s log (``__progress__.npy``, ``__index__.npy``).
    """
    with open_entry(path, f"{STRUCTURE}.json") as f:
        raw = f.read()

    def get_array(name: str, dtype: str | None) -> Any:
        if not is_safe_name(name):  # never follow a name out of the directory
            raise FileFormatError(f"the structure names an unsafe file {short(name, 60)}")
        with open_entry(path, f"{name}.npy") as f:
            array = _npyzip.map_npy(path / f"{name}.npy", str(path / f"{name}.npy"), f)
        return _arrays.from_bits(array, dtype) if dtype else array

    members = _shards.tree_members(names)
    tree, classes, sources = _structure.decode(
        raw, str(path), get_array, members, f"{STRUCTURE}.json"
    )
    return Contents(tree, "tonumpy npy directory", classes, sources)
