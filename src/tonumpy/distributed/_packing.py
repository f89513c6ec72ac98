"""One rank's tree as byte buffers for ``gather``, sent in rounds, and the rows back from them.

[`prepare`][tonumpy.distributed._packing.prepare] describes every leaf of a rank's flattened tree
(its code, dtype, shape and size, or its pickled value);
[`make_pieces`][tonumpy.distributed._packing.make_pieces] reads each leaf's bytes (failing there,
where every rank learns of it, never in a collective). The data then travels in **rounds**:
[`plan_rounds`][tonumpy.distributed._packing.plan_rounds] cuts every rank's leaves, along the
concatenation axis, into pieces of whole rows, at most about ``chunk_bytes`` per rank and round (a
single row larger than that travels alone), the same plan on every rank since it is made from the
exchanged metadata alone; [`pack_round`][tonumpy.distributed._packing.pack_round] lays a round's
pieces out in one ``uint8`` buffer (each piece 16-byte aligned), and
[`unpack`][tonumpy.distributed._packing.unpack] cuts a received buffer back into rows. A receiver
therefore holds one round of every rank's bytes at a time.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from optree import PyTreeSpec

from .. import _dtypes, _tree
from .._combine._columns import Jagged, Kind
from .._convert._leaf import convert_checked
from .._dtypes import PLAIN
from ..errors import ConversionError

__all__ = [
    "ALIGN",
    "ARRAY",
    "DTENSOR",
    "JAGGED",
    "OBJECT",
    "SENDABLE",
    "TENSOR",
    "Info",
    "Piece",
    "Prepared",
    "full_tensors",
    "info_kind",
    "info_rows",
    "is_dtensor",
    "make_pieces",
    "numpy_dtype",
    "pack_round",
    "plan_rounds",
    "prepare",
    "round_size",
    "rows_first_bytes",
    "unpack",
]

# Leaf codes in the metadata.
TENSOR = "t"  # a tensor sent as raw bytes, rebuilt as a tensor of the same dtype
ARRAY = "n"  # an ndarray sent as raw bytes, rebuilt as an ndarray of the same dtype
DTENSOR = "d"  # a DTensor: materialised with full_tensor() after the checks, then sent as bytes
OBJECT = "o"  # anything else: pickled into the metadata
#: The ``dtype`` of an OBJECT leaf that is a converted nested tensor (its ``shape``: ``(rows,)``).
JAGGED = "jagged"

#: torch dtypes sent as raw bytes (others are converted on their rank first, then sent).
SENDABLE: frozenset[torch.dtype] = _dtypes.NATIVE | frozenset(_dtypes.ML_DTYPES)
ALIGN = 16  # the largest item size sent (complex128)

# One leaf's metadata: (code, dtype, shape, nbytes, payload). ``dtype`` is a torch or NumPy
# dtype (None for objects); ``payload`` is the pickled value of an object leaf.
Info = tuple[str, Any, tuple[int, ...] | None, int, bytes | None]


class Prepared:
    """One rank's tree, ready to send: leaves, metadata and each leaf's bytes."""

    __slots__ = ("error", "flat", "infos", "leaves", "sources", "spec")

    def __init__(self) -> None:
        self.leaves: list[Any] = []
        self.spec: PyTreeSpec | None = None
        self.infos: list[Info] = []
        self.sources: list[Any] = []  # per leaf: the tensor/array whose bytes are sent, or None
        self.error: BaseException | None = None
        # per leaf: its bytes, flat (rows first once rows_first_bytes ran), or None
        self.flat: list[Any] = []


class Piece(NamedTuple):
    """Rows ``start:stop`` of leaf ``leaf`` of one rank, at ``offset`` in a round's buffer."""

    leaf: int
    start: int
    stop: int
    offset: int
    nbytes: int


# ------------------------------------------------------------------------------ local side


def is_dtensor(leaf: Any) -> bool:
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
        or t.dtype not in SENDABLE
    ):
        return None
    return t


def _sendable_array(leaf: Any) -> np.ndarray | None:
    if isinstance(leaf, np.generic):
        leaf = np.asarray(leaf)
    if not isinstance(leaf, np.ndarray):
        return None
    if leaf.dtype.kind in "biufc" or _dtypes.is_ml_dtype(leaf.dtype):
        return leaf
    return None


