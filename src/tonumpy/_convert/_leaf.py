"""One leaf, carefully: every kind of tensor to an array, and an array (back) to a tensor.

This is the converter every route ends in when a leaf is not a plain CPU tensor of a NumPy
dtype: it detaches, unwraps ordinary subclasses, densifies sparse layouts, dequantizes,
resolves conjugate/negative bits, widens the dtypes NumPy lacks (or views their bits as
``ml_dtypes``), brings the data to the host, and refuses what has no data to read (meta, fake
and functorch-wrapped tensors) with a reason. It knows nothing of trees: the router
([`tonumpy.convert`][]) and the engine (``tonumpy._convert._transfer``) call it per leaf, and
[`leaf_to_numpy`][tonumpy._convert._leaf.leaf_to_numpy] turns a refusal into an error naming the
leaf's path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from optree import PyTreeSpec

from .. import _dtypes, _tree
from .._dtypes import PLAIN
from .._options import Copy
from ..errors import ConversionError, TonumpyError, UnsupportedLeafError

__all__ = [
    "PLAIN",
    "SET_FLAGS",
    "LeafError",
    "array_to_tensor",
    "describe",
    "leaf_error",
    "leaf_to_numpy",
    "move",
    "needs_copy",
    "read_only",
    "tensor_to_numpy",
]


#: ``ndarray.setflags``, called positionally by ``read_only``; a bulk pass calls it inline,
#: ``SET_FLAGS(arr, False)``, to apply ``read_only``'s rule without a Python frame per leaf.
SET_FLAGS: Callable[..., None] = np.ndarray.setflags


def read_only(arr: np.ndarray) -> np.ndarray:
    """Make ``arr``, a view of a tensor that requires grad, read-only; ``arr``.

    The one home of the read-only rule, which every route calls for such a view: autograd may
    have saved that very memory for the backward pass, and writing to it would change the
    gradients silently (which is why ``Tensor.numpy()`` refuses such tensors). A copy or a
    widened array owns its memory and stays writeable. Callers test ``t.requires_grad``
    themselves, so that a leaf that does not require grad pays no call.
    """
    SET_FLAGS(arr, False)  # write=False; positional: half the cost of the keyword
    return arr


_is_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor  # noqa: SLF001 - no public check


class LeafError(Exception):
    """A refusal raised by per-leaf code, which does not know the leaf's path.

    [`leaf_to_numpy`][tonumpy._convert._leaf.leaf_to_numpy] (or the caller that knows the path)
    turns it into an [`UnsupportedLeafError`][tonumpy.UnsupportedLeafError] (``unsupported``) or a
    [`ConversionError`][tonumpy.ConversionError].
    """

    def __init__(self, reason: str, *, unsupported: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.unsupported = unsupported


def needs_copy(copy: Copy, what: str) -> None:
    """Raise a ``LeafError`` if ``copy=False`` forbids the copy that ``what`` describes."""
    if copy is False:
        raise LeafError(f"copy=False, but {what}; pass copy=None to allow it", unsupported=False)


def describe(leaf: Any) -> str:
    """A short description of a leaf for error messages: type, shape, dtype, device."""
    if isinstance(leaf, torch.Tensor):
        try:
            return (
                f"{type(leaf).__name__} of shape {tuple(leaf.shape)}, dtype={leaf.dtype}, "
                f"device={leaf.device}"
            )
        except Exception:  # noqa: BLE001 - a tensor too broken to describe
            return type(leaf).__name__
    if isinstance(leaf, np.ndarray):
        return f"ndarray of shape {leaf.shape}, dtype={leaf.dtype}"
    return type(leaf).__name__


def leaf_error(
    spec: PyTreeSpec, index: int, leaf: Any, reason: str, *, unsupported: bool
) -> TonumpyError:
    """The error for leaf ``index`` of ``spec``: its path, what it is, and ``reason``."""
    path, place = _tree.leaf_path(spec, index)
    cls = UnsupportedLeafError if unsupported else ConversionError
    return cls(f"cannot convert {place} ({describe(leaf)}): {reason}", path=path)


def _unwrap_subclass(t: torch.Tensor) -> torch.Tensor:
    """A plain ``torch.Tensor`` sharing ``t``'s data, or an explanation of why there is none."""
    cls = type(t)
    if getattr(cls, "__torch_dispatch__", None) is torch.Tensor.__torch_dispatch__:
        # An ordinary Python subclass (nn.Parameter, user classes): same storage underneath.
        return t.detach().as_subclass(torch.Tensor)
    name = cls.__name__
    if name == "FakeTensor" or "fake" in cls.__module__:
        reason = "fake tensors (torch.compile tracing, FakeTensorMode) carry no data"
    elif name == "DTensor":
        reason = "a DTensor is spread over ranks; call .full_tensor() on every rank first"
    else:
        reason = (
            f"the tensor subclass {cls.__module__}.{name} keeps its data in its own form; "
            "convert it to a plain tensor first"
        )
    raise LeafError(reason, unsupported=True)


