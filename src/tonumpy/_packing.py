"""One rank's tree as one byte buffer for ``gather``, and the leaves back from the buffers.

[`prepare`][tonumpy._packing.prepare] flattens a rank's tree and describes every leaf (its
code, dtype, shape, offset and size, or its pickled value);
[`make_pieces`][tonumpy._packing.make_pieces] reads each leaf's bytes (failing there, where
every rank learns of it, never in a collective); [`pack_buffer`][tonumpy._packing.pack_buffer]
lays them out in one ``uint8`` buffer, larger items first so every offset is aligned;
[`rebuild`][tonumpy._packing.rebuild] cuts a received buffer back into one rank's leaves.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from optree import PyTreeSpec

from . import _dtypes, _tree
from ._columns import Kind
from ._leaf import PLAIN, convert_checked
from .errors import ConversionError

__all__ = [
    "ALIGN",
    "ARRAY",
    "DTENSOR",
    "OBJECT",
    "SENDABLE",
    "TENSOR",
    "Info",
    "Prepared",
    "info_kind",
    "is_dtensor",
    "make_pieces",
    "numpy_dtype",
    "pack_buffer",
    "prepare",
    "rebuild",
]

# Leaf codes in the metadata.
TENSOR = "t"  # a tensor sent as raw bytes, rebuilt as a tensor of the same dtype
ARRAY = "n"  # an ndarray sent as raw bytes, rebuilt as an ndarray of the same dtype
DTENSOR = "d"  # a DTensor: materialised with full_tensor() after the checks, then sent as bytes
OBJECT = "o"  # anything else: pickled into the metadata

#: torch dtypes sent as raw bytes (others are converted on their rank first, then sent).
SENDABLE: frozenset[torch.dtype] = _dtypes.NATIVE | frozenset(_dtypes.ML_DTYPES)
ALIGN = 16  # the largest item size sent (complex128)

# One leaf's metadata: (code, dtype, shape, offset, nbytes, payload). ``dtype`` is a torch or
# NumPy dtype (None for objects); ``payload`` is the pickled value of an object leaf.
Info = tuple[str, Any, tuple[int, ...] | None, int, int, bytes | None]


class Prepared:
    """One rank's tree, ready to send: leaves, metadata and the byte layout."""

    __slots__ = ("error", "infos", "leaves", "nbytes", "order", "pieces", "sources", "spec")

    def __init__(self) -> None:
        self.leaves: list[Any] = []
        self.spec: PyTreeSpec | None = None
        self.infos: list[Info] = []
        self.sources: list[Any] = []  # per leaf: the tensor/array whose bytes are sent, or None
        self.order: list[int] = []  # leaf indices in buffer order
        self.nbytes = 0
        self.error: BaseException | None = None
        # per sized leaf, in buffer order: its bytes, flat, ready to copy into the buffer
        self.pieces: list[Any] = []


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
        leaf = convert_checked(leaf, index, spec, copy=None, ml_dtypes=ml_dtypes, scalars=False)
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
    return OBJECT, dtype, shape, None, payload


def _itemsize(dtype: Any) -> int:
    return int(dtype.itemsize)


def prepare(
    tree: Any,
    *,
    remote: bool,
    ml_dtypes: bool,
    is_leaf: Callable[[Any], bool] | None,
) -> Prepared:
    """Flatten and classify the local tree; lay its bytes out in one buffer."""
    prep = Prepared()
    prep.leaves, prep.spec = _tree.flatten(tree, is_leaf=is_leaf)
    classified = []
    for index, leaf in enumerate(prep.leaves):
        classified.append(
            _describe_leaf(leaf, index, prep.spec, remote=remote, ml_dtypes=ml_dtypes)
        )
    # Larger items first: every offset is then a multiple of its leaf's item size, with no gaps.
    sized = [i for i, c in enumerate(classified) if c[0] != OBJECT]
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


def make_pieces(prep: Prepared, device: torch.device, *, dtensors: bool) -> None:
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
        if (prep.infos[i][0] == DTENSOR) != dtensors or not prep.infos[i][4]:
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


def pack_buffer(prep: Prepared, size: int, device: torch.device) -> torch.Tensor:
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
    return "array" if info[2] else "scalar"


def rebuild(info: Info, row: torch.Tensor, row_np: np.ndarray, ml_dtypes: bool) -> Any:
    """One leaf of one rank: a view of its bytes in the gathered buffer, or the unpickled value.

    Tensors of dtypes NumPy has come back as arrays (what ``concat`` would make of them);
    bfloat16/float8 as tensors, which ``concat`` widens, or as ``ml_dtypes`` arrays.
    """
    code, dtype, shape, offset, nbytes, payload = info
    if code == OBJECT:
        assert payload is not None  # noqa: S101
        return pickle.loads(payload)  # noqa: S301 - sent by a rank of the user's own group
    assert shape is not None  # noqa: S101
    if code == ARRAY:
        return row_np[offset : offset + nbytes].view(dtype).reshape(shape)
    if dtype not in _dtypes.ML_DTYPES or ml_dtypes:
        np_dtype = numpy_dtype(code, dtype, ml_dtypes)
        return row_np[offset : offset + nbytes].view(np_dtype).reshape(shape)
    return row[offset : offset + nbytes].view(dtype).reshape(shape)
