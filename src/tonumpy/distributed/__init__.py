"""``gather``: collect a tree of predictions from every ``torch.distributed`` rank as NumPy.

Every rank calls [`gather`][] with its own tree (or [`tonumpy.Accumulator`][]), of one
structure everywhere. The call costs one small metadata exchange (``all_gather_object``: a
structure fingerprint, each leaf's shape and dtype, the options, and the values of non-tensor
leaves), checked on every rank alike (``tonumpy.distributed._metadata``): anything that can go wrong
there makes *every* rank raise the same error before any data moves, instead of leaving the others
waiting in a collective forever.

From the same records every rank makes the same plan (``tonumpy.distributed._metadata.agree``):
each leaf's column (dtype, padded shape, pad value), where each rank's rows go, and the rounds
the tensor data moves in: every rank's leaves are cut into pieces of whole rows, at most
``chunk_bytes`` per rank and round (bfloat16 and float8 as their raw bits), packed into one
``uint8`` buffer per rank (``tonumpy.distributed._packing``), padded to the longest buffer of the
round (gloo rejects uneven ``all_gather``, and crashes on zero-element ones), and all-gathered
(or gathered to ``dst``): **one** collective per round, and one round for trees up to
``chunk_bytes`` per rank (by default 64 MiB per round in all, shared among the ranks).
Receivers copy each piece straight to its rows of the result
(``tonumpy.distributed._destination``: padded, in rank or dataset order), so they hold the result
(or, with ``directory=``, nothing of it) plus one round. Leaves that cannot travel as raw bytes
are converted through the router (``tonumpy.convert``), as ``to_numpy`` converts them; the
bfloat16/float8 rows received are bit views (``ml_dtypes=True``) or widened to float32 by the
router, a round's pieces in one call. PyTorch's distributed engine (gloo on CPU, NCCL on GPU)
does all the communication; ``torch.distributed`` is imported only when ``gather`` runs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from optree import PyTreeSpec

from .. import _options
from .._combine._pad import PadValue, check_pad_option
from .._combine._select import Pattern, Selection
from ..accumulate import Accumulator
from ..errors import OptionError
from . import _metadata
from ._destination import Destination
from ._metadata import Plan, RankMeta, Signature, round_size
from ._packing import Prepared, full_tensors, make_pieces, pack_round, prepare, rows_first_bytes

if TYPE_CHECKING:  # pragma: no cover
    from torch.distributed import ProcessGroup

__all__ = ["gather"]

#: Bytes of one round, all ranks together, by default: each rank sends its share (at least
#: ``MIN_CHUNK``), so a receiver holds about this much of the data at a time, whatever the world.
ROUND_BYTES = 64 << 20
MIN_CHUNK = 1 << 20


# ------------------------------------------------------------------------------ gather


def gather(
    tree: Any,
    /,
    *,
    dst: int | None = None,
    group: ProcessGroup | None = None,
    axis: int | None = None,
    pad_value: PadValue = None,
    sampler: Any = None,
    num_items: int | None = None,
    reduce: Mapping[Pattern, Callable[[Any], Any]] | None = None,
    exclude: Pattern | list[Pattern] | None = None,
    directory: str | os.PathLike[str] | None = None,
    chunk_bytes: int | None = None,
    ml_dtypes: bool | None = None,
    is_leaf: Callable[[Any], bool] | None = None,
) -> Any:
    """Gather a tree from every rank, concatenated over the ranks, as NumPy.

    Call it on every rank of ``group`` with that rank's tree (one structure everywhere). Each
    leaf is concatenated over the ranks, in rank order, along ``axis``, exactly as
    [`tonumpy.concat`][] concatenates batches: ranks may hold different numbers of rows (zero
    included); other dimensions may differ and are padded with ``pad_value``; 0-d leaves become
    one value per rank; non-tensor leaves become a list with one value per rank. Without an
    initialised process group (or with a group of one), it returns ``concat([tree])``.

    Pass an [`tonumpy.Accumulator`][] instead of a tree to gather its result: the leaves that
    were 0-d in every batch (a loss: one value per batch) are then gathered one per batch of
    every rank, in rank order, and neither reordered by ``sampler`` nor cut by ``num_items``;
    the other array leaves hold one row per sample. The accumulator's ``axis``, ``pad_value``
    and ``ml_dtypes`` are used unless the call passes its own (its ``reduce`` and ``exclude``
    were applied as the batches came).

    The data moves in rounds of at most ``chunk_bytes`` per rank (by default 64 MiB per round in
    all), one collective each, and each round is copied into the result as it arrives: a
    receiving rank's memory peaks near the result plus a round or two (gloo copies a round
    through a buffer of its own), or, with ``directory=``, near a round or two alone.

    Examples:
        >>> import torch
        >>> out = gather({"logits": torch.ones(2, 3), "loss": torch.tensor(0.5), "name": "a"})
        >>> out["logits"].shape, out["loss"], out["name"]
        ((2, 3), array([0.5], dtype=float32), ['a'])

    Args:
        tree: This rank's tree: any nesting of containers holding tensors (any device, dtype
            and layout; DTensors are materialised with ``full_tensor()``, a collective every
            rank joins), arrays and other picklable values; or this rank's
            [`tonumpy.Accumulator`][] (every rank then passes one).
        dst: The global rank to return the result on (``None``, the default: every rank).
        group: The process group to gather over (default: the whole world).
        axis: The axis to concatenate along (negative counts from the end of each leaf).
            ``None`` (the default): the Accumulator's ``axis`` when ``tree`` is one, else 0.
        pad_value: How to pad leaves whose ranks differ in size along another axis: a value,
            a mapping from key-path pattern to value, or a callable ``(path, dtype) ->
            value``, as for [`tonumpy.concat`][]. ``None`` (the default): the Accumulator's
            ``pad_value`` when ``tree`` is one; otherwise such leaves are an error.
        sampler: The ``torch.utils.data.DistributedSampler`` that split the dataset (or any
            object with its ``num_replicas``, ``rank``, ``total_size``, ``shuffle``, ``seed``,
            ``epoch`` and ``dataset``). Rows of per-sample leaves (array leaves, except an
            Accumulator's per-batch ones) are put back in dataset order and the samples the
            sampler repeated to even out the ranks are dropped: row ``i`` is dataset item ``i``
            (with ``shuffle=True`` too; with ``drop_last=True`` the items the sampler left out
            are missing and the rest are in dataset order). Every per-sample leaf must then
            hold one row per sample of its rank.
        num_items: Keep only the first ``num_items`` rows of each per-sample leaf (after
            reordering); for samplers that shard the dataset contiguously, the dataset size.
        reduce: As for [`tonumpy.concat`][]: functions run on this rank's tensors, on their
            device, before anything is sent (not with an Accumulator, which reduced its
            batches as they came).
        exclude: As for [`tonumpy.concat`][]: parts of the tree to leave out (replaced by
            ``None``) before anything is sent (not with an Accumulator).
        directory: Write the result into this directory on each receiving rank, in the
            directory format of [`tonumpy.Accumulator`][] and ``tonumpy convert``
            (``__tonumpy__.json`` and one ``.npy`` per array leaf, never overwriting another
            run's), and return read-only memory-mapped arrays. Needs ``axis=0``. With
            ``dst=None`` every rank receives: give each its own directory.
        chunk_bytes: The most bytes a rank sends in one round (a row larger than that goes
            alone); every rank must pass the same. ``None``: 64 MiB divided among the ranks
            (at least 1 MiB each).
        ml_dtypes: Return bfloat16/float8 leaves bit-exact as ``ml_dtypes`` arrays instead
            of widening them to float32. ``None`` (the default): the Accumulator's
            ``ml_dtypes`` when ``tree`` is one, else ``False``.
        is_leaf: Called on each node; a node it returns True for is treated as a leaf.

    Returns:
        On ``dst`` (or on every rank when ``dst`` is ``None``), one tree of the input's
        structure whose arrays own their memory (or map the files of ``directory``); ``None``
        on the other ranks.

    Raises:
        ConversionError: On every rank, when any rank's tree differs in structure, in a leaf's
            kind, number of dimensions or dtype, has leaves that cannot be padded, or could
            not be prepared; or when the ranks pass different options. The message names
            the ranks and the path.
        ValueError: ``dst`` is not a rank of ``group``, or this process is not in ``group``.
        OptionError: ``axis``, ``num_items`` or ``chunk_bytes`` is not an int (``num_items``
            one ``>= 0``, ``chunk_bytes`` ``None`` or one ``>= 1``), ``ml_dtypes`` not a bool, a
            ``pad_value`` callable cannot take ``(path, dtype)``, ``reduce``/``exclude`` are
            malformed or come with an Accumulator, or ``directory`` is a file or comes with an
            axis other than 0; raised before any exchange.
        FileExistsError: Only on a receiving rank, after the exchange (so that no rank is left
            waiting): ``directory`` holds another run's files. Errors writing the result are
            raised the same way.
    """
    axis, pad_value, ml_dtypes = _defaults(tree, axis, pad_value, ml_dtypes)
    axis, num_items = _checked_arguments(axis, num_items, ml_dtypes, pad_value, chunk_bytes)
    signature = Signature(dst, axis, num_items, sampler is not None, ml_dtypes, chunk_bytes)
    selection = Selection(exclude, reduce, "gather", first="this rank's tree", stacklevel=5)
    folder = _checked_destination(tree, selection, directory, axis)
    import torch.distributed as dist  # noqa: PLC0415 - keeps `import tonumpy` light

    world, rank, is_dst = _locate(dist, group, dst)
    exchange = None if world == 1 else _Exchange(dist, group, dst=dst, is_dst=is_dst)
    device = None if exchange is None else exchange.device
    prep, mine = _describe(tree, selection, is_leaf, sampler, signature, device=device)
    metas = _all_metadata(dist, group, mine, world)
    _metadata.check_all(metas, prep.error, rank)
    spec = prep.spec
    assert spec is not None  # noqa: S101
    plan = _metadata.agree(
        metas,
        spec,
        None if exchange is None else (dist, group),
        pad_value=pad_value,
        chunk_bytes=chunk_bytes or max(ROUND_BYTES // world, MIN_CHUNK),
    )
    full_tensors(prep)  # every rank agrees: materialise DTensors (in leaf order, on every rank)
    destination, failure = None, None
    if is_dst:
        destination, failure = _open_destination(spec, plan, metas, signature, folder)
    if exchange is not None:
        failure = exchange.run(prep, metas, plan, destination, failure=failure)
    elif destination is not None and failure is None:
        destination.place_local(prep.sources)
    if failure is not None:
        raise failure
    return None if destination is None else destination.result()


def _all_metadata(dist: Any, group: Any, payload: RankMeta, world: int) -> list[RankMeta]:
    """Every rank's metadata, in rank order (this rank's alone in a world of one)."""
    if world == 1:
        return [payload]
    metas: list[Any] = [None] * world
    dist.all_gather_object(metas, payload, group=group)
    return metas


def _open_destination(
    spec: PyTreeSpec,
    plan: Plan,
    metas: Sequence[RankMeta],
    signature: Signature,
    folder: Path | None,
) -> tuple[Destination | None, Exception | None]:
    """The result's destination on a receiving rank, or the error opening it raised.

    The error is raised after the exchange, so that no rank is left waiting.
    """
    try:
        destination = Destination(
            spec,
            plan,
            [meta.infos for meta in metas],
            num_items=signature.num_items,
            directory=folder,
            ml_dtypes=signature.ml_dtypes,
        )
    except Exception as exc:  # noqa: BLE001 - raised after the exchange, no rank waits
        return None, exc
    return destination, None


def _defaults(
    tree: Any, axis: int | None, pad_value: PadValue, ml_dtypes: bool | None
) -> tuple[Any, PadValue, Any]:
    """``axis``, ``pad_value`` and ``ml_dtypes``: given, else the Accumulator's, else defaults.

    The defaults are ``concat``'s: 0, None, False.
    """
    if isinstance(tree, Accumulator):
        options = tree.__tonumpy_gather_options__()
        if axis is None:
            axis = options["axis"]
        if pad_value is None:
            pad_value = options["pad_value"]
        if ml_dtypes is None:
            ml_dtypes = options["ml_dtypes"]
    return (0 if axis is None else axis), pad_value, (False if ml_dtypes is None else ml_dtypes)


def _checked_destination(tree: Any, selection: Selection, directory: Any, axis: int) -> Path | None:
    """Check the options that depend on the input and on ``directory``; the directory's path."""
    if isinstance(tree, Accumulator) and selection.active:
        raise OptionError(
            "gather(reduce=..., exclude=...) act on a tree; an Accumulator applies its own as "
            "batches are appended: pass them to Accumulator(reduce=..., exclude=...)"
        )
    if directory is None:
        return None
    folder = _options.check_directory(directory, "gather")
    if axis != 0:
        raise OptionError(
            f"gather(directory=...) writes each leaf as a .npy file of rows along its first "
            f"axis, so it needs axis=0 (got axis={axis})"
        )
    return folder


def _describe(
    tree: Any,
    selection: Selection,
    is_leaf: Callable[[Any], bool] | None,
    sampler: Any,
    signature: Signature,
    *,
    device: torch.device | None,
) -> tuple[Prepared, RankMeta]:
    """This rank's leaves, described and read, and its metadata (or the error it raised).

    ``device`` is where the bytes are sent from; ``None`` in a world of one (nothing is sent,
    and an error is raised at once).
    """
    remote = device is not None
    prep, spec = Prepared(), None
    try:
        if isinstance(tree, Accumulator):
            leaves, spec, per_batch, indices = tree.__tonumpy_gather__()
        else:
            leaves, spec, _ = selection.flatten(tree, is_leaf=is_leaf)
            per_batch, indices = [False] * len(leaves), None
        prep = prepare(leaves, spec, remote=remote, ml_dtypes=signature.ml_dtypes)
        if device is not None:
            make_pieces(prep, device, dtensors=False)
        return prep, _metadata.payload(
            spec, prep.infos, signature, sampler, per_batch, indices=indices
        )
    except Exception as exc:
        if not remote:
            raise
        prep.error = exc
        return prep, _metadata.error_payload(exc, signature, spec)


def _checked_arguments(
    axis: Any, num_items: Any, ml_dtypes: Any, pad_value: PadValue, chunk_bytes: Any
) -> tuple[int, int | None]:
    """Check gather's options as concat and Accumulator do; return axis and num_items as ints."""
    _options.check_flag(ml_dtypes, "ml_dtypes", "gather")
    check_pad_option(pad_value, "gather")
    if chunk_bytes is not None and not (
        isinstance(chunk_bytes, int | np.integer)
        and not isinstance(chunk_bytes, bool)
        and chunk_bytes >= 1
    ):
        raise OptionError(
            f"gather(chunk_bytes={chunk_bytes!r}): chunk_bytes= takes None or the most bytes a "
            "rank sends per round, an int >= 1"
        )
    return _options.check_axis(axis, "gather"), _options.check_num_items(num_items, "gather")


def _locate(dist: Any, group: Any, dst: int | None) -> tuple[int, int, bool]:
    """World size, this process's rank in ``group``, and whether it receives the result."""
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            msg = "gather(group=...) needs an initialised process group (init_process_group)"
            raise ValueError(msg)
        if dst not in (None, 0):
            msg = f"gather(dst={dst}): without a process group the only rank is 0"
            raise ValueError(msg)
        return 1, 0, True
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if rank < 0:
        msg = "gather(): this process is not a member of the given process group"
        raise ValueError(msg)
    if dst is not None:
        _check_dst(dist, group, dst)
    return world, rank, dst is None or dist.get_rank() == dst


def _check_dst(dist: Any, group: Any, dst: int) -> None:
    msg = f"gather(dst={dst}): global rank {dst} is not a member of the process group"
    if group is None:
        if not 0 <= dst < dist.get_world_size():
            raise ValueError(msg)
        return
    try:
        dist.get_group_rank(group, dst)
    except (ValueError, RuntimeError) as exc:
        raise ValueError(msg) from exc


def _comm_device(dist: Any, group: Any) -> torch.device:
    backend = str(dist.get_backend(group)).lower()
    if "gloo" in backend or "mpi" in backend:
        return torch.device("cpu")
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and accelerator.is_available():
        found = accelerator.current_accelerator()
        if found is not None:
            return torch.device(found.type, accelerator.current_device_index())
    return torch.device("cpu")


# ------------------------------------------------------------------------------ the data


class _Exchange:
    """The data collectives of one ``gather`` call over several ranks, round by round."""

    def __init__(self, dist: Any, group: Any, *, dst: int | None, is_dst: bool) -> None:
        self.dist, self.group, self.dst, self.is_dst = dist, group, dst, is_dst
        self.device = _comm_device(dist, group)

    def run(
        self,
        prep: Prepared,
        metas: Sequence[RankMeta],
        plan: Plan,
        destination: Destination | None,
        *,
        failure: Exception | None,
    ) -> Exception | None:
        """Send every rank's bytes, round by round; receivers place each round as it arrives.

        A receiver that fails to place what it received keeps taking part in every round (the
        other ranks would wait for it forever) and returns the first error, to be raised then.
        """
        make_pieces(prep, self.device, dtensors=True)
        rows_first_bytes(prep, plan.axes)
        if destination is not None and failure is None:
            try:
                destination.place_pickled(metas)
            except Exception as exc:  # noqa: BLE001 - raised after the exchange
                failure = exc
        if not plan.rounds:
            return failure
        world, rank = len(metas), self.dist.get_rank(self.group)
        largest = max(round_size(pieces) for pieces in plan.rounds)
        send = torch.empty(largest, dtype=torch.uint8, device=self.device)
        receive = None
        if self.is_dst:
            receive = torch.empty(world * largest, dtype=torch.uint8, device=self.device)
        for pieces in plan.rounds:
            size = round_size(pieces)
            buffer = send[:size]
            pack_round(prep, pieces[rank], buffer)
            gathered = receive[: world * size].view(world, size) if receive is not None else None
            self._collective(buffer, gathered)
            if gathered is None or destination is None or failure is not None:
                continue
            try:
                destination.place_round(metas, pieces, gathered)
            except Exception as exc:  # noqa: BLE001 - raised after the exchange
                failure = exc
        return failure

    def _collective(self, buffer: torch.Tensor, gathered: torch.Tensor | None) -> None:
        dist, group = self.dist, self.group
        if self.dst is None:
            assert gathered is not None  # noqa: S101
            if self.device.type == "cpu":
                dist.all_gather(list(gathered.unbind(0)), buffer, group=group)
            else:
                dist.all_gather_into_tensor(gathered.view(-1), buffer, group=group)
        else:
            targets = list(gathered.unbind(0)) if gathered is not None else None
            dist.gather(buffer, targets, dst=self.dst, group=group)