def _check_readable(t: torch.Tensor) -> None:
    """Raise ``LeafError`` for tensors that have no data to read: meta, functorch-wrapped."""
    if t.is_meta:
        raise LeafError(
            "meta tensors have a shape and dtype but no data; materialise it on a real device "
            "first (for a model: model.to_empty(device='cpu') and load its weights)",
            unsupported=True,
        )
    if _is_functorch_wrapped(t):
        raise LeafError(
            "the tensor is wrapped by a torch.func transform (vmap, grad, jacrev, ...) and has "
            "no data of its own there; convert the transform's result after it returns",
            unsupported=True,
        )


def tensor_to_numpy(
    t: torch.Tensor, copy: Copy, ml_dtypes: bool, scalars: bool, guarded: bool = False
) -> Any:
    """Convert one tensor of any kind. Raises ``LeafError`` on failure.

    ``guarded``: the tensor is part of one that requires grad (a nested tensor's component),
    so a view of its memory is made read-only, as one of a tensor requiring grad is
    (``read_only``).
    """
    guarded = guarded or t.requires_grad
    if t.is_nested:  # strided nested tensors and jagged ones (a Python subclass) alike
        parts = t.detach().unbind()
        return [tensor_to_numpy(c, copy, ml_dtypes, scalars, guarded) for c in parts]
    if type(t) not in PLAIN:
        t = _unwrap_subclass(t)
    _check_readable(t)
    t = t.detach()
    fresh = False
    if t.layout != torch.strided:
        needs_copy(copy, f"{t.layout} tensors are densified, which copies")
        t, fresh = t.to_dense(), True
    if t.is_quantized:
        needs_copy(copy, "quantized tensors are dequantized, which copies")
        t, fresh = t.dequantize(), True
    if scalars and t.dim() == 0 and t.dtype != _dtypes.FLOAT4_X2:
        return t.item()
    arr, converted = _strided_to_numpy(t, copy, ml_dtypes)
    fresh = fresh or converted
    if copy and not fresh:
        arr = arr.copy()
    elif guarded and not fresh:
        read_only(arr)
    return arr


def _strided_to_numpy(t: torch.Tensor, copy: Copy, ml_dtypes: bool) -> tuple[np.ndarray, bool]:
    """A detached, strided tensor of any dtype as an array, and whether that is a new copy."""
    fresh = False
    dtype = t.dtype
    on_cpu = t.device.type == "cpu"
    if dtype in _dtypes.NATIVE or dtype == torch.complex32:
        if t.is_conj() or t.is_neg():
            needs_copy(copy, "its conjugate/negative bit must be resolved, which copies")
            t, fresh = t.resolve_conj().resolve_neg(), True
        if dtype == torch.complex32:
            needs_copy(copy, "complex32 is widened to complex64, which copies")
            t, fresh = t.to(torch.complex64), True
        if not on_cpu:
            needs_copy(copy, f"it must be copied from {t.device} to the host")
            t, fresh = t.cpu(), True
        return t.numpy(), fresh
    if dtype in _dtypes.ML_DTYPES:
        if t.is_neg():  # neither a bit view nor a float8 widening can read it as it is
            needs_copy(copy, "its negative bit must be resolved, which copies")
            t, fresh = _dtypes.resolve_neg(t), True
        if not ml_dtypes:
            needs_copy(
                copy, f"{dtype} is widened to float32, which copies (ml_dtypes=True does not)"
            )
            return _dtypes.widened(t), True
        if not on_cpu:
            needs_copy(copy, f"it must be copied from {t.device} to the host")
            t, fresh = t.cpu(), True
        return _dtypes.bit_view(t), fresh
    if dtype == _dtypes.FLOAT4_X2:
        needs_copy(copy, "float4_e2m1fn_x2 values are unpacked, one per element, which copies")
        codes = t.view(torch.uint8).cpu().numpy()
        return _dtypes.unpack_float4(codes, ml_dtypes=ml_dtypes), True
    raise LeafError(f"{dtype} has no NumPy equivalent and no exact widening", unsupported=True)


