"""Parquet files: one row per example, the tree's structure in the file's key-value metadata.

A tree is written as the table [`tonumpy.table.tabulate`][] makes of it: every array leaf whose
first dimension is the number of rows is a column (named by
[`tonumpy.table.column_name`][]); every other array leaf (a per-batch loss, say) is a *value*,
stored in the metadata; plain values stay in the structure. Columns are stored so that every
Parquet reader reads them (pyarrow, pandas, polars, DuckDB, Hugging Face ``datasets``):

* a row that is one number is a plain column (``bool``, ``int8``...``uint64``, ``float32``,
  ``float64``);
* a row of fixed shape ``(d,)`` is a ``fixed_size_list<d>``, ``(d1, d2)`` a
  ``fixed_size_list<fixed_size_list<d2>, d1>``, and so on (``datasets`` does not read Arrow's
  fixed-shape tensor extension type);
* ragged rows (rows of different shapes, written by [`RowGroupWriter`][] with ``ragged=``) are
  variable-length lists, nested once per dimension, without padding;
* ``float16``, ``bfloat16`` and the ``float8`` types are stored as their ``float32`` values
  (exact: every value of theirs is a ``float32``; DuckDB and polars have no 16-bit float);
  the metadata keeps the dtype: ``tonumpy.load`` gives ``float16`` back, and ``bfloat16``/
  ``float8`` as ``float32`` (or, with ``ml_dtypes=True``, as ``ml_dtypes`` arrays, bit-exact);
* complex, string and other dtypes are refused, naming the leaf.

The metadata key ``tonumpy`` holds JSON: ``{"format": "tonumpy-parquet", "version", "rows",
"columns": {name: {"dtype", "shape" | "ndim", "pad"}}, "values": {name: {"dtype", "shape",
"data"}}, "structure"}``. Files are hostile: a reader checks that the metadata and the
columns agree (names, row counts, types, shapes) and that the data the columns declare
(uncompressed) can hold what they decode to (tonumpy writes no dictionary or run-length
encoded data), before it reads any data; rows are read a row group at a time into arrays
allocated once. Files tonumpy did not write are read as pyarrow reads them.

``pyarrow`` is imported only when a Parquet file is read or written
([`require_pyarrow`][tonumpy._rowfiles._parquet.require_pyarrow]).
"""

from __future__ import annotations

import base64
import contextlib
import importlib
import json
import math
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from .. import _dtypes
from .._combine import _pad
from .._format import _structure
from .._format._arrays import CHUNK, LazyArray
from .._format._fs import _commit_file, _create_file, _parent_of, exists_error, open_regular, short
from ..errors import ConversionError, FileFormatError, MissingDependencyError

__all__ = [
    "FORMAT",
    "META_KEY",
    "ROW_GROUP_BYTES",
    "RowGroupWriter",
    "read",
    "read_columns",
    "read_index",
    "require_pyarrow",
    "write",
]

#: The key of the file's key-value metadata that holds tonumpy's JSON.
META_KEY = b"tonumpy"
FORMAT = "tonumpy-parquet"
_VERSION = 1
#: Bytes of column data in one row group that ``write`` aims for.
ROW_GROUP_BYTES = 64 << 20
#: Bytes of per-batch values a file's metadata may hold (beyond that: exclude them).
_MAX_VALUES = 16 << 20
_PLAIN = frozenset(
    ["bool", "float32", "float64", *(f"{s}int{b}" for s in ("", "u") for b in (8, 16, 32, 64))]
)
_WIDENED = frozenset({"float16", *_dtypes.ML_DTYPES.values()})
_ML_BY_NAME = {name: dtype for dtype, name in _dtypes.ML_DTYPES.items()}


def require_pyarrow() -> tuple[ModuleType, ModuleType]:
    """``pyarrow`` and ``pyarrow.parquet``, imported on first use.

    Raises:
        MissingDependencyError: pyarrow is not installed; the message names the extra.
    """
    try:
        pa = importlib.import_module("pyarrow")
        pq = importlib.import_module("pyarrow.parquet")
    except ImportError as exc:
        raise MissingDependencyError(
            "Parquet files need the 'pyarrow' package: pip install pyarrow (tonumpy's 'parquet' "
            "extra: pip install '.[parquet]' in a clone); or write a .npz file or a directory of "
            ".npy files instead"
        ) from exc
    return pa, pq


# ------------------------------------------------------------------------------ writing


def _stored_dtype(dtype: np.dtype[Any], name: str) -> np.dtype[Any]:
    text = dtype.name
    if text in _PLAIN:
        return dtype.newbyteorder("=") if dtype.byteorder == ">" else dtype
    if text in _WIDENED:
        return np.dtype(np.float32)
    raise ConversionError(
        f"column {short(name, 60)}: Parquet files hold bool, int, uint and float columns; "
        f"{dtype} has no Parquet form that every reader reads: convert it (to float64, say) "
        "or leave it out with exclude=",
    )


