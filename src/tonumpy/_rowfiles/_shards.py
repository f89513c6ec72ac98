"""Shards: one ``Accumulator(directory=)`` per rank, its progress logged, merged on read.

Every ``Accumulator(directory=)`` directory keeps, beside its structure and ``.npy`` files:

* ``__progress__.npy``: one ``int64`` row per complete batch, appended once the batch's rows
  are in every file: ``(batches, index rows, rows of each leaf's file..., each leaf's shape
  after the rows...)`` (``-1`` rows for a leaf without a file; the shape is the leaf's padded
  shape, which a file grown with room to spare exceeds until ``result()`` trims it). After a
  crash, the last row says which rows are whole; ``resume=True`` cuts every file back to it
  ([`recover`][tonumpy._rowfiles._shards.recover]);
* ``__index__.npy``: with ``append(..., index=)``, each row's dataset index;
* ``__shard__.json``: what the files alone do not say (each leaf's kind: per-sample ``array``,
  per-batch ``scalar``, ``object``; whether rows carry indices; each leaf's pad value) and
  whether the directory is **complete**: ``result()`` or ``close()`` marks it so, with the
  number of batches then; a later ``append`` makes it incomplete again.

Leaf file names never start with ``_`` (``tonumpy._format._names``), so these names are free.

A *set of shards* is a directory holding ``rank-RRRRR-of-WWWWW/`` directories, one per rank,
each such a directory ([`shard_name`][tonumpy._rowfiles._shards.shard_name]). ``tonumpy.load`` (and
``show``, ``convert``) read it as one tree ([`read_set`][tonumpy._rowfiles._shards.read_set]): every
rank present, every shard complete, one structure; per-sample rows in dataset order (by their
indices, padding dropped and ``num_items`` verified by ``tonumpy._combine._indices``; without
indices, in rank order), per-batch values in rank order.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import _tree
from .._combine._columns import Column, copy_padded
from .._combine._indices import resolve
from .._combine._storage import GrowingNpy
from .._format import _arrays, _names, _npyheader, _npyzip, _structure
from .._format._fs import open_entry, short
from ..errors import FileFormatError, TonumpyError

__all__ = [
    "INDEX",
    "PARQUET",
    "SHARD",
    "Progress",
    "Recovered",
    "is_set",
    "read_parquet_dir",
    "read_set",
    "recover",
    "recovered_index",
    "shard_name",
    "tree_members",
    "write_meta",
]

INDEX = "__index__"
#: The file of a directory an ``Accumulator(format="parquet")`` writes.
PARQUET = "predictions.parquet"
PROGRESS = "__progress__"
SHARD = "__shard__"
_FORMAT = "tonumpy shard"
_VERSION = 1
_SHARD_DIR = re.compile(r"rank-(\d{5,9})-of-(\d{5,9})")


def tree_members(names: Sequence[str]) -> list[str]:
    """The arrays of a directory holding ``names`` that must have a place in its tree.

    Every ``.npy`` file but the directory's own log (``__progress__``, ``__index__``).

    Examples:
        >>> tree_members(["__tonumpy__.json", "__progress__.npy", "logits.npy"])
        ['logits']
    """
    return [n[:-4] for n in names if n.endswith(".npy") and n[:-4] not in (PROGRESS, INDEX)]


def shard_name(rank: int, world_size: int) -> str:
    """The directory name of one rank's shard.

    Examples:
        >>> shard_name(1, 4)
        'rank-00001-of-00004'
    """
    return f"rank-{rank:05d}-of-{world_size:05d}"


def _fill_text(fill: np.ndarray | None) -> list[str] | None:
    return None if fill is None else [fill.dtype.str, fill.tobytes().hex()]


def _fill_value(data: Any) -> np.ndarray | None:
    if not (isinstance(data, list) and len(data) == 2 and all(isinstance(d, str) for d in data)):
        return None
    try:
        value: np.ndarray = np.frombuffer(bytes.fromhex(data[1]), dtype=np.dtype(data[0]))
        return value[:1].reshape(())
    except (ValueError, TypeError, IndexError):
        return None


# ------------------------------------------------------------------------------ writing


@dataclasses.dataclass
class Recovered:
    """What [`recover`][tonumpy._rowfiles._shards.recover] found in an incomplete directory."""

    names: list[str]  # the array leaves' file names, in the structure's order
    forms: list[str]  # each leaf's form (by leaf of the tree)
    files: list[str | None]  # by leaf: its file's name (without .npy)
    bits: list[str | None]  # by leaf: the ml_dtypes name of the bits its file holds
    indexed: bool
    batches: int
    index_rows: int
    rows: list[int]  # by leaf: rows of its file that are whole (-1: no file)
    trailing: list[tuple[int, ...]]  # by leaf: its padded shape after the rows


class Progress:
    """The log of one directory as batches arrive (see the module)."""

    def __init__(
        self,
        path: Path,
        forms: Sequence[str],
        files: Sequence[str | None],
        bits: Sequence[str | None],
        ndims: Sequence[int],
        *,
        indexed: bool,
        recovered: Recovered | None,
    ) -> None:
        self.path = path
        self.forms = list(forms)
        self.files = list(files)
        self.bits = list(bits)
        self.ndims = list(ndims)  # by leaf: the number of dimensions after the rows
        self.indexed = indexed
        width = (2 + len(forms) + sum(ndims),)
        log, index = path / f"{PROGRESS}.npy", path / f"{INDEX}.npy"
        if recovered is None:
            self.log = GrowingNpy(log, np.dtype(np.int64), width)
            self.index = GrowingNpy(index, np.dtype(np.int64), ()) if indexed else None
        else:
            self.log = GrowingNpy.adopt(log, recovered.batches)
            self.index = None
            if indexed and recovered.indexed:
                self.index = GrowingNpy.adopt(index, recovered.index_rows)
            elif indexed:  # the run before died in its first batch, which had no index=
                index.unlink(missing_ok=True)
                self.index = GrowingNpy(index, np.dtype(np.int64), ())
        self.fills: list[Any] = [None] * len(forms)
        self.num_items: int | None = None
        self.complete = False
        self._write_meta(complete=False, batches=recovered.batches if recovered else 0)

    def record(
        self,
        batches: int,
        index: np.ndarray | None,
        files: Sequence[Any],
        trailing: Sequence[tuple[int, ...] | None],
    ) -> None:
        """Log one more complete batch.

        ``files``: each leaf's ``GrowingNpy`` or ``None``; ``trailing``: each leaf's padded
        shape after the rows (its column's), ``None`` where not known yet.
        """
        if self.index is not None and index is not None:
            self.index.append(index, None)
        rows = [-1 if f is None else f.rows for f in files]
        index_rows = self.index.rows if self.index is not None else -1
        shapes: list[int] = []
        for n, file, shape in zip(self.ndims, files, trailing, strict=True):
            known = shape if shape is not None else (file.trailing if file is not None else None)
            shapes.extend(known if known is not None and len(known) == n else [0] * n)
        row = np.array([[batches, index_rows, *rows, *shapes]], dtype=np.int64)
        self.log.append(row, None)
        if self.complete:
            self._write_meta(complete=False, batches=batches)

    def finish(self, batches: int, columns: Sequence[Column], num_items: int | None) -> None:
        """Mark the directory complete, as of ``batches`` batches.

        ``num_items``: the dataset's size, recorded for readers to verify the indices against.
        """
        self.num_items = num_items
        for i, column in enumerate(columns):
            if column.form in ("array", "scalar") and column.rows:
                try:
                    self.fills[i] = _fill_text(
                        column.fill if column.fill is not None else column.pad_value()
                    )
                except TonumpyError:  # no pad value that fits: ragged shards are then refused
                    self.fills[i] = None
        self._write_meta(complete=True, batches=batches)

    @staticmethod
    def empty(path: Path, num_items: int | None) -> None:
        """Mark ``path`` a complete shard of no rows (a rank that appended nothing)."""
        path.mkdir(parents=True, exist_ok=True)
        if (path / f"{_names.STRUCTURE}.json").exists() or (path / f"{SHARD}.json").exists():
            raise FileExistsError(
                f"{path} holds another run's files; Accumulator(directory=...) never "
                "overwrites them: pass a new directory, or delete the old files"
            )
        shard = Progress.__new__(Progress)
        shard.path, shard.forms, shard.files, shard.bits, shard.ndims = path, [], [], [], []
        shard.indexed, shard.fills, shard.num_items = False, [], num_items
        shard._write_meta(complete=True, batches=0)  # noqa: SLF001 - its own class

    def _write_meta(self, *, complete: bool, batches: int) -> None:
        self.complete = complete
        write_meta(
            self.path,
            storage="npy",
            complete=complete,
            batches=batches,
            forms=self.forms,
            indexed=self.indexed,
            fills=self.fills,
            num_items=self.num_items,
            files=self.files,
            bits=self.bits,
            ndims=self.ndims,
        )


def write_meta(
    path: Path,
    *,
    storage: str,
    complete: bool,
    batches: int,
    forms: Sequence[str],
    indexed: bool,
    fills: Sequence[Any],
    num_items: int | None,
    **more: Any,
) -> None:
    """Write ``path/__shard__.json`` atomically; ``storage`` names the leaves' files.

    ``"npy"``: a ``.npy`` file per leaf (``more`` holds ``files``, ``bits``, ``ndims``);
    ``"parquet"``: one Parquet file, [`PARQUET`][tonumpy._rowfiles._shards.PARQUET].
    """
    data = {
        "format": _FORMAT,
        "storage": storage,  # the leaves' files (Accumulator's format=)
        "version": _VERSION,
        "complete": complete,
        "batches": batches,
        "kinds": list(forms),
        "indexed": indexed,
        "fills": list(fills),
        "num_items": num_items,
        **more,
    }
    target = path / f"{SHARD}.json"
    tmp = target.with_name(target.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f)
    os.replace(tmp, target)


def _read_meta(path: Path) -> dict[str, Any]:
    file = path / f"{SHARD}.json"
    try:
        with open_entry(path, f"{SHARD}.json") as f:
            data = json.loads(f.read(1 << 20).decode("utf-8"))
    except FileNotFoundError:
        raise FileFormatError(
            f"{file} is missing: {path} was not written by an Accumulator(directory=) of this "
            "tonumpy version (or its first batch never completed)"
        ) from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise FileFormatError(f"{file}: not valid JSON ({exc})") from None
    if (
        not isinstance(data, dict)
        or data.get("format") != _FORMAT
        or not isinstance(data.get("kinds"), list)
        or not isinstance(data.get("batches"), int)
    ):
        raise FileFormatError(f"{file}: not a tonumpy shard description")
    if not isinstance(data.get("version"), int) or data["version"] > _VERSION:
        raise FileFormatError(f"{file}: format version {data.get('version')!r}: upgrade tonumpy")
    return data


def _ndims(path: Path, meta: dict[str, Any]) -> list[int]:
    """Each leaf's number of dimensions after the rows, as ``__shard__.json`` records them."""
    ndims = meta.get("ndims")
    if not (
        isinstance(ndims, list)
        and len(ndims) == len(meta["kinds"])
        and all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= 64 for n in ndims)
    ):
        raise FileFormatError(f"{path / f'{SHARD}.json'}: damaged (its ndims)")
    return ndims


