"""``gather``: collect a tree of predictions from every ``torch.distributed`` rank as NumPy.

Every rank calls [`gather`][] with its own tree (one structure everywhere). The call costs one
small metadata exchange (``all_gather_object``: a structure fingerprint, each leaf's shape and
dtype, the options, and the values of non-tensor leaves) and then **one** collective for all the
tensor data: every tensor leaf's bytes (bfloat16 and float8 as their raw bits) are packed into
one flat ``uint8`` buffer per rank, padded to the longest buffer across ranks (gloo rejects
uneven ``all_gather``, and crashes on zero-element ones: the buffer has at least one byte), and
all-gathered (or gathered to ``dst``). The receivers cut each rank's buffer back into tensors and
hand the per-rank trees to [`tonumpy.concat`][], which concatenates, pads ragged dimensions and
converts exactly as it does for batches.

Everything that can go wrong is found from the metadata, on every rank, before any data moves:
a rank whose tree differs in structure, dtype or rank of a leaf, or cannot be padded, or that
failed to prepare its tree at all, makes *every* rank raise the same error, instead of leaving
the others waiting in a collective forever. PyTorch's distributed engine (gloo on CPU, NCCL on
GPU) does all the communication; ``torch.distributed`` is imported only when ``gather`` runs.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from optree import PyTreeSpec

from . import _options, _tree
from ._columns import Column, join
from ._packing import (
    ALIGN,
    DTENSOR,
    Prepared,
    info_kind,
    make_pieces,
    numpy_dtype,
    pack_buffer,
    prepare,
    rebuild,
)
from ._pad import PadValue, check_pad_option
from ._sampler import check_sampler, dataset_order, sampler_info
from .convert import convert_flat
from .errors import ConversionError

if TYPE_CHECKING:  # pragma: no cover
    from torch.distributed import ProcessGroup

__all__ = ["gather"]

#: Bumped whenever the metadata layout changes: ranks running different tonumpy versions then
#: raise a clear error instead of misreading each other.
_PROTOCOL = 1

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")

# ------------------------------------------------------------------------------ metadata


def _fingerprint(spec: PyTreeSpec) -> bytes:
    text = _ADDRESS.sub("", repr(spec))  # a lambda default_factory's address differs per rank
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


def _error_payload(exc: BaseException) -> tuple[str, str, str | None]:
    path = getattr(exc, "path", None)
    return type(exc).__name__, str(exc), None if path is None else _tree.format_path(path)


# ------------------------------------------------------------------------------ checks


def _check_leaves(
    metas: Sequence[tuple[Any, ...]],
    spec: PyTreeSpec,
    *,
    axis: int,
    pad_value: PadValue,
    ml_dtypes: bool,
) -> list[int]:
    """Check every leaf across ranks by the column policy; return each leaf's normalised axis.

    From the metadata alone, before any data moves, so that every rank raises the same error.
    """
    axes = []
    for i, (path, where) in enumerate(_tree.leaf_paths(spec)):
        column = Column(path, where, axis=axis, pad_value=pad_value, noun="ranks")
        for rank, meta in enumerate(metas):
            code, dtype, shape, *_ = meta[4][i]
            kind = info_kind(meta[4][i])
            np_dtype = None if kind == "object" else numpy_dtype(code, dtype, ml_dtypes)
            column.commit(column.check(kind, np_dtype, shape, f"rank {rank}"))
        axes.append(column.axis)
    return axes


def _check_options(metas: Sequence[tuple[Any, ...]]) -> None:
    names = ("dst", "axis", "num_items", "sampler", "ml_dtypes")
    for rank, meta in enumerate(metas):
        for name, mine, first in zip(names, meta[5], metas[0][5], strict=True):
            if mine != first:
                shown = "given" if name == "sampler" else repr(first)
                other = "given" if name == "sampler" else repr(mine)
                if name == "sampler":
                    shown, other = ("given", "None") if first else ("None", "given")
                raise ConversionError(
                    f"gather() was called with {name}={shown} on rank 0 but {name}={other} on "
                    f"rank {rank}; every rank must pass the same {name}"
                )


# ------------------------------------------------------------------------------ receiving


def _finish(
    out: Any,
    spec: PyTreeSpec,
    *,
    kinds: Sequence[str],
    axes: list[int],
    order: np.ndarray | None,
    num_items: int | None,
) -> Any:
    """Put rows into dataset order and keep the first ``num_items`` (array leaves only)."""
    if order is None and num_items is None:
        return out
    leaves: list[Any] = list(spec.flatten_up_to(out))
    result = []
    for leaf, kind, ax in zip(leaves, kinds, axes, strict=True):
        if kind == "array":
            take = order
            rows = int(leaf.shape[ax]) if take is None else take.size
            if num_items is not None and num_items < rows:
                take = np.arange(num_items) if take is None else take[:num_items]
            if take is not None:
                leaf = np.take(leaf, take, axis=ax)  # noqa: PLW2901 - replaced by a new array
        result.append(leaf)
    return _tree.unflatten(spec, result)


# ------------------------------------------------------------------------------ gather


def gather(
    tree: Any,
    /,
    *,
    dst: int | None = None,
    group: ProcessGroup | None = None,
    axis: int = 0,
    pad_value: PadValue = None,
    sampler: Any = None,
    num_items: int | None = None,
    ml_dtypes: bool = False,
    is_leaf: Callable[[Any], bool] | None = None,
) -> Any:
    """Gather a tree from every rank, concatenated over the ranks, as NumPy.

    Call it on every rank of ``group`` with that rank's tree (one structure everywhere). Each
    leaf is concatenated over the ranks, in rank order, along ``axis``, exactly as
    [`tonumpy.concat`][] concatenates batches: ranks may hold different numbers of rows (zero
    included); other dimensions may differ and are padded with ``pad_value``; 0-d leaves become
    one value per rank; non-tensor leaves become a list with one value per rank. Without an
    initialised process group (or with a group of one), it returns ``concat([tree])``.

    Examples:
        >>> import torch
        >>> out = gather({"logits": torch.ones(2, 3), "loss": torch.tensor(0.5), "name": "a"})
        >>> out["logits"].shape, out["loss"], out["name"]
        ((2, 3), array([0.5], dtype=float32), ['a'])

    Args:
        tree: This rank's tree: any nesting of containers holding tensors (any device, dtype
            and layout; DTensors are materialised with ``full_tensor()``, a collective every
            rank joins), arrays and other picklable values.
        dst: The global rank to return the result on (``None``, the default: every rank).
        group: The process group to gather over (default: the whole world).
        axis: The axis to concatenate along (negative counts from the end of each leaf).
        pad_value: How to pad leaves whose ranks differ in size along another axis: a value,
            a mapping from key path to value, or a callable ``(path, dtype) -> value``, as for
            [`tonumpy.concat`][]. ``None`` makes such leaves an error.
        sampler: The ``torch.utils.data.DistributedSampler`` that split the dataset (or any
            object with its ``num_replicas``, ``rank``, ``total_size``, ``shuffle``, ``seed``,
            ``epoch`` and ``dataset``). Rows of array leaves are put back in dataset order and
            the samples the sampler repeated to even out the ranks are dropped: row ``i`` is
            dataset item ``i`` (with ``shuffle=True`` too; with ``drop_last=True`` the items
            the sampler left out are missing and the rest are in dataset order). Every array
            leaf must then hold one row per sample of its rank.
        num_items: Keep only the first ``num_items`` rows of each array leaf (after
            reordering); for samplers that shard the dataset contiguously, the dataset size.
        ml_dtypes: Return bfloat16/float8 leaves bit-exact as ``ml_dtypes`` arrays instead
            of widening them to float32.
        is_leaf: Called on each node; a node it returns True for is treated as a leaf.

    Returns:
        On ``dst`` (or on every rank when ``dst`` is ``None``), one tree of the input's
        structure whose arrays own their memory; ``None`` on the other ranks.

    Raises:
        ConversionError: On every rank, when any rank's tree differs in structure, in a leaf's
            kind, number of dimensions or dtype, has leaves that cannot be padded, or could
            not be prepared; or when the ranks pass different options. The message names
            the ranks and the path.
        ValueError: ``dst`` is not a rank of ``group``, or this process is not in ``group``.
        OptionError: ``axis`` or ``num_items`` is not an int (``num_items`` one ``>= 0``),
            ``ml_dtypes`` not a bool, or a ``pad_value`` callable cannot take ``(path, dtype)``;
            raised before any exchange.
    """
    axis, num_items = _checked_arguments(axis, num_items, ml_dtypes, pad_value)
    import torch.distributed as dist  # noqa: PLC0415 - keeps `import tonumpy` light

    world, rank, is_dst = _locate(dist, group, dst)
    remote = world > 1
    device = _comm_device(dist, group) if remote else torch.device("cpu")

    prep = Prepared()
    signature = (dst, axis, num_items, sampler is not None, ml_dtypes)
    try:
        prep = prepare(tree, remote=remote, ml_dtypes=ml_dtypes, is_leaf=is_leaf)
        if remote:
            make_pieces(prep, device, dtensors=False)
        assert prep.spec is not None  # noqa: S101
        info = sampler_info(sampler) if sampler is not None else None
        payload: tuple[Any, ...] = (
            _PROTOCOL,
            None,
            _fingerprint(prep.spec),
            len(prep.infos),
            prep.infos,
            signature,
            info,
            prep.nbytes,
        )
    except Exception as exc:
        if not remote:
            raise
        prep.error = exc
        payload = (_PROTOCOL, _error_payload(exc), b"", 0, [], signature, None, 0)

    if remote:
        metas: list[Any] = [None] * world
        dist.all_gather_object(metas, payload, group=group)
    else:
        metas = [payload]
    _check_all(metas, prep, rank)
    assert prep.spec is not None  # noqa: S101
    if remote:
        _check_structure(metas, prep.spec, dist, group)

    paths = prep.spec.paths()
    axes = _check_leaves(metas, prep.spec, axis=axis, pad_value=pad_value, ml_dtypes=ml_dtypes)
    if sampler is not None:
        check_sampler(metas, paths, axes, world)

    # Every rank agrees: materialise DTensors (in leaf order, on every rank), then send.
    for i, (code, *_rest) in enumerate(prep.infos):
        if code == DTENSOR:
            prep.sources[i] = prep.sources[i].full_tensor()
    if remote:
        make_pieces(prep, device, dtensors=True)
    if remote:
        per_rank = _exchange(
            prep,
            metas,
            dist=dist,
            group=group,
            device=device,
            dst=dst,
            is_dst=is_dst,
            ml_dtypes=ml_dtypes,
        )
    else:
        per_rank = [list(prep.sources)]
    if not is_dst:
        return None
    converted = [convert_flat(leaves, prep.spec, ml_dtypes=ml_dtypes) for leaves in per_rank]
    del per_rank
    out = join(
        converted,
        prep.spec,
        axis=axis,
        pad_value=pad_value,
        name=lambda r: f"rank {r}",
        noun="ranks",
    )
    del converted
    order = dataset_order(metas) if sampler is not None else None
    kinds = [info_kind(info) for info in prep.infos]
    return _finish(out, prep.spec, kinds=kinds, axes=axes, order=order, num_items=num_items)


def _checked_arguments(
    axis: Any, num_items: Any, ml_dtypes: Any, pad_value: PadValue
) -> tuple[int, int | None]:
    """Check gather's options as concat and Accumulator do; return axis and num_items as ints."""
    _options.check_flag(ml_dtypes, "ml_dtypes", "gather")
    check_pad_option(pad_value, "gather")
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