class _Column:
    """How one column is stored: its dtype, and a fixed row shape or a number of dimensions."""

    __slots__ = ("dtype", "name", "ndim", "pad", "shape", "stored")

    def __init__(self, name: str, dtype: np.dtype[Any], shape: tuple[int, ...] | None, ndim: int):
        self.name = name
        self.dtype = dtype
        self.stored = _stored_dtype(dtype, name)
        self.shape = shape  # None: ragged
        self.ndim = ndim
        self.pad: Any = None

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"dtype": self.dtype.name}
        if self.shape is None:
            out["ndim"] = self.ndim
        else:
            out["shape"] = list(self.shape)
        if self.pad is not None:
            out["pad"] = self.pad
        return out


def _rows(value: Any) -> list[np.ndarray] | np.ndarray:
    if isinstance(value, np.ndarray) and not value.dtype.hasobject:
        return value
    return [np.asarray(row) for row in value]


def _fixed_array(pa: ModuleType, column: _Column, array: np.ndarray) -> Any:
    flat = np.ascontiguousarray(array, dtype=column.stored).reshape(-1)
    out = pa.array(flat)
    for size in reversed(array.shape[1:]):
        out = pa.FixedSizeListArray.from_arrays(out, size)
    return out


def _ragged_array(pa: ModuleType, column: _Column, rows: list[np.ndarray]) -> Any:
    if not rows:
        values = np.empty(0, dtype=column.stored)
    else:
        values = np.concatenate([np.ravel(r).astype(column.stored, copy=False) for r in rows])
    out = pa.array(values)
    for level in reversed(range(column.ndim)):
        lengths = np.concatenate(
            [np.full(math.prod(r.shape[:level]), r.shape[level], np.int64) for r in rows]
            or [np.empty(0, np.int64)]
        )
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        if offsets[-1] >= 2**31:
            raise ConversionError(
                f"column {short(column.name, 60)}: more than 2**31 values in one row group; "
                "write fewer rows at a time"
            )
        out = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), out)
    return out


def _arrow_type(pa: ModuleType, column: _Column) -> Any:
    out = pa.from_numpy_dtype(column.stored)
    if column.shape is None:
        for _ in range(column.ndim):
            out = pa.list_(out)
        return out
    for size in reversed(column.shape):
        out = pa.list_(out, size)
    return out