def _describe_leaf(
    leaf: Any, index: int, spec: PyTreeSpec, *, remote: bool, ml_dtypes: bool
) -> tuple[str, Any, tuple[int, ...] | None, Any, bytes | None]:
    """Code, dtype, shape, source and payload of one leaf (see ``Info``)."""
    if is_dtensor(leaf):
        return DTENSOR, leaf.dtype, tuple(leaf.shape), leaf, None
    t = _sendable_tensor(leaf)
    if t is not None:
        return TENSOR, t.dtype, tuple(t.shape), t, None
    if isinstance(leaf, torch.Tensor):  # sparse, quantized, nested, subclasses: convert here
        converted = convert_checked(
            leaf, index, spec, copy=None, ml_dtypes=ml_dtypes, scalars=False
        )
        leaf = Jagged(converted) if type(converted) is list else converted  # a nested tensor
    if isinstance(leaf, Jagged):  # rows: joined with the other ranks' (and put in order)
        if not remote:
            return OBJECT, JAGGED, (len(leaf),), leaf, None
        return OBJECT, JAGGED, (len(leaf),), None, _pickled(list(leaf), index, spec)
    arr = _sendable_array(leaf)
    if arr is not None:
        return ARRAY, arr.dtype, arr.shape, arr, None
    # Arrays NumPy cannot view as bytes (str, object, datetime) are pickled but keep their
    # shape and dtype in the metadata: concat treats them as arrays, and so do the checks.
    dtype, shape = None, None
    if isinstance(leaf, np.ndarray | np.generic):
        dtype, shape = np.asarray(leaf).dtype, np.shape(leaf)
    if not remote:
        return OBJECT, dtype, shape, leaf, None
    return OBJECT, dtype, shape, None, _pickled(leaf, index, spec)


