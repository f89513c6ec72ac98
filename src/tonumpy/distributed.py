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
import math
import pickle
import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from optree import PyTreeSpec

from . import _dtypes, _options, _tree
from ._columns import Column, Kind, join
from ._leaf import PLAIN, convert_checked
from ._pad import PadValue, check_pad_option
from .convert import convert_flat
from .errors import ConversionError

if TYPE_CHECKING:  # pragma: no cover
    from torch.distributed import ProcessGroup

__all__ = ["gather"]

#: Bumped whenever the metadata layout changes: ranks running different tonumpy versions then
#: raise a clear error instead of misreading each other.
_PROTOCOL = 1

# Leaf codes in the metadata.
_TENSOR = "t"  # a tensor sent as raw bytes, rebuilt as a tensor of the same dtype
_ARRAY = "n"  # an ndarray sent as raw bytes, rebuilt as an ndarray of the same dtype
_DTENSOR = "d"  # a DTensor: materialised with full_tensor() after the checks, then sent as bytes
_OBJECT = "o"  # anything else: pickled into the metadata

#: torch dtypes sent as raw bytes (others are converted on their rank first, then sent).
_SENDABLE: frozenset[torch.dtype] = _dtypes.NATIVE | frozenset(_dtypes.ML_DTYPES)
_ALIGN = 16  # the largest item size sent (complex128)
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")

# One leaf's metadata: (code, dtype, shape, offset, nbytes, payload). ``dtype`` is a torch or
# NumPy dtype (None for objects); ``payload`` is the pickled value of an object leaf.
_Info = tuple[str, Any, tuple[int, ...] | None, int, int, bytes | None]


class _Prepared:
    """One rank's tree, ready to send: leaves, metadata and the byte layout."""

    __slots__ = ("error", "infos", "leaves", "nbytes", "order", "pieces", "sources", "spec")

    def __init__(self) -> None:
        self.leaves: list[Any] = []
        self.spec: PyTreeSpec | None = None
        self.infos: list[_Info] = []
        self.sources: list[Any] = []  # per leaf: the tensor/array whose bytes are sent, or None
        self.order: list[int] = []  # leaf indices in buffer order
        self.nbytes = 0
        self.error: BaseException | None = None
        # per sized leaf, in buffer order: its bytes, flat, ready to copy into the buffer
        self.pieces: list[Any] = []


# ------------------------------------------------------------------------------ local side


def _is_dtensor(leaf: Any) -> bool:
    cls = type(leaf)
    return cls.__name__ == "DTensor" and cls.__module__.startswith("torch.distributed")


def _sendable_tensor(leaf: Any) -> torch.Tensor | None:
    """``leaf`` as a plain tensor whose bytes can be sent as they are, or None."""
    if type(leaf) not in PLAIN:
        return None
    t: torch.Tensor = leaf
    if (
        t.layout != torch.strided
        or t.is_nested
        or t.is_quantized
        or t.is_meta
        or t.dtype not in _SENDABLE
    ):
        return None
    return t


def _sendable_array(leaf: Any) -> np.ndarray | None:
    if isinstance(leaf, np.generic):
        leaf = np.asarray(leaf)
    if not isinstance(leaf, np.ndarray):
        return None
    kind = leaf.dtype.kind
    ml = kind == "V" and leaf.dtype.type.__module__.startswith("ml_dtypes")
    if kind in "biufc" or ml:
        return leaf
    return None