class RowGroupWriter:
    """Write columns to a Parquet file, one row group per ``write``: memory holds one at a time.

    The file appears (atomically) at ``close``, with the structure and per-batch values in its
    metadata; until then it is a temporary file beside it, removed by ``abort`` (or by leaving
    a ``with`` block on an exception).

    Examples:
        >>> import os, tempfile, numpy as np, tonumpy
        >>> path = os.path.join(tempfile.mkdtemp(), "preds.parquet")
        >>> with RowGroupWriter(path, ragged=["ids"]) as writer:
        ...     writer.write({"logits": np.ones((2, 3)), "ids": [np.arange(3), np.arange(2)]})
        ...     writer.write({"logits": np.zeros((1, 3)), "ids": [np.arange(1)]})
        >>> tree = tonumpy.load(path)
        >>> tree["logits"].shape, [ids.tolist() for ids in tree["ids"]]
        ((3, 3), [[0, 1, 2], [0, 1], [0]])

    Args:
        path: The file to write.
        overwrite: Replace an existing file (at ``close``).
        ragged: Column names (or ``True``: every column) whose rows may differ in shape,
            within a batch or between batches: stored as variable-length lists. Other columns
            keep the row shape of the first batch; a batch with another is an error.
        pad_value: Recorded for ragged columns (the forms ``Accumulator`` takes): ``load``
            pads their rows to the largest with it. Without one, ``load`` gives a ragged
            column as a list of per-row arrays.
        compression: A Parquet codec (``"none"``, ``"snappy"``, ``"zstd"``, ...).
        index: The name of a column of each row's dataset index (``int64``): not part of the
            tree (``load`` leaves it out; [`read_index`][tonumpy._rowfiles._parquet.read_index]
            reads it), a plain column for every other reader.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        overwrite: bool = True,
        ragged: bool | list[str] | tuple[str, ...] | set[str] | frozenset[str] = False,
        pad_value: Any = None,
        compression: str = "none",
        index: str | None = None,
    ) -> None:
        self._pa, self._pq = require_pyarrow()
        self._index = index
        self.path = Path(path)
        if self.path.is_dir():
            raise IsADirectoryError(f"{self.path} is a directory; choose a file name")
        self._overwrite = overwrite
        if os.path.lexists(self.path) and not overwrite:
            raise exists_error(self.path)
        self._ragged = ragged
        self._pad_value = pad_value
        self._compression = compression
        self._columns: dict[str, _Column] | None = None
        self._writer: Any = None
        self._tmp: Path | None = None
        self._done = False
        self.rows = 0

    def __enter__(self) -> RowGroupWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            if not self._done:
                self.close()
        else:
            self.abort()

    def _is_ragged(self, name: str) -> bool:
        return self._ragged is True or (not isinstance(self._ragged, bool) and name in self._ragged)

    def _start(self, columns: Mapping[str, Any]) -> dict[str, _Column]:
        described: dict[str, _Column] = {}
        for name, value in columns.items():
            rows = _rows(value)
            first = rows[0] if len(rows) else None
            if isinstance(rows, np.ndarray):
                dtype, shape = rows.dtype, rows.shape[1:]
            elif first is not None:
                dtype, shape = first.dtype, first.shape
            else:
                raise ConversionError(f"column {short(name, 60)}: no rows to learn its type from")
            ragged = self._is_ragged(name) or (
                isinstance(rows, list) and len({r.shape for r in rows}) > 1
            )
            column = _Column(name, dtype, None if ragged else tuple(shape), len(shape))
            if ragged:
                place = f"column {short(name, 60)}"
                fill = _pad.pad_value_for(self._pad_value, _key_path(name), dtype, place)
                column.pad = None if fill is None else fill.item()
            described[name] = column
        _parent_of(self.path)
        self._open(described)
        return described

    def _open(self, described: Mapping[str, _Column]) -> None:
        fields = [
            self._pa.field(name, _arrow_type(self._pa, column), nullable=False)
            for name, column in described.items()
        ]
        self._tmp = _create_file(self.path)
        self._writer = self._pq.ParquetWriter(
            str(self._tmp),
            self._pa.schema(fields),
            compression=self._compression,
            use_dictionary=False,
            write_statistics=False,
        )

    def row_shape(self, name: str) -> tuple[int, ...] | None:
        """The row shape column ``name`` keeps (``None``: ragged, or nothing written yet)."""
        column = (self._columns or {}).get(name)
        return None if column is None else column.shape

    def make_ragged(self, pads: Mapping[str, Any]) -> None:
        """Store the columns named (fixed-shape so far) as variable-length lists from now on.

        The rows written so far are copied, a row group at a time, into a new temporary file
        whose schema has those columns as lists (memory holds one row group); ``pads`` gives
        each column's pad value (``None``: none), recorded for ``load`` as ``ragged=`` does.
        """
        assert self._columns is not None  # noqa: S101 - started
        assert self._tmp is not None  # noqa: S101
        try:
            old_writer, old_tmp = self._writer, self._tmp
            old_writer.close()
            self._writer = None
            for name, pad in pads.items():
                column = self._columns[name]
                column.shape = None
                column.pad = None if pad is None else np.asarray(pad).item()
            self._open(self._columns)
            schema = self._writer.schema
            with open(old_tmp, "rb") as f:
                old = self._pq.ParquetFile(f)
                for group in range(old.metadata.num_row_groups):
                    table = old.read_row_group(group).cast(schema)
                    self._writer.write_table(table, row_group_size=max(table.num_rows, 1))
            old_tmp.unlink()
        except BaseException:
            self.abort()
            raise

    def write(self, columns: Mapping[str, Any]) -> None:
        """Write one batch of columns (what [`tonumpy.to_columns`][] gives) as one row group.

        Every batch has the columns of the first, with their dtypes and (unless ragged) row
        shapes; a column is an array with one row per example, or a list (or object array) of
        per-row arrays.
        """
        try:
            if self._columns is None:
                self._columns = self._start(columns)
            self._write(columns)
        except BaseException:
            self.abort()
            raise

    def _write(self, columns: Mapping[str, Any]) -> None:
        assert self._columns is not None  # noqa: S101 - set by write
        if list(columns) != list(self._columns):
            raise ConversionError(
                f"{self.path}: this batch has the columns {short(list(columns), 200)}, the first "
                f"had {short(list(self._columns), 200)}; every batch needs the same columns"
            )
        arrays, count = [], None
        for name, column in self._columns.items():
            rows = _rows(columns[name])
            n = len(rows)
            if count is not None and n != count:
                raise ConversionError(
                    f"{self.path}: column {short(name, 60)} has {n} rows, another {count}: "
                    "every column needs one row per example"
                )
            count = n
            dtypes = {rows.dtype} if isinstance(rows, np.ndarray) else {r.dtype for r in rows}
            if dtypes - {column.dtype}:
                raise ConversionError(
                    f"{self.path}: column {short(name, 60)} holds {column.dtype} in the first "
                    f"batch and {', '.join(sorted(map(str, dtypes)))} in this one"
                )
            if column.shape is None:
                listed = list(rows)
                if any(r.ndim != column.ndim for r in listed):
                    raise ConversionError(
                        f"{self.path}: column {short(name, 60)}: rows of {column.ndim} "
                        "dimensions before, other ranks now"
                    )
                arrays.append(_ragged_array(self._pa, column, listed))
                continue
            array = rows if isinstance(rows, np.ndarray) else _stack(rows, name, column)
            if array.shape[1:] != column.shape:
                raise ConversionError(
                    f"{self.path}: column {short(name, 60)} has rows of shape "
                    f"{array.shape[1:]} after rows of {column.shape}; pass ragged=[{name!r}] "
                    "to store rows of different shapes (variable-length lists)"
                )
            arrays.append(_fixed_array(self._pa, column, array))
        table = self._pa.Table.from_arrays(arrays, schema=self._writer.schema)
        self._writer.write_table(table, row_group_size=max(count or 0, 1))
        self.rows += count or 0

    def close(
        self,
        structure: Mapping[str, Any] | None = None,
        values: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        """Finish the file: the metadata (structure and per-batch values), then the rename.

        ``structure`` is what [`tonumpy.column_structure`][] describes (as a dict); without
        it, ``load`` rebuilds nested dicts from the column names. ``values`` are arrays that
        are not rows (at most 16 MiB in all).
        """
        if self._done:
            raise ConversionError(f"{self.path}: the writer is closed")
        self._done = True
        try:
            if self._columns is None:
                raise ConversionError(f"{self.path}: nothing was written; a file needs a batch")
            meta = {
                "format": FORMAT,
                "version": _VERSION,
                "rows": self.rows,
                "columns": {n: c.describe() for n, c in self._columns.items()},
                "values": _encode_values(values or {}),
                "structure": dict(structure) if structure is not None else None,
            }
            if self._index is not None:
                meta["index"] = self._index
            self._writer.add_key_value_metadata(
                {META_KEY: json.dumps(meta, allow_nan=False, separators=(",", ":"))}
            )
            self._writer.close()
            self._writer = None
            assert self._tmp is not None  # noqa: S101 - created with the writer
            if self.path.is_file():
                with contextlib.suppress(OSError):
                    os.chmod(self._tmp, self.path.stat().st_mode & 0o7777)
            _commit_file(self._tmp, self.path, overwrite=self._overwrite)
            # Without overwrite the file is linked into place: abort removes the other name.
        finally:
            self.abort()

    def abort(self) -> None:
        """Stop writing and remove the temporary file; nothing appears at ``path``."""
        self._done = True
        writer, self._writer = self._writer, None
        if writer is not None:
            with contextlib.suppress(Exception):
                writer.close()
        tmp, self._tmp = self._tmp, None
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


def _key_path(name: str) -> tuple[Any, ...]:
    from ..table import key_path  # noqa: PLC0415 - table imports convert; this module is lighter

    return key_path(name)


def _stack(rows: list[np.ndarray], name: str, column: _Column) -> np.ndarray:
    if len({r.shape for r in rows}) > 1:
        raise ConversionError(
            f"column {short(name, 60)} has rows of different shapes; pass ragged=[{name!r}]"
        )
    return np.stack(rows) if rows else np.empty((0, *(column.shape or ())), column.dtype)


def _encode_values(values: Mapping[str, np.ndarray]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    total = 0
    for name, value in values.items():
        array = np.asarray(value)  # 0-d stays 0-d (not ascontiguousarray)
        stored = _stored_dtype(array.dtype, name)
        data = array.astype(stored, copy=False).tobytes(order="C")
        total += len(data)
        if total > _MAX_VALUES:
            raise ConversionError(
                f"{short(name, 60)} is not one row per example and a Parquet file keeps such "
                f"values in its metadata, which holds at most {_MAX_VALUES >> 20} MiB of them; "
                "leave it out with exclude=, or save the tree as .npz"
            )
        out[name] = {
            "dtype": array.dtype.name,
            "stored": stored.name,
            "shape": list(array.shape),
            "data": base64.b64encode(data).decode("ascii"),
        }
    return out


def write(
    path: Path,
    tree: Any,
    *,
    overwrite: bool,
    compress: bool,
    ml_dtypes: bool,
    is_leaf: Callable[[Any], bool] | None,
    caller: str,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Write a whole tree: row groups of about [`ROW_GROUP_BYTES`][] each, then the metadata."""
    from ..table import tabulate  # noqa: PLC0415 - see _key_path

    require_pyarrow()
    table = tabulate(tree, caller=caller, per_batch="keep", ml_dtypes=ml_dtypes, is_leaf=is_leaf)
    per_row = sum(math.prod(c.shape[1:]) * c.dtype.itemsize for c in table.columns.values())
    step = max(1, ROW_GROUP_BYTES // max(per_row, 1))
    writer = RowGroupWriter(path, overwrite=overwrite, compression="zstd" if compress else "none")
    with writer:
        start = 0
        while True:
            stop = min(start + step, table.rows)
            writer.write({n: c[start:stop] for n, c in table.columns.items()})
            if progress is not None:
                progress(stop * per_row, table.rows * per_row)
            start = stop
            if start >= table.rows:
                break
        writer.close(table.structure, table.values)


# ------------------------------------------------------------------------------ reading


def _bad(path: Path, what: str) -> FileFormatError:
    return FileFormatError(f"{path}: {what}")


def _describe_type(pa: ModuleType, arrow_type: Any) -> tuple[str, tuple[int, ...] | None, int]:
    """(numpy dtype name, fixed shape or None, number of list levels) of an Arrow type."""
    shape: list[int] = []
    levels = 0
    fixed = True
    while True:
        if pa.types.is_fixed_size_list(arrow_type):
            shape.append(arrow_type.list_size)
        elif pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type):
            fixed = False
        else:
            break
        levels += 1
        arrow_type = arrow_type.value_type
    try:
        dtype = np.dtype(arrow_type.to_pandas_dtype()).name
    except (NotImplementedError, TypeError):
        dtype = str(arrow_type)
    if dtype not in _PLAIN:
        raise FileFormatError(f"a column of Arrow type {short(str(arrow_type), 60)}")
    return dtype, (tuple(shape) if fixed else None), levels