def _last_progress(path: Path, meta: dict[str, Any]) -> np.ndarray | None:
    """The last logged row, or None if no batch completed."""
    width = 2 + len(meta["kinds"]) + sum(_ndims(path, meta))
    with open_entry(path, f"{PROGRESS}.npy") as f:
        log = _npyzip.map_npy(path / f"{PROGRESS}.npy", str(path / f"{PROGRESS}.npy"), f)
    if log.dtype != np.int64 or log.ndim != 2 or log.shape[1] != width:
        raise FileFormatError(f"{path / f'{PROGRESS}.npy'}: not a progress log of {width} columns")
    return np.array(log[-1]) if log.shape[0] else None


def recover(path: Path) -> Recovered | None:
    """The state of the directory ``path`` to continue (``resume=True``), or None if it is new.

    Raises:
        FileFormatError: The directory holds files this tonumpy did not write as an
            ``Accumulator(directory=)``, or they are damaged; it holds non-array leaves (kept
            in memory until ``result()``, so lost in a crash).
    """
    structure = path / f"{_names.STRUCTURE}.json"
    if not structure.exists():
        return None
    if not (path / f"{SHARD}.json").exists():
        _clear_first_batch(path)
        return None
    meta = _read_meta(path)
    forms = [str(k) for k in meta["kinds"]]
    if "object" in forms:
        raise FileFormatError(
            f"{path}: resume=True continues array leaves only; this directory's tree has "
            "non-array leaves, which an Accumulator keeps in memory until result() (a crash "
            "loses them): start a new directory"
        )
    with open_entry(path, structure.name) as f:
        names = _structure.parse_structure(f.read()).get("arrays")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise FileFormatError(f"{structure}: the structure does not list its arrays")
    last = _last_progress(path, meta)
    ndims = _ndims(path, meta)
    trailing: list[tuple[int, ...]] = []
    if last is None:
        batches, index_rows, rows = 0, 0, [0] * len(forms)
        trailing = [(0,) * n for n in ndims]
    else:
        batches, index_rows = int(last[0]), int(last[1])
        rows = [int(r) for r in last[2 : 2 + len(forms)]]
        start = 2 + len(forms)
        for n in ndims:
            trailing.append(tuple(int(d) for d in last[start : start + n]))
            start += n
    files, bits = meta.get("files"), meta.get("bits")
    if not (
        isinstance(files, list)
        and isinstance(bits, list)
        and len(files) == len(bits) == len(forms)
        and all(f is None or (isinstance(f, str) and _names.is_safe_name(f)) for f in files)
        and all(b is None or isinstance(b, str) for b in bits)
    ):
        raise FileFormatError(f"{path / f'{SHARD}.json'}: damaged (its files and bits)")
    return Recovered(
        names,
        forms,
        files,
        bits,
        bool(meta.get("indexed")),
        batches,
        max(index_rows, 0),
        rows,
        trailing,
    )


