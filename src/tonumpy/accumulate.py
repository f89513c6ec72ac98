"""Batched predictions: ``concat`` a list of trees, or ``Accumulator`` them batch by batch.

An evaluation loop produces one nested output per batch; the user wants one NumPy array per leaf
at the end. [`concat`][] does it for a list of trees that is already there; an
[`Accumulator`][] takes the batches one at a time, moves each to the host at once (so that
device memory is freed), and writes each leaf's rows once, padded, into one buffer laid out as
the final array, which [`Accumulator.result`][] hands out without a copy (amortised O(batch)
per append: rows written are moved again only, in place, when a longer batch widens them).
With ``directory=`` each leaf grows in a ``.npy`` file instead, for predictions larger than
RAM (or, with ``format="parquet"``, each batch is a row group of one Parquet file:
``tonumpy._rowfiles._parquet_sink``).

How a leaf combines across batches (form, rank, axis, dtype, padding) is the column policy of
``tonumpy._combine._columns``, shared with ``gather`` and ``Activations.concat``; where the rows
live is ``tonumpy._combine._storage``; the directory format is ``tonumpy._combine._directory``'s.
``reduce=`` and ``exclude=`` (``tonumpy._combine._select``) act on each batch before it is
converted.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from optree import PyTreeSpec

from . import _options, _tree
from ._combine._columns import Column, Jagged, check_chunk, join, mark_jagged, rows_first
from ._combine._directory import Directory
from ._combine._indices import as_index
from ._combine._pad import PadValue, check_pad_option
from ._combine._select import Pattern, Selection
from ._combine._storage import GrowingNpy, Rows
from ._convert._transfer import CUDA, CudaEngine, PendingTransfer
from ._dtypes import is_ml_dtype, ml_dtypes_module
from ._rowfiles._shards import Progress, Recovered, recover, recovered_index, shard_name
from .convert import leaves_to_numpy, start
from .errors import ConversionError, OptionError

if TYPE_CHECKING:
    from ._rowfiles._parquet_sink import ParquetSink

__all__ = ["Accumulator", "concat"]

_SAME_STRUCTURE = (
    "every batch must have the same keys, fields and lengths (use None-free outputs, or drop "
    "the differing keys before accumulating)"
)


# ------------------------------------------------------------------------------ concat


def concat(
    trees: Sequence[Any] | Iterable[Any],
    /,
    *,
    axis: int = 0,
    pad_value: PadValue = None,
    reduce: Mapping[Pattern, Callable[[Any], Any]] | None = None,
    exclude: Pattern | list[Pattern] | None = None,
    ml_dtypes: bool = False,
    is_leaf: Callable[[Any], bool] | None = None,
) -> Any:
    """Concatenate a list of trees leaf by leaf into one tree of NumPy arrays.

    Every leaf of the result is that leaf's concatenation along ``axis`` over ``trees``
    (tensors on any device, arrays, or a mix). 0-d leaves are stacked into a 1-d array;
    non-array leaves become a list of the values. A leaf whose batches differ in another
    dimension is padded, in every such dimension, to the largest size, with ``pad_value``;
    padding never changes the dtype. Batches with no rows take no part in the padded shape.
    Batches may differ in dtype only where one dtype holds the others' values exactly
    (``int16`` and ``int32`` give ``int32``; ``int64`` and ``float64`` are an error): the rule
    ``Accumulator``, ``gather`` and ``Activations.concat`` share (the column policy).

    Examples:
        >>> import numpy as np, torch
        >>> batches = [
        ...     {"ids": torch.tensor([[1, 2]]), "loss": torch.tensor(0.5)},
        ...     {"ids": np.array([[3, 4, 5]]), "loss": torch.tensor(0.25)},
        ... ]
        >>> out = concat(batches, pad_value={"ids": -100})
        >>> out["ids"]
        array([[   1,    2, -100],
               [   3,    4,    5]])
        >>> out["loss"]
        array([0.5 , 0.25], dtype=float32)

    Args:
        trees: The batches: any nesting of containers (as for [`tonumpy.to_numpy`][]), all
            of one structure.
        axis: The axis to concatenate along (negative counts from the end of each leaf).
        pad_value: How to pad leaves whose batches differ in size along another axis: a value
            for every leaf; a mapping from key-path pattern to value (a key path is the tuple
            that ``optree.tree_paths`` gives, e.g. ``("labels",)`` or ``("hidden", 2)``; a key
            that is a prefix of a leaf's path covers it, ``()`` covers every leaf, and a bare
            key ``"labels"`` means ``("labels",)``; the longest key that covers a leaf wins);
            or a callable ``(path, dtype) -> value``. ``None`` (or no value for a leaf) makes
            ragged batches an error.
        reduce: A mapping from key-path pattern (as for ``pad_value``) to a function of one
            tensor, run on every tensor (or array) leaf the pattern covers, as it is (on its
            device), under ``torch.no_grad()``, before anything is converted:
            ``{"logits": lambda t: t.argmax(-1)}`` turns ``(batch, seq, vocab)`` logits into
            ``(batch, seq)`` token ids before they leave the device. The function may return a
            container (``t.topk(5)``: values and indices). Where several patterns cover a
            leaf, the longest wins.
        exclude: Key-path patterns (one, or a list) naming parts of each tree to leave out,
            as transformers' ``keys_to_ignore_at_inference`` does: ``["cache",
            "past_key_values"]``. The node a pattern names, and everything under it, is
            replaced by ``None`` (a dict or ``ModelOutput`` keeps the key, with ``None``);
            patterns that name nothing in a tree are ignored. Applied before ``reduce``.
        ml_dtypes: Keep bfloat16 and float8 tensors as bit-exact ``ml_dtypes`` arrays instead
            of widening them to float32 (see [`tonumpy.to_numpy`][]).
        is_leaf: Called on each node; a node it returns True for is treated as a leaf.

    Returns:
        One tree of the batches' structure; every array is newly allocated and owns its memory.

    Raises:
        ConversionError: No trees; the trees differ in structure (the message names the first
            differing path); a leaf differs in rank or kind across trees, or in dtypes no dtype
            holds exactly; or
            ragged batches have no pad value, or one their dtype cannot represent.
        OptionError: ``axis`` is not an int, ``ml_dtypes`` not a bool, a ``pad_value``
            callable cannot take ``(path, dtype)``, ``reduce`` is not a mapping to functions
            of one argument, or ``exclude`` is not a pattern or a list of them.
    """
    axis = _options.check_axis(axis, "concat")
    _options.check_flag(ml_dtypes, "ml_dtypes", "concat")
    check_pad_option(pad_value, "concat")
    selection = Selection(exclude, reduce, "concat", first="trees[0]")
    trees = list(trees)
    if not trees:
        raise ConversionError("concat() needs at least one tree; got an empty sequence")
    flat: list[list[Any]] = []
    spec0: PyTreeSpec | None = None
    for index, tree in enumerate(trees):
        leaves, spec, leaf_types = selection.flatten(tree, is_leaf=is_leaf)
        if spec0 is None:
            spec0 = spec
        _tree.require_same(spec0, spec, "trees[0]", f"trees[{index}]", hint=_SAME_STRUCTURE)
        converted = leaves_to_numpy(leaves, spec, ml_dtypes=ml_dtypes, leaf_types=leaf_types)
        flat.append(mark_jagged(leaves, converted))
    assert spec0 is not None  # noqa: S101 - trees is not empty
    return join(
        flat, spec0, axis=axis, pad_value=pad_value, name=lambda i: f"trees[{i}]", noun="batches"
    )


# ------------------------------------------------------------------------------ Accumulator


class _Leaf:
    """What the accumulator holds for one leaf: its column, and where its rows live."""

    __slots__ = ("column", "file", "rows", "values")

    def __init__(self, column: Column, map_min: int | None) -> None:
        self.column = column
        self.rows = Rows(map_min=map_min)  # in memory
        self.values: list[Any] = []  # non-array leaves
        self.file: GrowingNpy | None = None  # with directory=


class Accumulator:
    """Collect a model's batched outputs and concatenate them once, at the end.

    ``append`` takes one batch: a tree of tensors (on any device) or arrays, of the same
    structure every time. Each batch is moved to the host right away (a batch with CUDA
    tensors asynchronously: its copies overlap the next step, and the next call collects
    them), so device memory is freed as the loop goes. Appending is amortised O(size of the
    batch): each batch is copied once, padded, into a buffer per leaf laid out as the final
    array (a longer batch moves the rows before it to the wider layout, in place), and
    [`result`][] hands that buffer out as the result's memory, so that memory peaks at the
    result's size and nothing is copied twice. Leaves that differ between batches in a
    dimension other than ``axis`` are padded to the largest size with ``pad_value``, without
    changing their dtype; a missing or unrepresentable pad value is reported by the
    ``append`` that brings the first differing batch, not at the end of the loop.

    With ``directory=``, every array leaf instead grows in a ``.npy`` file in that directory
    and [`result`][] returns read-only memory-mapped arrays: memory stays bounded by a few
    batches whatever the total. The directory is in tonumpy's one directory format, the one
    ``tonumpy convert`` writes: ``__tonumpy__.json`` holds the tree's structure and each leaf's
    file name (made from its key path: ``logits.npy``, ``hidden.2.npy``) and exact dtype, so
    [`tonumpy.load`][] and ``tonumpy show`` read the tree back as it was. The files are plain
    ``.npy`` files, valid after every ``append`` (the header is rewritten, with the new row
    count, once the batch's bytes are written), so after a crash ``np.load`` gives every row
    of every batch whose ``append`` returned (a batch of CUDA tensors, whose copies are still in
    flight then: of the call after it). bfloat16/float8 leaves (with ``ml_dtypes=True``)
    are stored as their bits, unsigned integers of the same size, the dtype named in the
    structure. Non-array leaves (and object arrays) stay in memory, and their values are
    written into the structure when [`result`][] is called. A directory that holds another
    run's structure is never written into.

    ``reduce=`` runs a function on chosen leaves of each batch, on the device, before the batch
    is moved (``{"logits": lambda t: t.argmax(-1)}``: token ids instead of ``vocab``-wide
    floats, on the bus and in memory); ``exclude=`` leaves parts of each batch out (a model's
    cache: ``["cache", "past_key_values"]``). Both name leaves by key-path patterns, the forms
    of ``pad_value``'s mapping keys.

    Leaves that are 0-d in every batch (a loss) hold **one value per batch**, not one per
    sample: [`result`][]'s ``num_items`` never cuts them, and [`tonumpy.gather`][] given the
    accumulator itself (``gather(acc, sampler=...)``) gathers them one per batch of every rank,
    in rank order, while it puts the per-sample rows in dataset order.

    ``append``, ``len`` and ``result`` may be called from several threads at once, in memory
    and with ``directory=``. Each batch is added whole: its rows are contiguous in the result,
    never interleaved with another batch's, and the batches are in the order their ``append``
    calls added them (for one thread, the order of the calls; across threads, whichever call
    got there first). A CPU batch is converted before the accumulator is locked, so threads
    overlap that part; the copy into the accumulator's storage is made one batch at a time.

    Examples:
        >>> import torch
        >>> acc = Accumulator(pad_value={"labels": -100})
        >>> for length in (3, 5):
        ...     acc.append({"labels": torch.ones(2, length, dtype=torch.int64),
        ...                 "loss": torch.tensor(0.5)})
        >>> len(acc)
        4
        >>> out = acc.result()
        >>> labels, loss = out["labels"], out["loss"]
        >>> labels.shape, labels[0, -1], loss
        ((4, 5), np.int64(-100), array([0.5, 0.5], dtype=float32))
        >>> acc.result(num_items=3)["labels"].shape  # the per-batch loss keeps its 2 values
        (3, 5)
        >>> acc = Accumulator(reduce={"logits": lambda t: t.argmax(-1)}, exclude="cache")
        >>> acc.append({"logits": torch.eye(3)[None], "cache": [torch.ones(1, 2)]})
        >>> acc.result()
        {'logits': array([[0, 1, 2]]), 'cache': None}

    Args:
        axis: The axis to concatenate along (negative counts from the end of each leaf);
            ``directory=`` needs ``axis=0``.
        pad_value: How to pad ragged leaves, as for [`tonumpy.concat`][]: a value, a mapping
            from key-path pattern to value, or a callable ``(path, dtype) -> value``.
        reduce: A mapping from key-path pattern to a function of one tensor, run on each
            batch's tensors that the pattern covers, on their device and under
            ``torch.no_grad()``, before anything is moved; as for [`tonumpy.concat`][].
        exclude: Key-path patterns (one, or a list) of parts of each batch to leave out: each
            node named is replaced by ``None``; as for [`tonumpy.concat`][].
        directory: Grow each array leaf in a ``.npy`` file under this directory (created if
            needed; it must not hold a structure already) and return memory-mapped arrays.
            File names are made of the key path's characters that are safe in a file name, as
            ``tonumpy convert`` makes them; a name that would be long is cut and ends in a
            digest of the key path. The directory also logs each whole batch
            (``__progress__.npy``), each row's ``index=`` (``__index__.npy``) and whether it is
            complete (``__shard__.json``: ``result()`` and ``close()`` mark it so).
        shard: ``(rank, world_size)``: write into ``directory/rank-RRRRR-of-WWWWW/``, one
            rank's shard of a set that [`tonumpy.load`][] of ``directory`` reads as one tree
            (rows in dataset order with ``index=``; see the guide "Predictions at scale: rank
            shards"). No collective is involved.
        resume: Continue the directory a crashed run left (its whole batches kept, a batch
            cut short dropped; ``batches`` and ``len`` say how far it got); a directory with
            nothing in it is started. Only array leaves can be resumed.
        format: The files' format: ``"npy"`` (one ``.npy`` file per leaf) or ``"parquet"``:
            ``directory/predictions.parquet``, one row per example, a row group written per
            batch (memory holds one batch), readable by every Parquet reader once
            ``result()`` or ``close()`` has closed it (``tonumpy.load`` of the directory gives
            what ``result()`` gives in memory; each row's ``index=`` is a column
            ``__index__``). Rows whose shape changes between batches become variable-length
            lists, per-batch and non-array values go in the file's metadata. A closed file
            takes no more batches, and with ``resume=True`` an incomplete one (no footer: its
            rows were never readable) is started over.
        ml_dtypes: As for [`tonumpy.to_numpy`][]: keep bfloat16/float8 bit-exact as
            ``ml_dtypes`` arrays instead of widening them to float32.
        scalars: As for [`tonumpy.to_numpy`][]: 0-d tensors become Python scalars, so such
            a leaf's result is a list of numbers rather than a 1-d array.
        is_leaf: As for [`tonumpy.to_numpy`][]: nodes it returns True for are leaves.

    Raises:
        OptionError: An option has the wrong type or value (``axis=1.5``, ``ml_dtypes=1``, a
            ``pad_value`` callable that cannot take ``(path, dtype)``, a ``reduce`` value that
            is not a function of one argument, an ``exclude`` that is not a pattern or a list of
            them), ``directory`` is or lies below a file, or ``directory=`` comes with an
            ``axis`` other than 0; ``shard``/``resume`` come without ``directory``, ``shard`` is
            not ``(rank, world_size)``, ``format`` is not ``"npy"`` or ``"parquet"``, or
            ``format="parquet"`` comes without ``directory``.
        FileFormatError: ``resume=True`` and the directory holds files this tonumpy did not
            write as an Accumulator directory, damaged ones, or non-array leaves.
    """

    def __init__(
        self,
        *,
        axis: int = 0,
        pad_value: PadValue = None,
        reduce: Mapping[Pattern, Callable[[Any], Any]] | None = None,
        exclude: Pattern | list[Pattern] | None = None,
        directory: str | os.PathLike[str] | None = None,
        shard: tuple[int, int] | None = None,
        resume: bool = False,
        format: str = "npy",
        ml_dtypes: bool = False,
        scalars: bool = False,
        is_leaf: Callable[[Any], bool] | None = None,
    ) -> None:
        axis = _options.check_axis(axis, "Accumulator")
        _options.check_flags("Accumulator", resume=resume)
        check_format(format, "Accumulator")
        if (shard is not None or resume) and directory is None:
            raise OptionError(
                "Accumulator(shard=..., resume=True) act on a directory: pass directory= too"
            )
        if directory is not None and shard is not None:
            rank, world_size = check_shard(shard, "Accumulator")
            directory = Path(directory) / shard_name(rank, world_size)
        _options.check_flags("Accumulator", ml_dtypes=ml_dtypes, scalars=scalars)
        check_pad_option(pad_value, "Accumulator")
        self._selection = Selection(exclude, reduce, "Accumulator")
        if directory is not None:
            directory = _options.check_directory(directory, "Accumulator")
        if directory is not None and axis != 0:
            raise OptionError(
                f"directory= grows each .npy file along its first axis, so it needs axis=0 "
                f"(got axis={axis}); move the axis to the front before appending"
            )
        self._axis = axis
        self._pad_value = pad_value
        self._sink = _parquet_sink(directory, format, resume)
        self._directory = (
            Directory(Path(directory), "Accumulator")
            if directory is not None and self._sink is None
            else None
        )
        # Held while a batch is added (and while result() reads): appends from several threads
        # each add a whole batch, one after the other.
        self._lock = threading.Lock()
        self._ml_dtypes = ml_dtypes
        self._scalars = scalars
        self._is_leaf = is_leaf
        # The device side of the transfer engine (the tests give an accumulator a double that
        # sends CPU tensors through it, to run the in-flight path without a GPU).
        self._engine: CudaEngine = CUDA
        # Where a leaf's rows in memory move from a NumPy array to a memory map of their own
        # (``None``: ``Rows``' default; the tests lower it to run small leaves through maps).
        self._map_min: int | None = None
        self._spec: PyTreeSpec | None = None  # set once a batch is added
        self._expected: PyTreeSpec | None = None  # set once a batch is accepted
        self._leaves: list[_Leaf] = []
        self._batches = 0  # batches added
        self._sizes: list[int] = []  # rows each batch added to len(self)
        self._received = 0  # batches accepted (added, or in flight)
        # a batch whose copies are in flight: its transfer, structure, name, indices and leaves
        self._pending: (
            tuple[PendingTransfer, PyTreeSpec, str, np.ndarray | None, list[Any]] | None
        ) = None
        self._indexed: bool | None = None  # whether rows carry dataset indices (the first says)
        self._index: list[np.ndarray] = []  # in memory: each batch's indices
        self._progress: Progress | None = None  # with directory=: the log of complete batches
        self._recovered: Recovered | None = None
        if self._directory is not None and resume:
            self._recovered = recover(self._directory.path)
        if self._recovered is not None:
            self._batches = self._received = self._recovered.batches
            self._indexed = self._recovered.indexed if self._recovered.batches else None

    # -- appending -----------------------------------------------------------------------

    def append(self, tree: Any, /, *, index: Any = None) -> None:
        """Add one batch and start moving it to the host.

        CPU batches are converted (and copied) before this returns. A batch with CUDA tensors
        is copied asynchronously: its copies are enqueued on the current stream and overlap
        the next step, and the next call (``append``, ``len`` or ``result``) waits for them;
        the device memory is released then. Problems found in that batch's contents are
        therefore raised by that next call, naming the batch.

        Args:
            tree: The batch: the same structure as every other batch.
            index: Each row's dataset index (``batch["idx"]``, or the indices the sampler
                gave the batch): a 1-d tensor, array or list of ints ``>= 0``, one per row of
                every per-sample leaf (array leaves; 0-d leaves hold one value per batch).
                Pass it with every batch or with none. ``result()`` keeps the rows in the
                order appended; ``gather(acc)`` and a set of shards read with
                ``tonumpy.load`` put them in dataset order, drop padding and, with
                ``num_items``, prove every index of ``range(num_items)`` is there once.

        Raises:
            ConversionError: The batch's structure differs from the first batch's (the message
                names the first differing path), a leaf changes kind or rank, its dtype and
                the earlier batches' have no common dtype, or it is ragged and has no pad value
                that fits its dtype; or ``index`` is not one int ``>= 0`` per row, or is given
                for some batches and not others. The batch is then not added, and the
                accumulator is left as it was.
        """
        leaves, spec, leaf_types = self._selection.flatten(tree, is_leaf=self._is_leaf)
        expected = self._expected  # checked again under the lock; this spares the conversion
        if expected is not None:
            received = f"batch {self._received}"
            _tree.require_same(expected, spec, "batch 0", received, hint=_SAME_STRUCTURE)
        rows = None if index is None else _batch_rows(leaves, spec, self._axis)
        indices = None if index is None else as_index(index, rows, "append")
        # Before the lock, so that threads convert in parallel: CPU tensors are converted
        # (zero-copy views, copied into the accumulator's storage under the lock), CUDA
        # tensors' copies enqueued (the next call collects them).
        pending = start(
            leaves,
            spec,
            ml_dtypes=self._ml_dtypes,
            scalars=self._scalars,
            leaf_types=leaf_types,
            engine=self._engine,
        )
        with self._lock:
            name = f"batch {self._received}"
            if self._expected is not None:
                _tree.require_same(self._expected, spec, "batch 0", name, hint=_SAME_STRUCTURE)
            if self._indexed is not None and self._indexed != (indices is not None):
                raise ConversionError(
                    f"append(): {name} comes {'without' if self._indexed else 'with'} index= "
                    f"but the batches before it came {'with' if self._indexed else 'without'}: "
                    "pass each batch's dataset indices with every batch, or with none"
                )
            self._finish_pending()
            if pending.done():
                self._ingest(mark_jagged(leaves, pending.result_leaves()), spec, name, indices)
            else:
                self._pending = (pending, spec, name, indices, leaves)
            if self._expected is None:
                self._expected = spec
            self._indexed = indices is not None
            self._received += 1

    def _finish_pending(self) -> None:
        """Wait for the batch whose copies are in flight, and add it."""
        if self._pending is None:
            return
        pending, spec, name, indices, leaves = self._pending
        self._pending = None
        try:
            self._ingest(mark_jagged(leaves, pending.result_leaves()), spec, name, indices)
        except BaseException:
            if self._spec is None:  # the first batch failed: the next one sets the structure
                self._expected = None
                self._indexed = None
            raise

    def _ingest(
        self, host: list[Any], spec: PyTreeSpec, name: str, indices: np.ndarray | None
    ) -> None:
        """Check every leaf of one batch against its column, then add them all."""
        first = self._spec is None
        leaves = self._leaves
        if first:
            leaves = [
                _Leaf(
                    Column(path, place, axis=self._axis, pad_value=self._pad_value, noun="batches"),
                    self._map_min,
                )
                for path, place in _tree.leaf_paths(spec)
            ]
            if self._recovered is not None:
                self._adopt(spec, leaves, self._recovered, indices is not None)
                first = False
        states = [
            check_chunk(leaf.column, value, name) for leaf, value in zip(leaves, host, strict=True)
        ]
        if self._sink is not None:
            self._sink.check([leaf.column for leaf in leaves], states, host, name)
        before = self._rows()
        for leaf, state in zip(leaves, states, strict=True):
            leaf.column.commit(state)
        if first:
            self._start(spec, leaves, indices is not None)
        if self._sink is not None:  # one row group
            self._sink.write(spec, [leaf.column for leaf in leaves], host, indices)
        else:
            for leaf, value in zip(leaves, host, strict=True):
                self._store(leaf, value)
        self._batches += 1
        if indices is not None and self._progress is None:
            self._index.append(indices)
        if self._directory is not None:
            self._directory.update([leaf.column for leaf in leaves])
        if self._progress is not None:  # last: the batch is whole in every file
            self._progress.record(
                self._batches,
                indices,
                [leaf.file for leaf in leaves],
                [leaf.column.trailing for leaf in leaves],
            )
        self._sizes.append(self._rows() - before)

    def _start(self, spec: PyTreeSpec, leaves: list[_Leaf], indexed: bool) -> None:
        """Adopt the first batch's structure; with ``directory=``, create the files."""
        if self._directory is not None:
            try:
                _refuse_jagged(leaves)
                files = self._directory.start(
                    spec, [leaf.column for leaf in leaves], self._ml_dtypes
                )
            except BaseException:
                for leaf in leaves:
                    leaf.column.state = type(leaf.column.state)()  # the batch is not added
                raise
            for leaf, file_path in zip(leaves, files, strict=True):
                column = leaf.column
                if file_path is not None and column.dtype is not None:
                    leaf.file = GrowingNpy(file_path, column.dtype, column.trailing or ())
            self._progress = Progress(
                self._directory.path,
                [leaf.column.form or "object" for leaf in leaves],
                [None if f is None else f.stem for f in files],
                [_bits_name(leaf.column.dtype) for leaf in leaves],
                [len(leaf.file.trailing) if leaf.file is not None else 0 for leaf in leaves],
                indexed=indexed,
                recovered=None,
            )
        self._spec = spec
        self._leaves = leaves

    def _adopt(
        self, spec: PyTreeSpec, leaves: list[_Leaf], recovered: Recovered, indexed: bool
    ) -> None:
        """Continue the directory an earlier run left (``resume=True``) with this structure."""
        assert self._directory is not None  # noqa: S101 - append checked index= against it
        if len(leaves) != len(recovered.forms):
            raise ConversionError(
                f"{self._directory.path} holds {len(recovered.forms)} leaves but the batch has "
                f"{len(leaves)}: resume=True continues a run with the same outputs"
            )
        files = self._directory.adopt(
            spec, [leaf.column for leaf in leaves], self._ml_dtypes, recovered.names
        )
        for i, (leaf, file_path) in enumerate(zip(leaves, files, strict=True)):
            assert file_path is not None  # noqa: S101 - every leaf is an array leaf
            bits = recovered.bits[i]
            real = np.dtype(getattr(ml_dtypes_module(), bits)) if bits else None
            leaf.file = GrowingNpy.adopt(file_path, recovered.rows[i], real)
            form = recovered.forms[i]
            file, column = leaf.file, leaf.column
            shape = recovered.trailing[i]  # a file grown with room to spare exceeds it
            if len(shape) != len(file.trailing) or not all(
                0 < s <= t for s, t in zip(shape, file.trailing, strict=True)
            ):
                shape = file.trailing
            state = column.check(
                "scalar" if form == "scalar" else "array",
                file.dtype,
                () if form == "scalar" else (file.rows, *shape),
                "the rows written before",
            )
            if form == "scalar":
                state = state._replace(rows=file.rows)
            column.commit(state)
        self._directory.update([leaf.column for leaf in leaves])
        self._progress = Progress(
            self._directory.path,
            recovered.forms,
            recovered.files,
            recovered.bits,
            [len(t) for t in recovered.trailing],
            indexed=indexed,
            recovered=recovered,
        )
        self._spec = spec
        self._leaves = leaves
        self._recovered = None

    def _store(self, leaf: _Leaf, value: Any) -> None:
        """Copy one batch's value of a leaf into its storage (the column has accepted it)."""
        column = leaf.column
        form = column.form
        if form == "object":
            leaf.values.append(value)
            return
        if form == "jagged":  # a nested tensor's rows join the rows of the batches before
            leaf.values.extend(value)
            return
        assert form is not None  # noqa: S101
        chunk = rows_first(value, form, column.axis)
        dtype, trailing = column.dtype, column.trailing
        if chunk.shape[0] == 0 or dtype is None or trailing is None:
            return
        if leaf.file is None:
            fill = column.fill
            if fill is None and trailing != chunk.shape[1:]:
                fill = column.pad_value()
            leaf.rows.append(chunk, dtype, trailing, fill)
            return
        file = leaf.file
        if file.rows == 0 and (file.dtype != dtype or file.trailing != trailing):
            file.reset(dtype, trailing)  # the first rows decide, not an earlier empty batch
        elif file.dtype != dtype:  # promoted: the rows written so far are widened
            widest = tuple(max(a, b) for a, b in zip(trailing, file.trailing, strict=True))
            file.relayout(widest, column.fill, dtype)
        fill = column.fill if column.fill is not None else column.pad_value()
        file.grow_to(trailing, fill)
        file.append(chunk, fill)

    # -- reading ---------------------------------------------------------------------------

    @property
    def matched(self) -> dict[str, dict[Any, list[tuple[Any, ...]]]]:
        """What each ``exclude=`` and ``reduce=`` pattern matched in the batches so far.

        ``{"exclude": {pattern: [key path]}, "reduce": {pattern: [key path, ...]}}``, each
        pattern as it was given: an exclude pattern lists the node it names (none if the
        batches have no such node), a reduce pattern the leaves it reduces (where several
        patterns cover a leaf, the longest takes it). A pattern with no key path matched
        nothing; the first batch warned about it (``UnmatchedPatternWarning``).

        Examples:
            >>> import torch, warnings
            >>> acc = Accumulator(reduce={"logits": len, ("out", "logits"): len})
            >>> with warnings.catch_warnings():
            ...     warnings.simplefilter("ignore")
            ...     acc.append({"out": {"logits": torch.ones(2, 3), "hidden": torch.ones(2)}})
            >>> acc.matched["reduce"]
            {'logits': [], ('out', 'logits'): [('out', 'logits')]}
        """
        return self._selection.matched()

    def __repr__(self) -> str:
        with self._lock:
            parts = [f"batches={self._batches}", f"leaves={len(self._leaves)}"]
            in_flight = self._pending is not None
        if in_flight:
            parts.append("in_flight=1")
        if self._directory is not None or self._sink is not None:
            path = self._sink.path if self._sink is not None else self._directory.path  # type: ignore[union-attr]
            parts.append(f"directory={str(path)!r}")
        return f"Accumulator({', '.join(parts)})"

    def __len__(self) -> int:
        """The number of rows so far: those of the first leaf with a rows axis.

        That is the first array leaf (in the tree's leaf order), else the first nested-tensor
        leaf, else the first 0-d leaf (one row per batch); for a tree with none, the number of
        batches.
        """
        with self._lock:
            self._finish_pending()
            return self._rows()

    @property
    def batch_sizes(self) -> np.ndarray:
        """How many rows each batch added, in the order the batches were added (``int64``).

        A batch's size is what it added to ``len(self)``: the size along ``axis`` (dim 0 by
        default) of its first array leaf (else of its first nested-tensor leaf), the leaves
        that hold one row per sample; 1 for a tree with neither. ``batch_sizes.sum() ==
        len(acc)``. Kept beside the values that are one per batch (a 0-d loss), to weight them:
        the mean loss per sample, as ``Trainer`` reports it, is ``(loss * sizes).sum() /
        sizes.sum()``. Across ranks, ``tonumpy.gather(acc.batch_sizes)`` lines the sizes up with
        the per-batch values ``gather(acc, ...)`` gives (both in rank order). After
        ``resume=True`` only the batches appended since are listed: the sizes of the run
        before's batches are not recorded in the directory.

        Examples:
            >>> import torch
            >>> acc = Accumulator()
            >>> acc.append({"x": torch.ones(4, 2), "loss": torch.tensor(1.0)})
            >>> acc.append({"x": torch.ones(1, 2), "loss": torch.tensor(6.0)})
            >>> sizes, loss = acc.batch_sizes, acc.result()["loss"]
            >>> sizes, float((loss * sizes).sum() / sizes.sum())
            (array([4, 1]), 2.0)
        """
        with self._lock:
            self._finish_pending()
            return np.array(self._sizes, dtype=np.int64)

    def _rows(self) -> int:
        recovered = self._recovered
        if recovered is not None:  # resume=True, before the first append: the run before's
            for form in ("array", "scalar"):
                for k, rows in zip(recovered.forms, recovered.rows, strict=True):
                    if k == form:
                        return rows
        for form in ("array", "jagged", "scalar"):
            for leaf in self._leaves:
                if leaf.column.form == form:
                    return leaf.column.rows
        return self._batches

    def result(self, *, num_items: int | None = None) -> Any:
        """The concatenated tree (of the first batch's structure).

        In memory (with ``axis=0``), each array is the accumulator's buffer for that leaf,
        handed over without a copy: memory peaks at the result's size. Every returned array is
        writable, shares memory with no input and no other array, and alone keeps its memory
        alive (exactly its own bytes: a large one's ``.base`` chain ends in the anonymous
        memory map that holds them), so it outlives the accumulator. The returned arrays are
        also kept as the accumulator's storage: calling ``result()`` again returns the same
        arrays if nothing was appended since, and appending more then calling ``result()``
        builds new arrays (the old ones are left as they are). Modify returned arrays in place
        only once you are done with the accumulator.

        Args:
            num_items: Return only the first ``num_items`` rows of every per-sample leaf (one
                with at least one dimension; leaves with fewer rows keep them all). Leaves that
                hold one value per batch (0-d in every batch, such as a loss, and non-array
                leaves) are never cut. Useful in a single process whose loader repeats samples
                at the end to fill its last batch; in a distributed run each rank holds only
                its share, and ``gather(acc, sampler=...)`` (or ``gather(...,
                num_items=...)``) drops the samples the sampler repeated.

        Returns:
            A tree of arrays (memory-mapped with ``directory=``) and lists (non-array leaves).

        Raises:
            ConversionError: Nothing was appended, or ``num_items`` is more than ``len(self)``.
            OptionError: ``num_items`` is not ``None`` or an int ``>= 0``.
        """
        num_items = _options.check_num_items(num_items, "result")
        with self._lock:
            out = self._result_leaves(num_items)
            assert self._spec is not None  # noqa: S101 - checked by _result_leaves
            return _tree.unflatten(self._spec, out)

    def _result_leaves(self, num_items: int | None) -> list[Any]:
        """The result's leaves (under the lock): what ``result`` and ``gather`` hand out."""
        self._finish_pending()
        if self._spec is None:
            raise ConversionError(
                "result() was called before any append(); there is nothing to concatenate"
            )
        rows = self._rows()
        if num_items is not None and num_items > rows:
            raise ConversionError(
                f"num_items={num_items} but the accumulator holds {rows} rows; pass a number "
                "between 0 and len(accumulator). In a distributed run each rank holds only its "
                "share of the dataset: pass the accumulator to gather(acc, sampler=...) to drop "
                "the samples a DistributedSampler repeated (or gather(..., num_items=N) for a "
                "sampler that shards contiguously)"
            )
        if self._sink is not None:
            columns = [leaf.column for leaf in self._leaves]
            self._sink.close(self._spec, columns, self._batches, None, self._ml_dtypes)
            return self._sink.result(columns, num_items)
        out = [self._leaf_result(leaf, num_items) for leaf in self._leaves]
        if self._directory is not None:
            values = [leaf.values for leaf in self._leaves]
            self._directory.finish(self._spec, values, self._ml_dtypes)
        if self._progress is not None:
            self._progress.finish(self._batches, [leaf.column for leaf in self._leaves], None)
        return out

    @property
    def batches(self) -> int:
        """The number of batches added (with ``resume=True``, those of the run before too)."""
        with self._lock:
            self._finish_pending()
            return self._batches

    def indices(self) -> np.ndarray | None:
        """Every row's dataset index, in the order appended (``None`` without ``index=``).

        With ``directory=``, a read-only memory map of the directory's ``__index__.npy``.
        """
        with self._lock:
            self._finish_pending()
            progress, recovered = self._progress, self._recovered
            if progress is not None and progress.index is not None:
                return progress.index.open(progress.index.rows)
            if recovered is not None and recovered.indexed and self._directory is not None:
                return recovered_index(self._directory.path, recovered)
            if not self._indexed:
                return None
            return np.concatenate(self._index) if self._index else np.empty(0, np.int64)

    def close(self, *, num_items: int | None = None) -> None:
        """Mark the ``directory=`` complete: a set of shards reads only complete shards.

        ``result()`` marks it complete too; ``close`` also works on a rank that appended
        nothing (an empty shard, which the set reads as holding no rows) and records
        ``num_items``: with ``index=``, readers of the set then prove that every index of
        ``range(num_items)`` appears exactly once. Appending after ``close`` makes the
        directory incomplete again until the next ``close`` or ``result``.

        Raises:
            OptionError: The accumulator has no ``directory=``, or ``num_items`` is not an
                int ``>= 0``.
        """
        num_items = _options.check_num_items(num_items, "close")
        if self._sink is not None:
            with self._lock:
                self._finish_pending()
                if self._spec is None:
                    Progress.empty(self._sink.path, num_items)
                    return
                columns = [leaf.column for leaf in self._leaves]
                self._sink.close(self._spec, columns, self._batches, num_items, self._ml_dtypes)
            return
        if self._directory is None:
            raise OptionError(
                "close() marks an Accumulator(directory=...) complete; this one keeps its "
                "rows in memory: call result()"
            )
        with self._lock:
            self._finish_pending()
            if self._spec is None and self._recovered is None:
                Progress.empty(self._directory.path, num_items)
                return
            if self._spec is not None:
                self._result_leaves(None)
            assert self._progress is not None or self._recovered is not None  # noqa: S101
            if self._progress is not None:
                columns = [leaf.column for leaf in self._leaves]
                self._progress.finish(self._batches, columns, num_items)
                return
            raise ConversionError(
                f"close(): nothing was appended since resume=True; {self._directory.path} "
                "stays as the run before left it. Append the batches it lacks (skip the first "
                "acc.batches of the loader), then close()"
            )

    def __tonumpy_gather_options__(self) -> dict[str, Any]:
        """The options ``gather(acc)`` uses unless the call passes its own (internal protocol).

        ``axis``, ``pad_value`` and ``ml_dtypes``, as this Accumulator was given them.
        """
        return {"axis": self._axis, "pad_value": self._pad_value, "ml_dtypes": self._ml_dtypes}

    def __tonumpy_gather__(self) -> GatherInput:
        """What ``gather(acc)`` sends: tonumpy's internal protocol between the two features.

        The leaves, structure, per-batch leaves and rows' dataset indices, as a
        ``GatherInput`` record. A leaf holds one value per batch when
        it was 0-d or not an array in every batch: ``gather`` never reorders such values like
        per-sample rows. The indices are those ``append(..., index=)`` was given (``None``
        without).
        """
        with self._lock:
            out = self._result_leaves(None)
            assert self._spec is not None  # noqa: S101
            per_batch = [leaf.column.form in ("scalar", "object") for leaf in self._leaves]
            out = [
                Jagged(value) if leaf.column.form == "jagged" else value
                for leaf, value in zip(self._leaves, out, strict=True)
            ]
        return GatherInput(out, self._spec, per_batch, self.indices())

    def _leaf_result(self, leaf: _Leaf, num_items: int | None) -> Any:
        column = leaf.column
        rows = column.rows if column.form != "object" else len(leaf.values)
        per_batch = column.form in ("scalar", "object")
        keep = rows if num_items is None or per_batch else min(rows, num_items)
        if column.form == "object":
            return leaf.values[:keep]
        if column.form == "jagged":
            return leaf.values[:keep]  # a new list of the rows
        if leaf.file is not None:
            file, trailing = leaf.file, column.trailing
            if file.rows and trailing is not None and file.trailing != trailing:
                file.relayout(trailing, column.fill)  # trim a geometric surplus
            return file.open(keep)
        return leaf.rows.result(column, keep)


class GatherInput(NamedTuple):
    """What [`Accumulator.__tonumpy_gather__`][] gives ``gather``: one rank's input, described."""

    leaves: list[Any]  #: the result's leaves, in leaf order
    spec: PyTreeSpec  #: the result's structure
    per_batch: list[bool]  #: for each leaf, whether it holds one value per batch
    indices: np.ndarray | None  #: the rows' dataset indices (``append(..., index=)``), or None


def _refuse_jagged(leaves: list[_Leaf]) -> None:
    """Raise for a nested tensor leaf: ``directory=`` stores rows in ``.npy`` files of one shape."""
    for leaf in leaves:
        if leaf.column.form == "jagged":
            raise ConversionError(
                f"Accumulator(directory=...) grows each leaf in a .npy file of equal-length "
                f"rows, but {leaf.column.place} is a nested (jagged) tensor; pad it first "
                "(t.to_padded_tensor(0.0)) or accumulate without directory=",
                path=leaf.column.path,
            )


def check_format(format: Any, caller: str) -> None:
    """Raise unless ``format`` names a format ``directory=`` writes (``"npy"``, ``"parquet"``)."""
    if format not in ("npy", "parquet"):
        raise OptionError(
            f"{caller}(format={format!r}): format= takes 'npy' (a .npy file per leaf, the "
            "directory format tonumpy.load reads) or 'parquet' (one Parquet file, a row group "
            "per batch)"
        )


def _parquet_sink(
    directory: str | os.PathLike[str] | None, format: str, resume: bool
) -> ParquetSink | None:
    """The Parquet file of ``directory=`` with ``format="parquet"`` (else ``None``)."""
    if format != "parquet":
        return None
    if directory is None:
        raise OptionError(
            "Accumulator(format='parquet') names the files of directory=: pass directory= too "
            "(in memory, save the result with tonumpy.save('x.parquet', acc.result()))"
        )
    from ._rowfiles._parquet_sink import ParquetSink  # noqa: PLC0415 - pyarrow only when asked for

    return ParquetSink(Path(directory), resume=resume)


def check_shard(shard: Any, caller: str) -> tuple[int, int]:
    """``shard`` as ``(rank, world_size)``, ``0 <= rank < world_size``, or an error."""
    ok = (
        isinstance(shard, tuple)
        and len(shard) == 2
        and all(isinstance(n, int | np.integer) and not isinstance(n, bool) for n in shard)
        and 0 <= shard[0] < shard[1]
    )
    if not ok:
        raise OptionError(
            f"{caller}(shard={shard!r}): shard= takes (rank, world_size), two ints with "
            "0 <= rank < world_size (torch.distributed's get_rank() and get_world_size(), or "
            "trainer.global_rank and trainer.world_size)"
        )
    return int(shard[0]), int(shard[1])


def _batch_rows(leaves: list[Any], spec: PyTreeSpec, axis: int) -> int | None:
    """The rows of a batch's per-sample leaves (those with a shape), all alike, or an error."""
    rows: int | None = None
    first = 0
    for i, leaf in enumerate(leaves):
        shape = getattr(leaf, "shape", None)  # torch.Size is a tuple
        if not isinstance(shape, tuple | list) or len(shape) == 0:
            continue  # not an array, or one value per batch
        n = int(shape[axis]) if -len(shape) <= axis < len(shape) else None
        if n is None:
            continue  # the column reports the axis
        if rows is None:
            rows, first = n, i
        elif n != rows:
            (_, one), (_, other) = _tree.leaf_path(spec, first), _tree.leaf_path(spec, i)
            raise ConversionError(
                f"append(index=...): {one} has {rows} rows but {other} has {n}; with index= "
                "every array leaf holds one row per dataset item (compute per-token values per "
                "item, or accumulate them in another Accumulator)"
            )
    return rows


def _bits_name(dtype: np.dtype[Any] | None) -> str | None:
    """The ``ml_dtypes`` name of rows stored as their bits, else None."""
    return dtype.name if dtype is not None and is_ml_dtype(dtype) else None