def _arrow_bytes(dtype: str, count: int) -> int:
    return (count + 7) // 8 if dtype == "bool" else count * np.dtype(dtype).itemsize


def _check_sizes(path: Path, pf: Any, name: str, need_per_row: int, ragged: bool) -> None:
    """The data a column decodes to must be backed by what its chunks declare uncompressed."""
    meta = pf.metadata
    index = pf.schema_arrow.get_field_index(name)
    leaf = [i for i in range(meta.num_columns) if meta.schema.column(i).path.split(".")[0] == name]
    declared = 0
    for rg in range(meta.num_row_groups):
        group = meta.row_group(rg)
        for i in leaf:
            chunk = group.column(i)
            declared += chunk.total_uncompressed_size
    need = need_per_row * meta.num_rows
    if index < 0 or (not ragged and need > 2 * declared + (64 << 10)):
        raise _bad(
            path,
            f"column {short(name, 60)} decodes to {need} bytes but its data declares "
            f"{declared}: a damaged or hostile file (tonumpy writes no dictionary or run-length "
            "encoded columns)",
        )


def _fill_fixed(
    pa: ModuleType, chunk: Any, out: np.ndarray, at: int, shape: tuple[int, ...]
) -> int:
    values = chunk
    for _ in shape:
        if values.null_count:
            raise FileFormatError("a column holds nulls")
        values = values.flatten()
    if values.null_count:
        raise FileFormatError("a column holds nulls")
    flat = values.to_numpy(zero_copy_only=False)
    n = len(chunk)
    if flat.size != n * math.prod(shape):
        raise FileFormatError("a column's values do not match its rows")
    out[at : at + n] = flat.reshape((n, *shape))
    return n