def _clear_first_batch(path: Path) -> None:
    """Remove what a run that died during its first batch wrote: the structure, empty files.

    Raises:
        FileFormatError: A file the structure names holds rows (this is not such a run).
    """
    structure = path / f"{_names.STRUCTURE}.json"
    with open_entry(path, structure.name) as f:
        names = _structure.parse_structure(f.read()).get("arrays")
    if not isinstance(names, list) or not all(
        isinstance(n, str) and _names.is_safe_name(n) for n in names
    ):
        raise FileFormatError(f"{structure}: the structure does not list its arrays")
    files = [path / f"{n}.npy" for n in names if (path / f"{n}.npy").exists()]
    for file in files:
        if file.lstat().st_size == 0:  # died before its header
            continue
        with open_entry(path, file.name) as f:
            header = _npyheader.read_header(f, str(file))
        if header.shape[:1] != (0,):
            raise FileFormatError(
                f"{path}: holds rows ({file.name}) but no {SHARD}.json: not written by an "
                "Accumulator(directory=) of this tonumpy version, so resume=True cannot "
                "continue it; pass a new directory"
            )
    for file in [*files, structure]:
        file.unlink()


def recovered_index(path: Path, recovered: Recovered) -> np.ndarray:
    """The dataset indices of the rows ``recover`` found whole (a read-only copy)."""
    with open_entry(path, f"{INDEX}.npy") as f:
        index = _npyzip.map_npy(path / f"{INDEX}.npy", str(path / f"{INDEX}.npy"), f)
    out: np.ndarray = np.array(index[: recovered.index_rows], dtype=np.int64)
    out.flags.writeable = False
    return out