def _pickled(leaf: Any, index: int, spec: PyTreeSpec) -> bytes:
    try:
        return pickle.dumps(leaf, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        path, where = _tree.leaf_path(spec, index)
        raise ConversionError(
            f"gather() cannot send {where} ({type(leaf).__name__}) to the other ranks: it is "
            f"not a tensor or array, and pickling it failed ({type(exc).__name__}: {exc}); "
            "drop it from the tree or turn it into a picklable value",
            path=path,
        ) from exc


def _itemsize(dtype: Any) -> int:
    return int(dtype.itemsize)


def prepare(leaves: list[Any], spec: PyTreeSpec, *, remote: bool, ml_dtypes: bool) -> Prepared:
    """Classify a rank's flattened tree: every leaf's metadata, and the source of its bytes."""
    prep = Prepared()
    prep.leaves, prep.spec = leaves, spec
    for index, leaf in enumerate(leaves):
        code, dtype, shape, source, payload = _describe_leaf(
            leaf, index, spec, remote=remote, ml_dtypes=ml_dtypes
        )
        nbytes = 0
        if code != OBJECT:
            assert shape is not None  # noqa: S101 - sized leaves have shapes
            nbytes = math.prod(shape) * _itemsize(dtype)
        prep.infos.append((code, dtype, shape, nbytes, payload))
        prep.sources.append(source)
    prep.flat = [None] * len(leaves)
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
    flat: torch.Tensor = t.contiguous().reshape(-1).view(torch.uint8)
    return flat.to(device)


def _host_bytes(source: Any) -> np.ndarray:
    """The bytes of a tensor or array, as a flat ``uint8`` array in host memory."""
    if isinstance(source, torch.Tensor):
        if source.dtype in _dtypes.ML_DTYPES:  # NumPy has no bfloat16: move the raw bits
            source = source.detach().view(_dtypes.BITS[source.dtype.itemsize])
        source = source.numpy(force=True)  # detached, on the host, conj/neg bits resolved
    flat: np.ndarray = np.ascontiguousarray(source).reshape(-1).view(np.uint8)
    return flat


def make_pieces(prep: Prepared, device: torch.device, *, dtensors: bool) -> None:
    """Read every sized leaf's bytes (DTensors only when ``dtensors``): flat, on ``device``.

    Runs before the metadata exchange for every other leaf, so that a leaf whose data cannot be
    read fails *there*, where every rank learns of it, and not in a data collective, where
    the other ranks would wait for this one forever.
    """
    assert prep.spec is not None  # noqa: S101
    on_host = device.type == "cpu"  # NumPy's per-leaf overhead is a fraction of torch's
    for i, info in enumerate(prep.infos):
        if info[0] == OBJECT or (info[0] == DTENSOR) != dtensors or not info[3]:
            continue
        source = prep.sources[i]
        try:
            prep.flat[i] = _host_bytes(source) if on_host else _byte_view(source, device)
        except Exception as exc:
            path, where = _tree.leaf_path(prep.spec, i)
            raise ConversionError(
                f"gather() cannot read the data of {where} ({type(source).__name__}): "
                f"{type(exc).__name__}: {exc}",
                path=path,
            ) from exc


def rows_first_bytes(prep: Prepared, axes: Sequence[int]) -> None:
    """Reorder the bytes of every leaf concatenated along an axis other than 0, rows first."""
    for i, (_, dtype, shape, nbytes, _) in enumerate(prep.infos):
        ax, flat = axes[i], prep.flat[i]
        if not ax or flat is None or not shape or not nbytes:
            continue
        grid = flat.reshape(*shape, _itemsize(dtype))
        if isinstance(flat, np.ndarray):
            prep.flat[i] = np.ascontiguousarray(np.moveaxis(grid, ax, 0)).reshape(-1)
        else:
            prep.flat[i] = grid.movedim(ax, 0).contiguous().reshape(-1)


def full_tensors(prep: Prepared) -> None:
    """Materialise the DTensor leaves (a collective each, in leaf order, on every rank)."""
    for i, info in enumerate(prep.infos):
        if info[0] == DTENSOR:
            prep.sources[i] = prep.sources[i].full_tensor()


def info_rows(info: Info, axis: int) -> int:
    """How many rows a sized leaf has along its (normalised) concatenation axis."""
    shape = info[2]
    assert shape is not None  # noqa: S101
    return shape[axis] if shape else 1


def plan_rounds(
    infos: Sequence[Sequence[Info]], axes: Sequence[int], chunk_bytes: int
) -> list[list[list[Piece]]]:
    """``rounds[k][rank]``: the pieces rank ``rank`` sends in round ``k`` (the same everywhere).

    Each rank's sized leaves are cut, in leaf order, into pieces of whole rows that fill rounds
    of at most ``chunk_bytes`` (a piece of one row larger than that fills a round alone). The
    ranks send in every round until they run out; there are as many rounds as the rank that
    needs most.
    """
    per_rank: list[list[list[Piece]]] = []
    for leaves in infos:
        rounds: list[list[Piece]] = [[]]
        used = 0
        for i, info in enumerate(leaves):
            code, nbytes = info[0], info[3]
            if code == OBJECT or not nbytes:
                continue
            rows = info_rows(info, axes[i])
            row_bytes = nbytes // rows
            start = 0
            while start < rows:
                take = min(rows - start, (chunk_bytes - used) // row_bytes)
                if take == 0 and used:
                    rounds.append([])
                    used = 0
                    continue
                take = max(take, 1)
                size = take * row_bytes
                rounds[-1].append(Piece(i, start, start + take, used, size))
                used += -(-size // ALIGN) * ALIGN
                start += take
                if used >= chunk_bytes:
                    rounds.append([])
                    used = 0
        if not rounds[-1]:
            rounds.pop()
        per_rank.append(rounds)
    count = max(len(rounds) for rounds in per_rank)
    return [[rounds[k] if k < len(rounds) else [] for rounds in per_rank] for k in range(count)]


def round_size(pieces_by_rank: Sequence[Sequence[Piece]]) -> int:
    """The buffer size of a round: the largest rank's, 16-byte aligned, at least 16 bytes."""
    ends = [p.offset + p.nbytes for pieces in pieces_by_rank for p in pieces]
    return -(-max(1, *ends) // ALIGN) * ALIGN if ends else ALIGN


def pack_round(prep: Prepared, pieces: Sequence[Piece], out: torch.Tensor) -> None:
    """Copy this rank's pieces of a round into ``out``, its ``uint8`` buffer for the round."""
    if out.device.type == "cpu":
        host = out.numpy()
        for piece in pieces:
            row = piece.nbytes // (piece.stop - piece.start)
            flat = prep.flat[piece.leaf]
            host[piece.offset : piece.offset + piece.nbytes] = flat[
                piece.start * row : piece.stop * row
            ]
        return
    for piece in pieces:
        row = piece.nbytes // (piece.stop - piece.start)
        flat = prep.flat[piece.leaf]
        window = flat[piece.start * row : piece.stop * row]
        out[piece.offset : piece.offset + piece.nbytes].copy_(window)


def numpy_dtype(code: str, dtype: Any, ml_dtypes: bool) -> np.dtype[Any]:
    """The dtype the converted leaf has (what ``concat`` sees)."""
    if code in (ARRAY, OBJECT):
        result: np.dtype[Any] = np.dtype(dtype)
        return result
    if dtype in _dtypes.ML_DTYPES:
        return _dtypes.ml_numpy_dtype(dtype) if ml_dtypes else np.dtype(np.float32)
    return np.dtype(str(dtype).removeprefix("torch."))


def info_kind(info: Info) -> Kind:
    if info[2] is None:  # an object leaf that is not an array
        return "object"
    if isinstance(info[1], str) and info[1] == JAGGED:
        return "jagged"
    return "array" if info[2] else "scalar"


def unpack(
    info: Info,
    piece: Piece,
    axis: int,
    buffer: tuple[torch.Tensor, np.ndarray],
    ml_dtypes: bool,
) -> np.ndarray:
    """The rows of one piece, rows first, as an array (a view of the received bytes if it can).

    ``buffer`` is the sending rank's buffer of the round, as a tensor and as an array.
    bfloat16/float8 rows come back as ``ml_dtypes`` arrays, or widened to float32.
    """
    code, dtype, shape, _, _ = info
    assert shape is not None  # noqa: S101
    row, row_np = buffer
    rows = piece.stop - piece.start
    other = (*shape[:axis], *shape[axis + 1 :]) if shape else ()
    window = slice(piece.offset, piece.offset + piece.nbytes)
    if code == ARRAY or dtype not in _dtypes.ML_DTYPES or ml_dtypes:
        out: np.ndarray = row_np[window].view(numpy_dtype(code, dtype, ml_dtypes))
        return out.reshape(rows, *other)
    return _dtypes.widened(row[window].view(dtype)).reshape(rows, *other)