def _classify(
    leaf: Any, index: int, spec: PyTreeSpec, *, remote: bool, ml_dtypes: bool
) -> tuple[str, Any, tuple[int, ...] | None, Any, bytes | None]:
    """Code, dtype, shape, source and payload of one leaf (see ``_Info``)."""
    if _is_dtensor(leaf):
        return _DTENSOR, leaf.dtype, tuple(leaf.shape), leaf, None
    t = _sendable_tensor(leaf)
    if t is not None:
        return _TENSOR, t.dtype, tuple(t.shape), t, None
    if isinstance(leaf, torch.Tensor):  # sparse, quantized, nested, subclasses: convert here
        leaf = convert_checked(leaf, index, spec, copy=None, ml_dtypes=ml_dtypes, scalars=False)
    arr = _sendable_array(leaf)
    if arr is not None:
        return _ARRAY, arr.dtype, arr.shape, arr, None
    # Arrays NumPy cannot view as bytes (str, object, datetime) are pickled but keep their
    # shape and dtype in the metadata: concat treats them as arrays, and so do the checks.
    dtype, shape = None, None
    if isinstance(leaf, np.ndarray | np.generic):
        dtype, shape = np.asarray(leaf).dtype, np.shape(leaf)
    if not remote:
        return _OBJECT, dtype, shape, leaf, None
    try:
        payload = pickle.dumps(leaf, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        path, where = _tree.leaf_path(spec, index)
        raise ConversionError(
            f"gather() cannot send {where} ({type(leaf).__name__}) to the other ranks: it is "
            f"not a tensor or array, and pickling it failed ({type(exc).__name__}: {exc}); "
            "drop it from the tree or turn it into a picklable value",
            path=path,
        ) from exc
    return _OBJECT, dtype, shape, None, payload


def _itemsize(dtype: Any) -> int:
    return int(dtype.itemsize)


def _prepare(
    tree: Any,
    *,
    remote: bool,
    ml_dtypes: bool,
    is_leaf: Callable[[Any], bool] | None,
) -> _Prepared:
    """Flatten and classify the local tree; lay its bytes out in one buffer."""
    prep = _Prepared()
    prep.leaves, prep.spec = _tree.flatten(tree, is_leaf=is_leaf)
    classified = []
    for index, leaf in enumerate(prep.leaves):
        classified.append(_classify(leaf, index, prep.spec, remote=remote, ml_dtypes=ml_dtypes))
    # Larger items first: every offset is then a multiple of its leaf's item size, with no gaps.
    sized = [i for i, c in enumerate(classified) if c[0] != _OBJECT]
    prep.order = sorted(sized, key=lambda i: -_itemsize(classified[i][1]))
    offsets = dict.fromkeys(range(len(classified)), 0)
    sizes = dict.fromkeys(range(len(classified)), 0)
    offset = 0
    for i in prep.order:
        _, dtype, shape, _, _ = classified[i]
        assert shape is not None  # noqa: S101 - sized leaves have shapes
        offsets[i] = offset
        sizes[i] = math.prod(shape) * _itemsize(dtype)
        offset += sizes[i]
    prep.nbytes = offset
    for i, (code, dtype, shape, source, payload) in enumerate(classified):
        prep.infos.append((code, dtype, shape, offsets[i], sizes[i], payload))
        prep.sources.append(source)
    return prep


def _byte_view(source: Any, device: torch.device) -> torch.Tensor:
    """The bytes of a tensor or array, as a flat contiguous ``uint8`` tensor on ``device``."""
    if isinstance(source, np.ndarray):
        raw = np.ascontiguousarray(source).reshape(-1).view(np.uint8)
        return torch.from_numpy(raw).to(device)
    t = source.detach()
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    flat: torch.Tensor = t.reshape(-1).view(torch.uint8)
    return flat.to(device)


def _host_bytes(source: Any) -> np.ndarray:
    """The bytes of a tensor or array, as a flat ``uint8`` array in host memory."""
    if isinstance(source, torch.Tensor):
        if source.dtype in _dtypes.ML_DTYPES:  # NumPy has no bfloat16: move the raw bits
            source = source.detach().view(_dtypes.BITS[source.dtype.itemsize])
        source = source.numpy(force=True)  # detached, on the host, conj/neg bits resolved
    flat: np.ndarray = np.ascontiguousarray(source).reshape(-1).view(np.uint8)
    return flat


def _make_pieces(prep: _Prepared, device: torch.device, *, dtensors: bool) -> None:
    """Read every sized leaf's bytes (DTensors only when ``dtensors``): flat, on ``device``.

    Runs before the metadata exchange for every other leaf, so that a leaf whose data cannot be
    read fails *there*, where every rank learns of it, and not in the data collective, where
    the other ranks would wait for this one forever.
    """
    assert prep.spec is not None  # noqa: S101
    if not prep.pieces:
        prep.pieces = [None] * len(prep.order)
    on_host = device.type == "cpu"  # NumPy's per-leaf overhead is a fraction of torch's
    for slot, i in enumerate(prep.order):
        if (prep.infos[i][0] == _DTENSOR) != dtensors or not prep.infos[i][4]:
            continue
        source = prep.sources[i]
        try:
            prep.pieces[slot] = _host_bytes(source) if on_host else _byte_view(source, device)
        except Exception as exc:
            path, where = _tree.leaf_path(prep.spec, i)
            raise ConversionError(
                f"gather() cannot read the data of {where} ({type(source).__name__}): "
                f"{type(exc).__name__}: {exc}",
                path=path,
            ) from exc


def _pack(prep: _Prepared, size: int, device: torch.device) -> torch.Tensor:
    """One ``uint8`` buffer of ``size`` bytes holding every sized leaf at its offset."""
    pieces = [piece for piece in prep.pieces if piece is not None]
    if device.type == "cpu":
        host = np.empty(size, dtype=np.uint8)
        if pieces:
            np.concatenate(pieces, out=host[: prep.nbytes])
        return torch.from_numpy(host)
    buffer = torch.empty(size, dtype=torch.uint8, device=device)
    if pieces:
        torch.cat(pieces, out=buffer[: prep.nbytes])
    return buffer


# ------------------------------------------------------------------------------ metadata


def _fingerprint(spec: PyTreeSpec) -> bytes:
    text = _ADDRESS.sub("", repr(spec))  # a lambda default_factory's address differs per rank
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


def _sampler_info(sampler: Any) -> tuple[Any, ...]:
    """What gather needs of a ``DistributedSampler`` (or anything with its attributes)."""
    missing = [
        name
        for name in ("num_replicas", "rank", "total_size", "shuffle", "seed", "epoch", "dataset")
        if not hasattr(sampler, name)
    ]
    if missing:
        raise ConversionError(
            f"sampler= must be a torch.utils.data.DistributedSampler or have its attributes; "
            f"{type(sampler).__name__} lacks {', '.join(missing)}"
        )
    num_replicas = int(sampler.num_replicas)
    total_size = int(sampler.total_size)
    num_samples = int(getattr(sampler, "num_samples", total_size // max(num_replicas, 1)))
    return (
        num_replicas,
        int(sampler.rank),
        total_size,
        bool(sampler.shuffle),
        int(sampler.seed),
        int(sampler.epoch),
        len(sampler.dataset),
        num_samples,
    )


def _error_payload(exc: BaseException) -> tuple[str, str, str | None]:
    path = getattr(exc, "path", None)
    return type(exc).__name__, str(exc), None if path is None else _tree.format_path(path)


# ------------------------------------------------------------------------------ checks


def _numpy_dtype(code: str, dtype: Any, ml_dtypes: bool) -> np.dtype[Any]:
    """The dtype the converted leaf has (what ``concat`` sees)."""
    if code in (_ARRAY, _OBJECT):
        result: np.dtype[Any] = np.dtype(dtype)
        return result
    if dtype in _dtypes.ML_DTYPES:
        return _dtypes.ml_numpy_dtype(dtype) if ml_dtypes else np.dtype(np.float32)
    return np.dtype(str(dtype).removeprefix("torch."))


def _kind(info: _Info) -> Kind:
    if info[2] is None:  # an object leaf that is not an array
        return "object"
    return "array" if info[2] else "scalar"


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
            kind = _kind(meta[4][i])
            np_dtype = None if kind == "object" else _numpy_dtype(code, dtype, ml_dtypes)
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


def _check_sampler(
    metas: Sequence[tuple[Any, ...]],
    paths: list[tuple[Any, ...]],
    axes: list[int],
    world: int,
) -> None:
    infos = [meta[6] for meta in metas]
    first = infos[0]
    for rank, info in enumerate(infos):
        if info[:1] + info[2:] != first[:1] + first[2:]:
            raise ConversionError(
                "gather(): the samplers differ across ranks (num_replicas, total_size, shuffle, "
                f"seed, epoch, dataset length, num_samples: {first[:1] + first[2:]} on rank 0, "
                f"{info[:1] + info[2:]} on rank {rank}); call sampler.set_epoch(epoch) on every "
                "rank and build every rank's sampler from the same dataset"
            )
    if first[0] != world:
        raise ConversionError(
            f"gather(): the sampler splits the dataset over num_replicas={first[0]} ranks but "
            f"the process group has {world}; pass the sampler of this group"
        )
    ranks = sorted(info[1] for info in infos)
    if ranks != list(range(world)):
        raise ConversionError(
            f"gather(): the samplers' ranks are {[info[1] for info in infos]} (by process "
            "group rank); each sampler rank must appear exactly once"
        )
    num_samples = first[7]
    for i, path in enumerate(paths):
        for rank, meta in enumerate(metas):
            info = meta[4][i]
            if _kind(info) != "array":
                continue
            rows = info[2][axes[i]]
            if rows != num_samples:
                raise ConversionError(
                    f"gather(sampler=...): {_tree.format_path(path)} has {rows} rows along axis "
                    f"{axes[i]} on rank {rank}, but the sampler gives that rank {num_samples} "
                    "samples; every array leaf must hold one row per sample (gather per-batch "
                    "values separately, and do not drop the DataLoader's last batch)",
                    path=path,
                )


def _dataset_order(metas: Sequence[tuple[Any, ...]]) -> np.ndarray:
    """Positions, in the by-rank concatenation, of dataset items 0, 1, ... (each once).

    Rebuilds the index list ``DistributedSampler.__iter__`` makes: the (seeded) permutation,
    padded by repeating its start or cut to ``total_size``; rank ``r`` gets every
    ``num_replicas``-th index from position ``r``.
    """
    num_replicas, _, total_size, shuffle, seed, epoch, length, num_samples = metas[0][6]
    if shuffle:
        generator = torch.Generator()
        generator.manual_seed(seed + epoch)
        indices = torch.randperm(length, generator=generator).numpy()
    else:
        indices = np.arange(length)
    if total_size > length and length:
        indices = np.resize(indices, total_size)  # repeats from the start, like the sampler
    indices = indices[:total_size]
    dataset_index = np.concatenate(
        [indices[meta[6][1] : total_size : num_replicas] for meta in metas]
    )
    assert dataset_index.size == num_samples * len(metas)  # noqa: S101
    _, first = np.unique(dataset_index, return_index=True)
    order: np.ndarray = first
    return order


# ------------------------------------------------------------------------------ receiving


def _rebuild(info: _Info, row: torch.Tensor, row_np: np.ndarray, ml_dtypes: bool) -> Any:
    """One leaf of one rank: a view of its bytes in the gathered buffer, or the unpickled value.

    Tensors of dtypes NumPy has come back as arrays (what ``concat`` would make of them);
    bfloat16/float8 as tensors, which ``concat`` widens, or as ``ml_dtypes`` arrays.
    """
    code, dtype, shape, offset, nbytes, payload = info
    if code == _OBJECT:
        assert payload is not None  # noqa: S101
        return pickle.loads(payload)  # noqa: S301 - sent by a rank of the user's own group
    assert shape is not None  # noqa: S101
    if code == _ARRAY:
        return row_np[offset : offset + nbytes].view(dtype).reshape(shape)
    if dtype not in _dtypes.ML_DTYPES or ml_dtypes:
        np_dtype = _numpy_dtype(code, dtype, ml_dtypes)
        return row_np[offset : offset + nbytes].view(np_dtype).reshape(shape)
    return row[offset : offset + nbytes].view(dtype).reshape(shape)


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

    prep = _Prepared()
    signature = (dst, axis, num_items, sampler is not None, ml_dtypes)
    try:
        prep = _prepare(tree, remote=remote, ml_dtypes=ml_dtypes, is_leaf=is_leaf)
        if remote:
            _make_pieces(prep, device, dtensors=False)
        assert prep.spec is not None  # noqa: S101
        info = _sampler_info(sampler) if sampler is not None else None
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
        _check_sampler(metas, paths, axes, world)

    # Every rank agrees: materialise DTensors (in leaf order, on every rank), then send.
    for i, (code, *_rest) in enumerate(prep.infos):
        if code == _DTENSOR:
            prep.sources[i] = prep.sources[i].full_tensor()
    if remote:
        _make_pieces(prep, device, dtensors=True)
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
    order = _dataset_order(metas) if sampler is not None else None
    kinds = [_kind(info) for info in prep.infos]
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


def _check_all(metas: Sequence[tuple[Any, ...]], prep: _Prepared, rank: int) -> None:
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
    prep: _Prepared,
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
    size = -(-max(1, *(int(meta[7]) for meta in metas)) // _ALIGN) * _ALIGN
    buffer = _pack(prep, size, device)
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
        per_rank.append([_rebuild(info, row, row_np, ml_dtypes) for info in meta[4]])
    return per_rank