# ------------------------------------------------------------------------------ reading


def is_set(names: Sequence[str]) -> bool:
    """Whether a directory holding ``names`` is a set of shards (and not itself a directory)."""
    return f"{_names.STRUCTURE}.json" not in names and any(_SHARD_DIR.fullmatch(n) for n in names)


@dataclasses.dataclass
class _Shard:
    path: Path
    rank: int
    tree: Any
    classes: dict[tuple[Any, ...], str]
    sources: dict[tuple[Any, ...], dict[str, Any]]
    bits: dict[int, str]  # id of an array leaf -> the ml_dtypes name its bits hold
    meta: dict[str, Any]
    index: np.ndarray | None


def _shard_dir(folder: Path, name: str) -> Path:
    """``folder / name``, a real directory (a symbolic link may lead anywhere: refused)."""
    path = folder / name
    st = path.lstat()
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        what = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a directory"
        raise FileFormatError(f"{path}: {what}; a shard is a directory inside {folder}")
    return path


def _shards_of(path: Path, names: Sequence[str]) -> list[tuple[int, Path]]:
    found: dict[int, Path] = {}
    worlds: set[int] = set()
    for name in names:
        match = _SHARD_DIR.fullmatch(name)
        if match is None:
            continue
        rank, world = int(match[1]), int(match[2])
        worlds.add(world)
        found[rank] = _shard_dir(path, name)
    if len(worlds) != 1:
        raise FileFormatError(
            f"{path}: shards of different world sizes ({', '.join(map(str, sorted(worlds)))}) "
            "are mixed; keep one run's shards per directory"
        )
    world = worlds.pop()
    missing = [r for r in range(world) if r not in found]
    if missing:
        expected = path / shard_name(missing[0], world)
        raise FileFormatError(
            f"{path}: rank{'s' if len(missing) > 1 else ''} "
            f"{', '.join(map(str, missing[:8]))} of {world} "
            f"{'are' if len(missing) > 1 else 'is'} missing ({expected} "
            "does not exist): that rank crashed before its first batch, or its directory is "
            "elsewhere"
        )
    extra = [r for r in found if r >= world]
    if extra:
        raise FileFormatError(f"{path}: {found[extra[0]]} names a rank outside 0..{world - 1}")
    return [(r, found[r]) for r in range(world)]


