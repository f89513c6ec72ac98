"""Where ``gather``'s rows land on a receiving rank: the result's arrays, or ``.npy`` files.

The rows arrive in pieces (some rows of one leaf of one rank, rows first), round after round.
Before the first one, the metadata of every rank has told the receiver everything about the
result: each leaf's dtype, padded shape and pad value (its
[`Column`][tonumpy._combine._columns.Column], the policy ``concat`` and ``Accumulator`` follow), and
where every row of every rank goes. So a
[`Destination`][tonumpy.distributed._destination.Destination] allocates each leaf's result once, in
memory or as a ``.npy`` file of its final size in a directory (the directory format of
``tonumpy._combine._directory``), and copies each piece, padded, straight to its rows: a receiver
holds the result (or nothing, with a directory) plus one round of pieces, never every rank's bytes
and the result at once.

Where a row goes:

* leaves that hold one value per rank (0-d) or per batch (``Accumulator`` leaves that were 0-d
  in every batch), and array leaves without ``sampler=``: after the rows of the ranks before
  it, in rank order;
* array leaves with ``sampler=`` or dataset indices: row ``j`` of rank ``r`` goes to row
  ``maps[r][j]`` (``-1``: a repeated sample, dropped);
* nested (jagged) tensors: their rows (one array each) join in one list, in rank order, or
  where ``maps`` puts them, as array rows;
* ``num_items`` then keeps the first rows of every per-sample leaf.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from optree import PyTreeSpec

from .. import _dtypes, _tree
from .._combine._columns import Column, copy_padded, rows_first
from .._combine._directory import Directory
from .._combine._storage import GrowingNpy
from ..convert import leaves_to_numpy, to_numpy
from ._metadata import ARRAY, OBJECT, LeafInfo, Piece, Plan, RankMeta

__all__ = ["Destination"]


class _Leaf:
    """One leaf of the result: its column, its storage, and each rank's rows' destination."""

    __slots__ = ("array", "column", "file", "limit", "maps", "offsets", "values")

    def __init__(self, column: Column) -> None:
        self.column = column
        self.array: np.ndarray | None = None  # in memory
        self.file: GrowingNpy | None = None  # with directory=
        self.values: list[Any] = []  # non-array leaves: one value per rank
        self.offsets: list[int] = []  # per rank: its first row (rank order)
        self.maps: list[np.ndarray] | None = None  # per rank: each row's destination (sampler)
        self.limit = 0  # rows kept


class Destination:
    """The result of one ``gather`` on a receiving rank, filled piece by piece.

    The ``plan`` (every rank's alike) gives each leaf's column, ``maps`` (per rank: each
    row's row in the result, or ``-1``) with ``sampler=`` (``_sampler.sample_positions``) or
    dataset indices (``_indices.resolve``), and ``per_batch[i]``: leaf ``i`` holds one value
    per batch (never reordered or cut). ``infos[r]`` is rank ``r``'s leaves' descriptions.
    """

    def __init__(
        self,
        spec: PyTreeSpec,
        plan: Plan,
        infos: Sequence[Sequence[LeafInfo]],
        *,
        num_items: int | None,
        directory: Path | None,
        ml_dtypes: bool,
    ) -> None:
        columns, per_batch, maps = plan.columns, plan.per_batch, plan.maps
        self.spec = spec
        self.ml_dtypes = ml_dtypes
        self.leaves = [_Leaf(column) for column in columns]
        self.axes = [column.axis for column in columns]
        self.num_items = num_items
        world = len(infos)
        placed = None if maps is None else sum(int(np.count_nonzero(m >= 0)) for m in maps)
        self.maps, self.placed = maps, placed  # for nested tensors' rows
        for i, leaf in enumerate(self.leaves):
            form = leaf.column.form
            if form in ("object", "jagged"):
                leaf.values = [None] * world
                continue
            counts = [leaves[i].rows(leaf.column.axis) for leaves in infos]
            leaf.offsets = [sum(counts[:r]) for r in range(world)]
            leaf.limit = sum(counts)
            per_sample = form == "array" and not per_batch[i]
            if per_sample and maps is not None and placed is not None:
                leaf.maps = list(maps)
                leaf.limit = placed
            if per_sample and num_items is not None:
                leaf.limit = min(leaf.limit, num_items)
        self.per_batch = per_batch
        self.directory = Directory(directory, "gather") if directory is not None else None
        files: list[Path | None] = [None] * len(self.leaves)
        if self.directory is not None:
            files = self.directory.start(spec, columns, ml_dtypes)
        for leaf, file in zip(self.leaves, files, strict=True):
            column = leaf.column
            if column.form in ("object", "jagged"):
                continue
            dtype, trailing, ax = column.dtype, column.trailing or (), column.axis
            assert dtype is not None  # noqa: S101 - every rank described the leaf
            if file is not None:
                leaf.file = GrowingNpy(file, dtype, trailing)
                leaf.file.reserve(leaf.limit)
            else:
                leaf.array = np.empty((*trailing[:ax], leaf.limit, *trailing[ax:]), dtype)

    def _rows(self, per_rank: list[Any]) -> list[Any]:
        """A nested tensor's rows of every rank, in rank (or dataset) order, ``num_items`` kept."""
        if self.maps is None or self.placed is None:
            rows = [row for values in per_rank for row in values]
        else:
            rows = [None] * self.placed
            for values, targets in zip(per_rank, self.maps, strict=True):
                for row, position in zip(values, targets.tolist(), strict=True):
                    if position >= 0:
                        rows[position] = row
        return rows if self.num_items is None else rows[: self.num_items]

    def place_whole(self, index: int, rank: int, value: Any) -> None:
        """The whole converted leaf ``index`` of ``rank``: its value, or all its rows."""
        column = self.leaves[index].column
        form = column.form
        if form in ("object", "jagged"):
            self.leaves[index].values[rank] = value
        else:
            assert form is not None  # noqa: S101
            self.place(index, rank, 0, rows_first(np.asarray(value), form, column.axis))

    def place_local(self, leaves: Sequence[Any]) -> None:
        """A world of one: this rank's leaves, converted by the router, are the only rows."""
        converted = leaves_to_numpy(list(leaves), self.spec, ml_dtypes=self.ml_dtypes)
        for index, value in enumerate(converted):
            self.place_whole(index, 0, value)

    def place_pickled(self, metas: Sequence[RankMeta]) -> None:
        """Every rank's leaves sent in the metadata (not tensors, or arrays NumPy cannot view)."""
        for rank, meta in enumerate(metas):
            for index, info in enumerate(meta.infos):
                if info.code == OBJECT:
                    assert info.payload is not None  # noqa: S101 - an object leaf's pickle
                    value = pickle.loads(info.payload)  # noqa: S301 - sent by a rank of the group
                    self.place_whole(index, rank, value)

    def place_round(
        self,
        metas: Sequence[RankMeta],
        pieces: Sequence[Sequence[Piece]],
        gathered: torch.Tensor,
    ) -> None:
        """Every rank's pieces of one round: ``gathered[r]`` is rank ``r``'s buffer.

        Each piece's rows are a view of the received bytes, bfloat16/float8 ones as
        ``ml_dtypes`` arrays; without ``ml_dtypes`` those are widened to float32 by the
        router, the round's pieces in one call (its bulk pass widens them together).
        """
        host = gathered.cpu()
        host_np = host.numpy()
        widen: list[tuple[Piece, int, torch.Tensor]] = []
        for rank, mine in enumerate(pieces):
            row, row_np = host[rank], host_np[rank]
            for piece in mine:
                info = metas[rank].infos[piece.leaf]
                shape = self._rows_shape(info, piece)
                window = slice(piece.offset, piece.offset + piece.nbytes)
                if self.ml_dtypes or info.code == ARRAY or info.dtype not in _dtypes.ML_DTYPES:
                    rows = row_np[window].view(info.numpy_dtype(self.ml_dtypes)).reshape(shape)
                    self.place(piece.leaf, rank, piece.start, rows)
                else:
                    widen.append((piece, rank, row[window].view(info.dtype).reshape(shape)))
        if widen:
            widened = to_numpy([bits for _, _, bits in widen])
            for (piece, rank, _), rows in zip(widen, widened, strict=True):
                self.place(piece.leaf, rank, piece.start, rows)

    def _rows_shape(self, info: LeafInfo, piece: Piece) -> tuple[int, ...]:
        """The shape of one piece's rows, rows first (``info``: the sending rank's leaf)."""
        shape = info.shape
        assert shape is not None  # noqa: S101
        axis = self.axes[piece.leaf]
        other = (*shape[:axis], *shape[axis + 1 :]) if shape else ()
        return (piece.stop - piece.start, *other)

    def place(self, index: int, rank: int, start: int, rows: np.ndarray) -> None:
        """Rows ``start:start + len(rows)`` (rows first) of leaf ``index`` of ``rank``."""
        leaf = self.leaves[index]
        n = rows.shape[0]
        if leaf.maps is None:  # rank order: one run of rows
            first = leaf.offsets[rank] + start
            n = max(0, min(n, leaf.limit - first))
            if n:
                self._write(leaf, np.arange(first, first + n), rows[:n], run=True)
            return
        target = leaf.maps[rank][start : start + n]
        keep = (target >= 0) & (target < leaf.limit)
        if not keep.all():
            target, rows = target[keep], rows[keep]
        if target.size:
            self._write(leaf, target, rows, run=False)

    def _write(self, leaf: _Leaf, target: np.ndarray, rows: np.ndarray, *, run: bool) -> None:
        """Copy ``rows`` (padded) to rows ``target`` of the leaf's result (one run if ``run``)."""
        column = leaf.column
        fill = column.fill
        trailing = column.trailing or ()
        if leaf.array is not None:
            view = np.moveaxis(leaf.array, column.axis, 0) if column.axis else leaf.array
            if run:
                copy_padded(view[target[0] : target[0] + target.size], rows, fill)
                return
            block = np.empty((target.size, *trailing), dtype=leaf.array.dtype)
            copy_padded(block, rows, fill)
            view[target] = block
            return
        file = leaf.file
        assert file is not None  # noqa: S101
        if rows.shape[1:] != trailing or rows.dtype != file.dtype or not run:
            block = np.empty((target.size, *trailing), dtype=file.dtype)
            copy_padded(block, rows, fill)
            rows = block
        if run:
            file.write_rows(int(target[0]), rows)
            return
        order = np.argsort(target, kind="stable")
        target, rows = target[order], rows[order]
        breaks = np.flatnonzero(np.diff(target) != 1) + 1
        for lo, hi in zip([0, *breaks], [*breaks, target.size], strict=True):
            file.write_rows(int(target[lo]), rows[lo:hi])

    def result(self) -> Any:
        """The gathered tree: arrays (memory-mapped, read-only, with a directory) and lists."""
        out: list[Any] = []
        for i, leaf in enumerate(self.leaves):
            if leaf.column.form == "object" and self.per_batch[i]:  # one list per rank: joined
                out.append([value for per_rank in leaf.values for value in per_rank])
            elif leaf.column.form == "jagged":
                out.append(self._rows(leaf.values))
            elif leaf.column.form == "object":
                out.append(leaf.values)
            elif leaf.file is not None:
                out.append(leaf.file.open(leaf.limit))
            else:
                out.append(leaf.array)
        if self.directory is not None:
            self.directory.finish(self.spec, out, self.ml_dtypes)
        return _tree.unflatten(self.spec, out)