def _ragged_rows(chunk: Any, levels: int, dtype: np.dtype[Any]) -> list[np.ndarray]:
    """The rows of a list column (``levels`` nested lists) as arrays of their own shapes."""
    if chunk.null_count:
        raise FileFormatError("a column holds nulls")
    offsets = []
    node = chunk
    for _ in range(levels):
        if node.null_count:
            raise FileFormatError("a column holds nulls")
        offsets.append(np.asarray(node.offsets.to_numpy(zero_copy_only=False), dtype=np.int64))
        node = node.values
    if node.null_count:
        raise FileFormatError("a column holds nulls")
    values = node.to_numpy(zero_copy_only=False).astype(dtype, copy=False)
    rows = []
    for r in range(len(chunk)):
        shape, lo, hi = [], r, r + 1
        for off in offsets:
            starts, ends = off[lo:hi], off[lo + 1 : hi + 1]
            lengths = ends - starts
            if len(lengths) and np.any(lengths != lengths[0]):
                raise FileFormatError("a ragged row is not rectangular")
            shape.append(int(lengths[0]) if len(lengths) else 0)
            lo, hi = int(off[lo]), int(off[hi])
        rows.append(values[lo:hi].reshape(shape))
    return rows


def read(
    path: Path, *, lazy: bool = False
) -> tuple[Any, dict[tuple[Any, ...], str], dict[tuple[Any, ...], Any], str]:
    """Read a Parquet file: (tree, classes, sources, format description).

    A file tonumpy wrote is rebuilt from its metadata; any other Parquet file gives nested
    dicts keyed by [`tonumpy.table.key_path`][] of its column names, a column whose rows
    differ in shape a list of per-row arrays. With ``lazy``, fixed-shape columns of a file
    tonumpy wrote are checked but not read ([`tonumpy._format._arrays.LazyArray`][] leaves), unless
    its structure has ``per_row`` nodes (their rows are split, which needs the data).
    """
    pa, pq = require_pyarrow()
    with open_regular(path) as f:
        pf = pq.ParquetFile(f)
        raw = (pf.metadata.metadata or {}).get(META_KEY)
        names = list(pf.schema_arrow.names)
        if len(set(names)) != len(names):
            raise _bad(path, "two columns have one name")
        if raw is None:
            columns = {n: _read_plain(pa, pf, path, n) for n in names}
            from ..table import nest  # noqa: PLC0415 - see _key_path

            return nest(columns), {}, {}, "parquet"
        meta = _parse_meta(path, raw)
        described = meta["columns"]
        rows = meta["rows"]
        if rows != pf.metadata.num_rows:
            raise _bad(
                path,
                f"the tonumpy metadata says {rows} rows, the file holds {pf.metadata.num_rows}",
            )
        if set(described) != set(names):
            raise _bad(
                path,
                "the tonumpy metadata and the file name different columns: "
                f"{short(sorted(set(described) ^ set(names)), 120)}",
            )
        structure = meta["structure"]
        if isinstance(structure, dict) and structure.get("per_row"):
            lazy = False
        columns = {}
        for name in names:
            if name == meta.get("index"):
                continue  # each row's dataset index: no place in the tree (read_index)
            columns[name] = _read_column(pa, pf, path, name, described[name], rows, lazy=lazy)
        values = _decode_values(path, meta["values"])
    if structure is None:
        from ..table import nest  # noqa: PLC0415 - see _key_path

        return nest({**columns, **values}), {}, {}, "tonumpy parquet"

    def get_array(name: str, dtype: str | None) -> Any:
        if name in columns:
            return columns[name]
        if name in values:
            return values[name]
        raise FileFormatError("the structure names a column that is missing")

    per_row = structure.get("per_row", []) if isinstance(structure, dict) else []
    if per_row:  # ragged columns as object arrays: leaves, split into rows below
        for name, column in columns.items():
            if isinstance(column, list):
                rows_array = np.empty(len(column), dtype=object)
                for i, row in enumerate(column):  # one by one: rows of one shape stay rows
                    rows_array[i] = row
                columns[name] = rows_array
    raw_structure = json.dumps(structure).encode("utf-8")
    tree, classes, sources = _structure.decode(
        raw_structure,
        str(path),
        get_array,
        [*columns, *values],
        f"the key-value metadata {META_KEY.decode()!r}",
    )
    if per_row:
        from ..table import split_rows  # noqa: PLC0415 - see _key_path

        for stored in per_row if isinstance(per_row, list) else []:
            tree = split_rows(tree, tuple(stored) if isinstance(stored, list) else ())
    return tree, classes, sources, "tonumpy parquet"