def _read_shard(rank: int, path: Path) -> _Shard:
    if (path / f"{_names.STRUCTURE}.json").exists() and not (path / f"{SHARD}.json").exists():
        raise FileFormatError(
            f"{path} is incomplete (its rank died during its first batch): continue it with "
            "Accumulator(directory=..., resume=True), or remove it"
        )
    meta = _read_meta(path)
    storage = meta.get("storage", "npy")
    if storage == "parquet":
        return _read_parquet_shard(rank, path, meta)
    if storage != "npy":
        raise FileFormatError(
            f"{path}: a shard stored as {short(str(storage), 20)}; this tonumpy reads .npy and "
            "Parquet shards"
        )
    forms = meta["kinds"]
    if meta["batches"] == 0 and not forms and meta.get("complete"):
        return _Shard(path, rank, None, {}, {}, {}, meta, None)  # a rank with no rows
    last = _last_progress(path, meta)
    batches = 0 if last is None else int(last[0])
    if not meta.get("complete") or meta["batches"] != batches:
        raise FileFormatError(
            f"{path} is incomplete ({batches} batch{'es' if batches != 1 else ''} logged, "
            "never marked complete by result() or close()): its rank crashed or is still "
            "running. Continue it with Accumulator(directory=..., resume=True), or remove it"
        )
    bits: dict[int, str] = {}

    def get_array(name: str, dtype: str | None) -> Any:
        if not _names.is_safe_name(name):
            raise FileFormatError(f"the structure names an unsafe file {short(name, 60)}")
        with open_entry(path, f"{name}.npy") as f:
            array = _npyzip.map_npy(path / f"{name}.npy", str(path / f"{name}.npy"), f)
        if dtype:
            bits[id(array)] = dtype  # the tree holds the array: its id stays its own
        return array

    with open_entry(path, f"{_names.STRUCTURE}.json") as f:
        raw = f.read()
    members = tree_members(sorted(entry.name for entry in path.iterdir()))
    tree, classes, sources = _structure.decode(
        raw, str(path), get_array, members, f"{_names.STRUCTURE}.json"
    )
    index = None
    if meta.get("indexed"):
        with open_entry(path, f"{INDEX}.npy") as f:
            index = _npyzip.map_npy(path / f"{INDEX}.npy", str(path / f"{INDEX}.npy"), f)
        if index.dtype != np.int64 or index.ndim != 1:
            raise FileFormatError(f"{path / f'{INDEX}.npy'}: not a 1-d int64 index")
    return _Shard(path, rank, tree, classes, sources, bits, meta, index)


