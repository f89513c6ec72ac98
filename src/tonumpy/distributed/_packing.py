"""One rank's tree as byte buffers for ``gather``: described, read, and packed round by round.

[`prepare`][tonumpy.distributed._packing.prepare] describes every leaf of a rank's flattened tree
(a [`LeafInfo`][tonumpy.distributed._metadata.LeafInfo]: its code, dtype, shape and size, or its
pickled value), converting the tensors whose bytes cannot be sent as they are (sparse,
quantized, nested, subclasses, dtypes NumPy lacks) through the router
(``tonumpy.convert.leaves_to_numpy``), as ``to_numpy`` would;
[`make_pieces`][tonumpy.distributed._packing.make_pieces] reads each leaf's bytes (failing there,
where every rank learns of it, never in a collective). The data then travels in the rounds of
the plan every rank made from the metadata (``_metadata.Plan``):
[`pack_round`][tonumpy.distributed._packing.pack_round] lays this rank's pieces of a round out in
one ``uint8`` buffer, at the offsets the plan gives them.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from optree import PyTreeSpec

from .. import _dtypes, _tree
from .._combine._columns import Jagged
from .._dtypes import PLAIN
from ..convert import leaves_to_numpy
from ..errors import ConversionError
from ._metadata import ARRAY, DTENSOR, JAGGED, OBJECT, TENSOR, LeafInfo, Piece

__all__ = [
    "SENDABLE",
    "Prepared",
    "full_tensors",
    "make_pieces",
    "pack_round",
    "prepare",
    "rows_first_bytes",
]

#: torch dtypes sent as raw bytes (others are converted on their rank first, then sent).
SENDABLE: frozenset[torch.dtype] = _dtypes.NATIVE | frozenset(_dtypes.ML_DTYPES)


class Prepared:
    """One rank's tree, ready to send: its structure, metadata and each leaf's bytes."""

    __slots__ = ("error", "flat", "infos", "sources", "spec")

    def __init__(self) -> None:
        self.spec: PyTreeSpec | None = None
        self.infos: list[LeafInfo] = []
        self.sources: list[Any] = []  # per leaf: the tensor/array whose bytes are sent, or None
        self.error: BaseException | None = None
        # per leaf: its bytes, flat (rows first once rows_first_bytes ran), or None
        self.flat: list[Any] = []


# ------------------------------------------------------------------------------ describing


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


def _leaves_to_numpy_at(
    leaves: list[Any], spec: PyTreeSpec, positions: list[int], ml_dtypes: bool
) -> list[Any]:
    """The tensors at ``positions`` (whose bytes cannot be sent as they are), converted.

    Through the router, as ``to_numpy`` converts them (errors name the leaf's path); a nested
    tensor's rows become a ``Jagged`` list, joined with the other ranks' rows.
    """
    picked: list[Any] = [None] * len(leaves)
    for i in positions:
        picked[i] = leaves[i]
    converted = leaves_to_numpy(picked, spec, ml_dtypes=ml_dtypes)
    return [
        Jagged(new) if type(new) is list else new for new in map(converted.__getitem__, positions)
    ]


def _describe_leaf(
    leaf: Any, index: int, spec: PyTreeSpec, *, remote: bool
) -> tuple[LeafInfo, Any] | None:
    """One leaf's description and the source of its bytes (the leaf itself when kept local).

    None for a tensor whose bytes cannot be sent as they are: it is converted first.
    """
    if _is_dtensor(leaf):
        return _sized(DTENSOR, leaf.dtype, tuple(leaf.shape)), leaf
    t = _sendable_tensor(leaf)
    if t is not None:
        return _sized(TENSOR, t.dtype, tuple(t.shape)), t
    if isinstance(leaf, torch.Tensor):
        return None
    if isinstance(leaf, Jagged):  # rows: joined with the other ranks' (and put in order)
        if not remote:
            return LeafInfo(OBJECT, JAGGED, (len(leaf),), 0, None), leaf
        return LeafInfo(OBJECT, JAGGED, (len(leaf),), 0, _pickled(list(leaf), index, spec)), None
    arr = _sendable_array(leaf)
    if arr is not None:
        return _sized(ARRAY, arr.dtype, arr.shape), arr
    # Arrays NumPy cannot view as bytes (str, object, datetime) are pickled but keep their
    # shape and dtype in the metadata: concat treats them as arrays, and so do the checks.
    dtype, shape = None, None
    if isinstance(leaf, np.ndarray | np.generic):
        dtype, shape = np.asarray(leaf).dtype, np.shape(leaf)
    if not remote:
        return LeafInfo(OBJECT, dtype, shape, 0, None), leaf
    return LeafInfo(OBJECT, dtype, shape, 0, _pickled(leaf, index, spec)), None


def _sized(code: str, dtype: Any, shape: tuple[int, ...]) -> LeafInfo:
    """The description of a leaf sent as bytes."""
    return LeafInfo(code, dtype, shape, math.prod(shape) * _itemsize(dtype), None)


def _pickled(leaf: Any, index: int, spec: PyTreeSpec) -> bytes:
    try:
        return pickle.dumps(leaf, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        path, place = _tree.leaf_path(spec, index)
        raise ConversionError(
            f"gather() cannot send {place} ({type(leaf).__name__}) to the other ranks: it is "
            f"not a tensor or array, and pickling it failed ({type(exc).__name__}: {exc}); "
            "drop it from the tree or turn it into a picklable value",
            path=path,
        ) from exc


def _itemsize(dtype: Any) -> int:
    return int(dtype.itemsize)


def prepare(leaves: list[Any], spec: PyTreeSpec, *, remote: bool, ml_dtypes: bool) -> Prepared:
    """Classify a rank's flattened tree: every leaf's metadata, and the source of its bytes."""
    prep = Prepared()
    prep.spec = spec
    odd: list[int] = []
    described = []
    for index, leaf in enumerate(leaves):
        found = _describe_leaf(leaf, index, spec, remote=remote)
        if found is None:
            odd.append(index)
        described.append(found)
    if odd:
        for index, value in zip(
            odd, _leaves_to_numpy_at(leaves, spec, odd, ml_dtypes), strict=True
        ):
            described[index] = _describe_leaf(value, index, spec, remote=remote)
    for found in described:
        assert found is not None  # noqa: S101 - converted leaves are no tensors
        info, source = found
        prep.infos.append(info)
        prep.sources.append(source)
    prep.flat = [None] * len(leaves)
    return prep


# ------------------------------------------------------------------------------ reading


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
        if info.code == OBJECT or (info.code == DTENSOR) != dtensors or not info.nbytes:
            continue
        source = prep.sources[i]
        try:
            prep.flat[i] = _host_bytes(source) if on_host else _byte_view(source, device)
        except Exception as exc:
            path, place = _tree.leaf_path(prep.spec, i)
            raise ConversionError(
                f"gather() cannot read the data of {place} ({type(source).__name__}): "
                f"{type(exc).__name__}: {exc}",
                path=path,
            ) from exc


def rows_first_bytes(prep: Prepared, axes: Sequence[int]) -> None:
    """Reorder the bytes of every leaf concatenated along an axis other than 0, rows first."""
    for i, info in enumerate(prep.infos):
        ax, flat, shape = axes[i], prep.flat[i], info.shape
        if not ax or flat is None or not shape or not info.nbytes:
            continue
        grid = flat.reshape(*shape, _itemsize(info.dtype))
        if isinstance(flat, np.ndarray):
            prep.flat[i] = np.ascontiguousarray(np.moveaxis(grid, ax, 0)).reshape(-1)
        else:
            prep.flat[i] = grid.movedim(ax, 0).contiguous().reshape(-1)


def full_tensors(prep: Prepared) -> None:
    """Materialise the DTensor leaves (a collective each, in leaf order, on every rank)."""
    for i, info in enumerate(prep.infos):
        if info.code == DTENSOR:
            prep.sources[i] = prep.sources[i].full_tensor()


# ------------------------------------------------------------------------------ sending


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