def _check_structure(
    metas: Sequence[tuple[Any, ...]], spec: PyTreeSpec, dist: Any, group: Any
) -> None:
    """Raise, on every rank, if the structure fingerprints differ (one more exchange).

    The ranks then exchange their structures as sketches, and every rank reports the first
    path where the first differing rank's tree parts from rank 0's, as ``concat`` does.
    """
    if all(meta[2] == metas[0][2] for meta in metas):
        return
    sketches: list[Any] = [None] * len(metas)
    dist.all_gather_object(sketches, _tree.sketch(spec), group=group)
    bad = next(r for r, meta in enumerate(metas) if meta[2] != metas[0][2])
    raise _tree.difference_error(
        sketches[0],
        sketches[bad],
        "rank 0",
        f"rank {bad}",
        hint="every rank must pass the same keys, fields and lengths",
        spec=spec,
    )


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


def _check_all(metas: Sequence[tuple[Any, ...]], prep: Prepared, rank: int) -> None:
    """Raise, on every rank, if any rank failed, runs another protocol or passed other options."""
    failed = [r for r, meta in enumerate(metas) if meta[1] is not None]
    if failed:
        if prep.error is not None:
            raise prep.error
        name, message, where = metas[failed[0]][1]
        ranks = ", ".join(map(str, failed))
        raise ConversionError(
            f"gather() failed on rank{'s' if len(failed) > 1 else ''} {ranks}, so every rank "
            f"raises: rank {failed[0]} raised {name}: {message}"
            + (f" (at {where})" if where else "")
        )
    for r, meta in enumerate(metas):
        if meta[0] != _PROTOCOL:
            raise ConversionError(
                f"gather(): rank {r} speaks metadata protocol {meta[0]} but rank {rank} speaks "
                f"{_PROTOCOL}; install the same tonumpy version on every rank"
            )
    _check_options(metas)


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