def _read_parquet_shard(rank: int, path: Path, meta: dict[str, Any]) -> _Shard:
    """A shard an ``Accumulator(format="parquet")`` wrote: its one file, checked complete."""
    from . import _parquet  # noqa: PLC0415 - pyarrow only where a Parquet shard is read

    if meta["batches"] == 0 and not meta["kinds"] and meta.get("complete"):
        return _Shard(path, rank, None, {}, {}, {}, meta, None)  # a rank with no rows
    file = _parquet_file(path, meta)
    tree, classes, sources, _ = _parquet.read(file)
    index = _parquet.read_index(file) if meta.get("indexed") else None
    if meta.get("indexed") and index is None:
        raise FileFormatError(f"{file}: {SHARD}.json says its rows are indexed; it has no index")
    leaves, spec = _tree.flatten(tree, is_leaf=_is_plain_leaf)
    bits: dict[int, str] = {}
    for i, leaf in enumerate(leaves):
        if not isinstance(leaf, np.ndarray) and hasattr(leaf, "dtype"):  # bfloat16, float8
            from ..convert import to_numpy  # noqa: PLC0415 - convert imports this module

            exact = to_numpy(leaf, ml_dtypes=True)
            leaves[i] = exact.view(np.dtype(f"u{exact.dtype.itemsize}"))
            bits[id(leaves[i])] = exact.dtype.name
    return _Shard(path, rank, _tree.unflatten(spec, leaves), classes, sources, bits, meta, index)


def read_parquet_dir(
    path: Path, names: Sequence[str]
) -> tuple[Any, dict[tuple[Any, ...], str], dict[tuple[Any, ...], dict[str, Any]]] | None:
    """One ``Accumulator(directory=, format="parquet")`` directory, rows in the order appended.

    ``None`` if ``path`` (holding ``names``) is not such a directory.
    """
    if f"{SHARD}.json" not in names or f"{_names.STRUCTURE}.json" in names:
        return None
    meta = _read_meta(path)
    if meta.get("storage") != "parquet":
        return None
    if meta["batches"] == 0 and not meta["kinds"] and meta.get("complete"):
        raise FileFormatError(f"{path}: an empty Accumulator directory (nothing was appended)")
    from . import _parquet  # noqa: PLC0415 - pyarrow only where a Parquet shard is read

    tree, classes, sources, _ = _parquet.read(_parquet_file(path, meta))
    return tree, classes, sources


def _parquet_file(path: Path, meta: dict[str, Any]) -> Path:
    """The Parquet file of a complete directory, or an error saying it is incomplete."""
    file = path / PARQUET
    if not meta.get("complete") or not os.path.lexists(file):
        raise FileFormatError(
            f"{path} is incomplete (never marked complete by result() or close(); a Parquet "
            "file is readable only once closed): its rank crashed or is still running. Run "
            "it again (Accumulator(..., format='parquet', resume=True) starts it over), or "
            "remove it"
        )
    return file


def read_set(
    path: Path, names: Sequence[str]
) -> tuple[Any, dict[tuple[Any, ...], str], dict[tuple[Any, ...], dict[str, Any]]]:
    """The set of shards in ``path`` as one tree: (tree, classes, sources); see the module.

    Raises:
        FileFormatError: A rank is missing, a shard is incomplete or damaged, the shards hold
            different structures or leaves that cannot be joined, or their indices are
            duplicated (or, with ``num_items`` recorded, missing).
    """
    every = [_read_shard(rank, shard) for rank, shard in _shards_of(path, names)]
    shards = [s for s in every if s.tree is not None or s.meta["kinds"]]
    if not shards:
        raise FileFormatError(f"{path}: every shard is empty (no rank appended a batch)")
    first = shards[0]
    flat = []
    spec0 = None
    for shard in shards:
        leaves, spec = _tree.flatten(shard.tree, is_leaf=_is_plain_leaf)
        if spec0 is None:
            spec0 = spec
        _tree.require_same(
            spec0,
            spec,
            str(first.path),
            str(shard.path),
            hint="every rank must accumulate the same keys, fields and lengths",
        )
        if shard.meta["kinds"] != first.meta["kinds"] or len(leaves) != len(first.meta["kinds"]):
            raise FileFormatError(f"{shard.path}: its leaves' kinds differ from {first.path}'s")
        flat.append(leaves)
    assert spec0 is not None  # noqa: S101 - at least one shard
    indexed = [s.index is not None for s in shards]
    if any(indexed) and not all(indexed):
        odd = shards[indexed.index(not indexed[0])]
        raise FileFormatError(
            f"{shard_name(odd.rank, len(shards))}: rows {'with' if indexed[0] else 'without'} "
            f"dataset indices in {first.path} but not in {odd.path}; every rank must pass "
            "index= to append, or none"
        )
    maps: list[np.ndarray] | None = None
    if all(indexed):
        recorded = {s.meta.get("num_items") for s in every} - {None}
        num_items = recorded.pop() if len(recorded) == 1 else None
        if num_items is not None and (
            not isinstance(num_items, int) or isinstance(num_items, bool) or num_items < 0
        ):
            raise FileFormatError(f"{path}: a shard records num_items={num_items!r}")
        try:
            maps = resolve(
                [s.index for s in shards if s.index is not None],
                num_items=num_items,
                names=[str(s.path) for s in shards],
                caller=f"tonumpy.load({str(path)!r})",
            )
        except ValueError as exc:
            raise FileFormatError(f"{path}: {exc}") from None
    out = [
        _merge_leaf(i, path_place, [leaves[i] for leaves in flat], shards, maps)
        for i, path_place in enumerate(_tree.leaf_paths(spec0))
    ]
    return _tree.unflatten(spec0, out), first.classes, first.sources