def _one_to_numpy(leaf: Any, copy: Copy, ml_dtypes: bool, scalars: bool) -> Any:
    if isinstance(leaf, torch.Tensor):
        return tensor_to_numpy(leaf, copy, ml_dtypes, scalars)
    if copy and isinstance(leaf, np.ndarray):
        return leaf.copy()
    return leaf


def leaf_to_numpy(
    leaf: Any, index: int, spec: PyTreeSpec, *, copy: Copy, ml_dtypes: bool, scalars: bool
) -> Any:
    """Convert leaf ``index`` of ``spec`` (tensors; arrays copied when ``copy``; others kept).

    Every failure becomes an [`UnsupportedLeafError`][tonumpy.UnsupportedLeafError] or a
    [`ConversionError`][tonumpy.ConversionError] naming the leaf's path: torch's own refusals
    never escape as a raw ``TypeError``.
    """
    try:
        return _one_to_numpy(leaf, copy, ml_dtypes, scalars)
    except LeafError as issue:
        raise leaf_error(spec, index, leaf, issue.reason, unsupported=issue.unsupported) from None
    except TonumpyError as exc:
        raise leaf_error(spec, index, leaf, str(exc), unsupported=True) from exc
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}".strip()
        raise leaf_error(spec, index, leaf, reason, unsupported=True) from exc


_NOT_TENSORS = frozenset("OUSMmV")  # object, str, bytes, datetime, timedelta, void


def array_to_tensor(
    arr: np.ndarray | np.generic,
    device: torch.device | str | None,
    dtype: torch.dtype | None,
    copy: Copy,
) -> Any:
    """An array (or NumPy scalar) as a tensor; arrays torch cannot hold are returned as they are.

    ``ml_dtypes`` arrays become the exact torch dtype. Shares memory where it can (``copy=None``)
    and raises ``LeafError`` when ``copy=False`` forbids a needed copy.
    """
    torch_bits_of = _dtypes.torch_dtype_of(arr.dtype)
    if torch_bits_of is None and arr.dtype.kind in _NOT_TENSORS:
        return arr  # as it was: a NumPy scalar stays a scalar
    if isinstance(arr, np.generic):
        arr, copy = np.asarray(arr), None  # a fresh 0-d array: nothing to share
    shared = True
    if not arr.flags.writeable or any(s < 0 for s in arr.strides) or not arr.dtype.isnative:
        needs_copy(copy, "the array is read-only, has negative strides or is byte-swapped")
        arr = np.array(arr, dtype=arr.dtype.newbyteorder("="), order="C", copy=True)
        shared = False
    elif copy:
        arr, shared = arr.copy(), False
    if torch_bits_of is not None:
        t = torch.from_numpy(arr.view(f"u{arr.dtype.itemsize}")).view(torch_bits_of)
    else:
        t = torch.from_numpy(arr)
    return move(t, device, dtype, copy if shared else None)


def move(
    t: torch.Tensor, device: torch.device | str | None, dtype: torch.dtype | None, copy: Copy
) -> torch.Tensor:
    """``t`` on ``device`` with ``dtype`` (``None``: unchanged), copied as ``copy`` says."""
    if device is None and dtype is None:
        return t.clone() if copy else t
    moved = t.to(device=device, dtype=dtype, copy=bool(copy))
    if copy is False and moved is not t:
        raise LeafError(
            f"copy=False, but moving to device={device}, dtype={dtype} copies", unsupported=False
        )
    return moved