def _exchange(
    prep: Prepared,
    metas: Sequence[tuple[Any, ...]],
    *,
    dist: Any,
    group: Any,
    device: torch.device,
    dst: int | None,
    is_dst: bool,
    ml_dtypes: bool,
) -> list[list[Any]]:
    """Send every rank's bytes in one collective; rebuild the leaves of every rank on receivers."""
    # At least one byte (gloo crashes on zero-element collectives), and a multiple of 16 so
    # that every rank's row of the gathered buffer starts aligned for any dtype.
    size = -(-max(1, *(int(meta[7]) for meta in metas)) // ALIGN) * ALIGN
    buffer = pack_buffer(prep, size, device)
    gathered = torch.empty((len(metas), size), dtype=torch.uint8, device=device) if is_dst else None
    if dst is None:
        assert gathered is not None  # noqa: S101
        if device.type == "cpu":
            dist.all_gather(list(gathered.unbind(0)), buffer, group=group)
        else:
            dist.all_gather_into_tensor(gathered.view(-1), buffer, group=group)
    else:
        targets = list(gathered.unbind(0)) if gathered is not None else None
        dist.gather(buffer, targets, dst=dst, group=group)
    del buffer
    if gathered is None:
        return []
    host = gathered.cpu()
    host_np = host.numpy()
    per_rank = []
    for r, meta in enumerate(metas):
        row, row_np = host[r], host_np[r]
        per_rank.append([rebuild(info, row, row_np, ml_dtypes) for info in meta[4]])
    return per_rank