def _is_plain_leaf(x: Any) -> bool:
    """A leaf of a decoded structure, as an Accumulator counted leaves (``None`` is none).

    A list of plain values (no container, array or ``None`` in it) is one leaf: the values a
    non-array leaf (``"step": i``) took, one per batch.
    """
    if type(x) is list:
        return bool(x) and not any(
            v is None or type(v) in (dict, list, tuple) or isinstance(v, np.ndarray) for v in x
        )
    return x is not None and type(x) not in (dict, tuple)


def _merge_leaf(
    i: int,
    path_place: tuple[tuple[Any, ...], str],
    values: list[Any],
    shards: Sequence[_Shard],
    maps: list[np.ndarray] | None,
) -> Any:
    form = shards[0].meta["kinds"][i]
    path, place = path_place
    if form == "object":  # one value per batch, in rank order
        return [v for value in values for v in (value if isinstance(value, list) else [value])]
    bits = {s.bits.get(id(v)) for s, v in zip(shards, values, strict=True)}
    fills = [_fill_value(s.meta.get("fills", [None] * (i + 1))[i]) for s in shards]
    fill = next((f for f in fills if f is not None), None)

    def pad_value(_path: tuple[Any, ...], dtype: np.dtype[Any]) -> Any:
        return None if fill is None else fill.astype(dtype)

    column = Column(
        path, place, axis=0, pad_value=pad_value if fill is not None else None, noun="shards"
    )
    for shard, value in zip(shards, values, strict=True):
        if not isinstance(value, np.ndarray) or value.ndim == 0:
            raise FileFormatError(f"{shard.path}: {place} is not an array of rows")
        column.commit(column.check("array", value.dtype, value.shape, str(shard.path)))
    dtype, trailing = column.dtype, column.trailing or ()
    assert dtype is not None  # noqa: S101
    per_sample = form == "array" and maps is not None
    if per_sample:
        assert maps is not None  # noqa: S101
        for shard, value, target in zip(shards, values, maps, strict=True):
            if value.shape[0] != target.size:
                raise FileFormatError(
                    f"{shard.path}: {place} has {value.shape[0]} rows but {target.size} "
                    "dataset indices; every per-sample leaf holds one row per index"
                )
        total = int(sum(int(np.count_nonzero(m >= 0)) for m in maps))
    else:
        total = sum(v.shape[0] for v in values)
    out = np.empty((total, *trailing), dtype=dtype)
    start = 0
    for n, value in enumerate(values):
        rows = value.shape[0]
        if not per_sample:
            copy_padded(out[start : start + rows], value, column.fill)
            start += rows
            continue
        assert maps is not None  # noqa: S101
        target = maps[n]
        keep = target >= 0
        block = np.empty((rows, *trailing), dtype=dtype)
        copy_padded(block, value, column.fill)
        out[target[keep]] = block[keep]
    names = [b for b in bits if b]
    return _arrays.from_bits(out, names[0]) if names else out