def _parse_meta(path: Path, raw: bytes) -> dict[str, Any]:
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise _bad(path, "the tonumpy metadata is not JSON") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise _bad(path, "the tonumpy metadata is not tonumpy's")
    version = meta.get("version")
    if not isinstance(version, int) or version > _VERSION:
        raise _bad(path, f"tonumpy metadata version {short(version)}; upgrade tonumpy")
    rows = meta.get("rows")
    if not isinstance(rows, int) or isinstance(rows, bool) or rows < 0:
        raise _bad(path, "the tonumpy metadata has no row count")
    columns, values = meta.get("columns"), meta.get("values")
    if not isinstance(columns, dict) or not all(isinstance(v, dict) for v in columns.values()):
        raise _bad(path, "the tonumpy metadata does not describe its columns")
    if not isinstance(values, dict) or not all(isinstance(v, dict) for v in values.values()):
        raise _bad(path, "the tonumpy metadata's values are damaged")
    if meta.get("structure") is not None and not isinstance(meta["structure"], dict):
        raise _bad(path, "the tonumpy metadata's structure is damaged")
    index = meta.get("index")
    if index is not None and (
        not isinstance(index, str)
        or columns.get(index, {}).get("dtype") != "int64"
        or columns[index].get("shape") != []
    ):
        raise _bad(path, "the tonumpy metadata's index names no int64 column")
    return meta


