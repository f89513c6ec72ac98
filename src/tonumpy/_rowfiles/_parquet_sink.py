"""``Accumulator(directory=..., format="parquet")``: one Parquet row group per batch.

The directory holds ``predictions.parquet`` ([`tonumpy._rowfiles._shards.PARQUET`][]) and
``__shard__.json`` (``"storage": "parquet"``, each leaf's kind, whether rows carry dataset
indices, whether the file is complete). Each batch's per-sample leaves (arrays) are written as
one row group as soon as the batch arrives, through [`tonumpy._rowfiles._parquet.RowGroupWriter`][],
so memory holds one batch; per-batch leaves (0-d values such as a loss, and non-array values) are
kept until the end and stored in the file's metadata with the tree's structure. The file
appears, complete, when the accumulator's ``result()`` or ``close()`` closes it: a Parquet
file is readable only once its footer is written, so a crashed run leaves no rows behind
(only a temporary file, removed when the directory is started again).

A leaf whose rows change shape from one batch to another (sequences padded per batch) is
first written as fixed-size lists; at its first change the rows written so far are copied, a
row group at a time, into a file where that column holds variable-length lists, without
padding; ``tonumpy.load`` pads them with the accumulator's pad value, so the file loads as
``Accumulator.result()`` in memory gives it. Each row's ``index=`` is a column
(``__index__``), which ``load`` leaves out of the tree and the set reader orders rows by.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from optree import PyTreeSpec

from .. import _tree
from .._combine._columns import Column, rows_first
from .._format import _structure
from .._format._fs import short
from ..errors import ConversionError, FileFormatError, TonumpyError
from . import _parquet, _shards

__all__ = ["ParquetSink"]


class ParquetSink:
    """The Parquet file of one ``Accumulator(directory=..., format="parquet")`` (see module)."""

    def __init__(self, path: Path, *, resume: bool) -> None:
        _parquet.require_pyarrow()
        self.path = path
        self.file = path / _shards.PARQUET
        path.mkdir(parents=True, exist_ok=True)
        names = {entry.name for entry in path.iterdir()}
        ours = {f"{_shards.SHARD}.json", _shards.PARQUET}
        stale = [n for n in names if n.startswith(f".{_shards.PARQUET}.") and n.endswith(".tmp")]
        if names - ours - set(stale):
            raise FileExistsError(
                f"{path} holds other files ({short(sorted(names - ours - set(stale)), 120)}); "
                "Accumulator(directory=..., format='parquet') writes into an empty directory"
            )
        if names & ours:
            if not resume:
                raise FileExistsError(
                    f"{path} holds another run's files; Accumulator(directory=...) never "
                    "overwrites them: pass a new directory, or delete the old files"
                )
            meta = _shards._read_meta(path)  # noqa: SLF001 - the shard description's reader
            if meta.get("storage") != "parquet":
                raise FileFormatError(
                    f"{path}: resume=True continues a run of the same format; this one is "
                    f"stored as {short(str(meta.get('storage')), 20)}"
                )
            if meta.get("complete"):
                raise FileExistsError(
                    f"{path} is complete already: there is nothing to resume (a Parquet file "
                    "cannot be appended to once closed); pass a new directory"
                )
            # A crashed run's rows were never readable (no footer): the shard starts over.
            (path / f"{_shards.SHARD}.json").unlink()
            self.file.unlink(missing_ok=True)
        for name in stale:
            (path / name).unlink(missing_ok=True)
        self.writer: _parquet.RowGroupWriter | None = None
        self.names: list[str | None] = []  # by leaf: its column (per-sample leaves only)
        self.index_name: str | None = None
        self.forms: list[str] = []
        self.per_batch: list[list[Any]] = []  # by leaf: its per-batch values
        self.closed = False

    # -- writing ---------------------------------------------------------------------------

    def check(
        self, columns: Sequence[Column], states: Sequence[Any], host: Sequence[Any], name: str
    ) -> None:
        """Refuse a batch the file cannot take, before the accumulator commits it."""
        if self.closed:
            raise ConversionError(
                f"{self.path}: the Parquet file is closed (result() or close() was called), and "
                "a closed Parquet file takes no more rows; accumulate a new run into a new "
                "directory"
            )
        counts: dict[int, str] = {}
        for column, state, value in zip(columns, states, host, strict=True):
            if state.form == "jagged":
                raise ConversionError(
                    f"{name}: Accumulator(format='parquet') stores rows of one number of "
                    f"dimensions per column, but {column.place} is a nested (jagged) tensor; pad "
                    "it first (t.to_padded_tensor(0.0)) or accumulate without directory=",
                    path=column.path,
                )
            if column.dtype is not None and state.dtype is not None and state.dtype != column.dtype:
                raise ConversionError(
                    f"{name}: {column.place} holds {state.dtype} after {column.dtype} in the "
                    "batches before; a Parquet column keeps the dtype of its first rows: give "
                    "the leaf one dtype in every batch (reduce={pattern: lambda t: t.float()})"
                )
            if isinstance(value, np.ndarray) and not value.dtype.hasobject and value.ndim:
                counts.setdefault(int(value.shape[0]), column.place)
        if len(counts) > 1:
            (a, where_a), (b, where_b) = list(counts.items())[:2]
            raise ConversionError(
                f"{name}: Accumulator(format='parquet') stores one row per example, but "
                f"{where_a} has {a} rows and {where_b} {b}; accumulate values with another "
                "number of rows (per token, say) in another Accumulator (format='npy')"
            )

    def write(
        self, spec: PyTreeSpec, columns: Sequence[Column], host: Sequence[Any], index: Any
    ) -> None:
        """Write one batch (every leaf already accepted by its column)."""
        if not self.forms:
            self._start(spec, columns, index is not None)
        batch: dict[str, np.ndarray] = {}
        rows = 0
        for i, (column, value) in enumerate(zip(columns, host, strict=True)):
            form = column.form or "object"
            target = self.names[i]
            if target is None:  # one value per batch
                self.per_batch[i].append(
                    rows_first(value, "scalar", 0) if form == "scalar" else value
                )
                continue
            chunk = np.asarray(value)
            batch[target] = chunk
            rows = chunk.shape[0]
        if index is not None and self.index_name is not None:
            batch[self.index_name] = np.asarray(index, dtype=np.int64)
        if rows == 0:
            return  # no rows: nothing to write (an empty first batch decides nothing)
        self._write(batch, columns)

    def _start(self, spec: PyTreeSpec, columns: Sequence[Column], indexed: bool) -> None:
        self.forms = [column.form or "object" for column in columns]
        if "array" not in self.forms:
            raise ConversionError(
                "Accumulator(format='parquet') stores one row per example, and this batch has "
                "no array leaf with rows (only per-batch values); use format='npy'"
            )
        self.per_batch = [[] for _ in columns]
        placeholders = [np.zeros((1,), np.int8) if form == "array" else 0 for form in self.forms]
        layout = _structure.layout(_tree.unflatten(spec, placeholders), ml_dtypes=True, once=False)
        from ..table import column_name  # noqa: PLC0415 - table imports convert

        self.names = [None] * len(columns)
        for index, (flat, path) in enumerate(zip(layout.flat, layout.paths, strict=True)):
            self.names[flat] = column_name(path, place=layout.place(index))
        taken = set(self.names)
        if indexed:
            name = _shards.INDEX
            while name in taken:
                name = f"_{name}"
            self.index_name = name
        self.writer = _parquet.RowGroupWriter(self.file, overwrite=False, index=self.index_name)
        self._meta(complete=False, batches=0, fills=[None] * len(columns), num_items=None)

    def _write(self, batch: dict[str, np.ndarray], columns: Sequence[Column]) -> None:
        writer = self.writer
        assert writer is not None  # noqa: S101 - started
        pads: dict[str, Any] = {}
        for column, target in zip(columns, self.names, strict=True):
            if target is None:
                continue
            shape = writer.row_shape(target)
            if shape is not None and batch[target].shape[1:] != shape:
                fill = column.fill if column.fill is not None else column.pad_value()
                pads[target] = fill
        if pads:
            writer.make_ragged(pads)
        writer.write(batch)

    def _meta(
        self, *, complete: bool, batches: int, fills: list[Any], num_items: int | None
    ) -> None:
        _shards.write_meta(
            self.path,
            storage="parquet",
            complete=complete,
            batches=batches,
            forms=self.forms,
            indexed=self.index_name is not None,
            fills=fills,
            num_items=num_items,
        )

    # -- closing ---------------------------------------------------------------------------

    def close(
        self,
        spec: PyTreeSpec,
        columns: Sequence[Column],
        batches: int,
        num_items: int | None,
        ml_dtypes: bool,
    ) -> None:
        """Write the metadata, the footer and the completion mark.

        Once: later calls only record ``num_items``.
        """
        if self.closed:
            self._meta(
                complete=True, batches=batches, fills=self._fills(columns), num_items=num_items
            )
            return
        writer = self.writer
        assert writer is not None  # noqa: S101 - started by the first batch
        if writer.rows == 0:  # every batch was empty: one empty row group gives the schema
            writer.write(
                {
                    target: np.empty((0, *(column.trailing or ())), column.dtype or np.float32)
                    for column, target in zip(columns, self.names, strict=True)
                    if target is not None
                }
                | ({self.index_name: np.empty(0, np.int64)} if self.index_name else {})
            )
        rows = writer.rows
        template: list[Any] = []
        for i, column in enumerate(columns):
            if self.names[i] is not None:
                dtype = column.dtype or np.dtype(np.float32)
                template.append(
                    np.broadcast_to(np.zeros((), dtype), (rows, *(column.trailing or ())))
                )
            elif self.forms[i] == "scalar":
                scalars = self.per_batch[i]
                template.append(np.concatenate(scalars) if scalars else np.empty(0, column.dtype))
            else:
                template.append(list(self.per_batch[i]))
        from ..table import tabulate  # noqa: PLC0415 - table imports convert

        table = tabulate(
            _tree.unflatten(spec, template),
            caller="Accumulator",
            batch_size=rows,
            per_batch="keep",
            ml_dtypes=ml_dtypes,
        )
        written = {n for n in self.names if n is not None}
        values = dict(table.values)
        for name, array in table.columns.items():
            if name not in written:  # a per-batch value that happens to have `rows` rows
                values[name] = np.asarray(array)
        self.closed = True
        writer.close(table.structure, values)
        self._meta(complete=True, batches=batches, fills=self._fills(columns), num_items=num_items)

    @staticmethod
    def _fills(columns: Sequence[Column]) -> list[Any]:
        out: list[Any] = []
        for column in columns:
            fill = None
            if column.form in ("array", "scalar") and column.rows:
                try:
                    value = column.fill if column.fill is not None else column.pad_value()
                    fill = _shards._fill_text(value)  # noqa: SLF001 - the shard format's own
                except TonumpyError:
                    fill = None
            out.append(fill)
        return out

    def result(self, columns: Sequence[Column], num_items: int | None) -> list[Any]:
        """Every leaf's result, as the in-memory accumulator gives it (the file is closed)."""
        from ..convert import to_numpy  # noqa: PLC0415 - convert imports the accumulator

        wanted = [n for n in self.names if n is not None]
        read, _ = _parquet.read_columns(self.file, wanted)
        out: list[Any] = []
        for i, column in enumerate(columns):
            target = self.names[i]
            if target is None:
                values = self.per_batch[i]
                if self.forms[i] == "scalar":
                    out.append(np.concatenate(values) if values else np.empty(0, column.dtype))
                else:
                    out.append(list(values))
                continue
            array = read[target]
            if not isinstance(array, np.ndarray):
                array = to_numpy(array, ml_dtypes=True)
            if array.dtype != column.dtype and column.dtype is not None:
                array = array.astype(column.dtype)
            out.append(array if num_items is None else array[:num_items])
        return out

    def abort(self) -> None:
        """Remove the temporary file (the directory stays incomplete)."""
        if self.writer is not None and not self.closed:
            self.writer.abort()