def read_columns(
    path: Path, only: list[str] | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The columns of a Parquet file tonumpy wrote (``only``: those named), and its metadata.

    Fixed-shape columns are arrays, ragged ones padded with their recorded pad value (a list
    of per-row arrays without one); bfloat16/float8 columns are torch tensors, as ``read``
    gives them.
    """
    pa, pq = require_pyarrow()
    with open_regular(path) as f:
        pf = pq.ParquetFile(f)
        raw = (pf.metadata.metadata or {}).get(META_KEY)
        if raw is None:
            raise _bad(path, "no tonumpy metadata: not a file tonumpy wrote")
        meta = _parse_meta(path, raw)
        names = list(pf.schema_arrow.names)
        if set(meta["columns"]) != set(names) or meta["rows"] != pf.metadata.num_rows:
            raise _bad(path, "the tonumpy metadata and the file disagree on its columns")
        rows = meta["rows"]
        wanted = names if only is None else [n for n in names if n in only]
        columns = {n: _read_column(pa, pf, path, n, meta["columns"][n], rows) for n in wanted}
    return columns, meta


def read_index(path: Path) -> np.ndarray | None:
    """The dataset index column of a Parquet file tonumpy wrote (``None``: it has none)."""
    _, meta = read_columns(path, [])
    name = meta.get("index")
    if name is None:
        return None
    columns, _ = read_columns(path, [name])
    return np.asarray(columns[name])


def _dims(value: Any) -> tuple[int, ...] | None:
    if not isinstance(value, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value
    ):
        return None
    return tuple(value)


def _read_column(  # noqa: PLR0917 - one private reader of one column
    pa: ModuleType,
    pf: Any,
    path: Path,
    name: str,
    spec: dict[str, Any],
    rows: int,
    *,
    lazy: bool = False,
) -> Any:
    source = f"column {short(name, 60)}"
    field = pf.schema_arrow.field(name)
    try:
        stored, shape, levels = _describe_type(pa, field.type)
    except FileFormatError as exc:
        raise _bad(path, f"{source}: {exc}") from None
    dtype_name = spec.get("dtype")
    if not isinstance(dtype_name, str) or dtype_name not in _PLAIN | _WIDENED:
        raise _bad(path, f"{source}: the metadata gives it no dtype tonumpy writes")
    want = _stored_dtype(
        np.dtype(np.float32) if dtype_name in _WIDENED else np.dtype(dtype_name), name
    )
    if want.name != stored:
        raise _bad(path, f"{source}: the metadata says {dtype_name}, the file holds {stored}")
    if "shape" in spec:
        want_shape = _dims(spec["shape"])
        if want_shape is None or shape != want_shape:
            raise _bad(
                path,
                f"{source}: the metadata gives rows of shape {short(spec['shape'])}, the file "
                f"holds {'variable-length lists' if shape is None else shape}",
            )
        need = _arrow_bytes(stored, math.prod(want_shape))
        if spec.get("tonumpy", True):  # a file tonumpy wrote: no dictionary or RLE data
            _check_sizes(path, pf, name, need, ragged=False)
        if lazy:
            return _LazyColumn(path, name, rows, want_shape, np.dtype(stored), dtype_name)
        return _restore(_fill_column(pf, path, name, rows, want_shape, stored), dtype_name)
    ndim = spec.get("ndim")
    if not isinstance(ndim, int) or shape is not None or levels != ndim:
        raise _bad(path, f"{source}: the metadata and the file disagree on its dimensions")
    row_list: list[np.ndarray] = []
    for rg in range(pf.metadata.num_row_groups):
        table = pf.read_row_group(rg, columns=[name])
        for chunk in table.column(0).chunks:
            try:
                row_list.extend(_ragged_rows(chunk, levels, np.dtype(stored)))
            except FileFormatError as exc:
                raise _bad(path, f"{source}: {exc}") from None
    if len(row_list) != rows:
        raise _bad(path, f"{source}: {len(row_list)} rows, the file says {rows}")
    pad = spec.get("pad")
    if pad is None:
        return [_restore(r, dtype_name) for r in row_list]
    from ..table import stack_rows  # noqa: PLC0415 - see _key_path

    # Padded as stored (float32 for bfloat16/float8, which NumPy cannot stack), then restored.
    padded = stack_rows(
        row_list,
        _key_path(name),
        ragged="pad",
        pad_value=pad,
        caller=str(path),
        place=source,
    )
    return _restore(padded, dtype_name)


def _fill_column(  # noqa: PLR0917 - one private reader of one column
    pf: Any, path: Path, name: str, rows: int, shape: tuple[int, ...], stored: str
) -> np.ndarray:
    """A checked fixed-shape column, read a row group at a time into one array."""
    pa, _ = require_pyarrow()
    source = f"column {short(name, 60)}"
    out = np.empty((rows, *shape), dtype=stored)
    at = 0
    for rg in range(pf.metadata.num_row_groups):
        chunk_rows = pf.metadata.row_group(rg).num_rows
        table = pf.read_row_group(rg, columns=[name])
        if at + chunk_rows > rows or table.num_rows != chunk_rows:
            raise _bad(path, f"{source}: its row groups hold more rows than the file")
        for chunk in table.column(0).chunks:
            try:
                at += _fill_fixed(pa, chunk, out, at, shape)
            except FileFormatError as exc:
                raise _bad(path, f"{source}: {exc}") from None
    if at != rows:
        raise _bad(path, f"{source}: {at} rows, the file says {rows}")
    return out


class _LazyColumn(LazyArray):
    """A fixed-shape column whose data has not been read (``tonumpy show``, ``convert``).

    Its metadata was checked against the file when it was made; ``array()`` reads it then, a
    row group at a time. A bfloat16/float8 column gives its bits (``bits`` names the type), as
    the lazy members of other files do.
    """

    def __init__(  # noqa: PLR0917 - private, made in one place
        self,
        path: Path,
        name: str,
        rows: int,
        shape: tuple[int, ...],
        stored: np.dtype[Any],
        dtype_name: str,
    ) -> None:
        self._path, self._name, self._stored, self._dtype_name = path, name, stored, dtype_name
        self.shape = (rows, *shape)
        self.fortran = False
        self.bits = dtype_name if dtype_name in _ML_BY_NAME else None
        if self.bits is not None:
            self.dtype = np.dtype(f"u{_ML_BY_NAME[dtype_name].itemsize}")
        else:
            self.dtype = np.dtype(dtype_name)

    def array(self) -> np.ndarray:
        """The column, read now (bits for bfloat16/float8)."""
        _, pq = require_pyarrow()
        with open_regular(self._path) as f:
            pf = pq.ParquetFile(f)
            out = _fill_column(
                pf, self._path, self._name, self.shape[0], self.shape[1:], self._stored.name
            )
        restored = _restore(out, self._dtype_name)
        if self.bits is None:
            result: np.ndarray = restored
            return result
        bits: np.ndarray = restored.view(_dtypes.BITS[restored.dtype.itemsize]).numpy()
        return bits.view(self.dtype)

    def chunks(self, size: int = CHUNK) -> Iterator[bytes]:
        """The data in row order, about ``size`` bytes at a time."""
        flat = self.array().reshape(-1)
        step = max(1, size // max(self.dtype.itemsize, 1))
        for start in range(0, flat.size, step):
            yield flat[start : start + step].tobytes()


def _restore(array: np.ndarray, dtype_name: str) -> Any:
    """A column as stored, back in its dtype: a bfloat16/float8 one as a torch tensor.

    Their float32 values convert back exactly; ``to_numpy`` then widens them again, or with
    ``ml_dtypes=True`` gives ``ml_dtypes`` arrays, as for every other file.
    """
    if dtype_name == "float16":
        return array.astype(np.float16)
    if dtype_name in _ML_BY_NAME:
        import torch  # noqa: PLC0415 - imported by tonumpy already

        data = np.ascontiguousarray(array)
        if not data.flags.writeable:  # a ragged row: a view of pyarrow's buffer
            data = data.copy()
        return torch.from_numpy(data).to(_ML_BY_NAME[dtype_name])
    return array


def _read_plain(pa: ModuleType, pf: Any, path: Path, name: str) -> Any:
    """A column of a Parquet file tonumpy did not write: arrays, or a list of per-row arrays."""
    field = pf.schema_arrow.field(name)
    try:
        stored, shape, levels = _describe_type(pa, field.type)
    except FileFormatError as exc:
        raise _bad(
            path,
            f"column {short(name, 60)}: {exc}; tonumpy reads bool, int, uint and float "
            "columns, and (fixed-size or variable-length) lists of them",
        ) from None
    rows = pf.metadata.num_rows
    spec: dict[str, Any] = {"dtype": stored, "tonumpy": False}  # read as pyarrow reads it
    if shape is not None:
        spec["shape"] = list(shape)
    else:
        spec["ndim"] = levels
    return _read_column(pa, pf, path, name, spec, rows)


def _decode_values(path: Path, values: dict[str, Any]) -> dict[str, np.ndarray]:
    out = {}
    for name, spec in values.items():
        shape = _dims(spec.get("shape"))
        dtype, stored, data = spec.get("dtype"), spec.get("stored"), spec.get("data")
        if (
            shape is None
            or not isinstance(data, str)
            or dtype not in _PLAIN | _WIDENED
            or stored not in _PLAIN
        ):
            raise _bad(path, f"value {short(name, 60)}: its metadata is damaged")
        size = math.prod(shape) * np.dtype(stored).itemsize
        if len(data) != 4 * ((size + 2) // 3):  # base64 of exactly that many bytes
            raise _bad(
                path,
                f"value {short(name, 60)}: shape {shape} needs {size} bytes, the metadata "
                f"holds {len(data) * 3 // 4}",
            )
        raw = base64.b64decode(data, validate=True)
        out[name] = _restore(np.frombuffer(raw, dtype=stored).reshape(shape).copy(), dtype)
    return out
