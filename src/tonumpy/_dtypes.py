"""Dtype tables: native torch dtypes, their ``ml_dtypes`` twins, and how the rest are widened.

Kept free of per-call work: every table is built once at import, from the dtypes the installed
torch actually defines (older releases lack some float8 and float4 types).
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import numpy as np
import torch

from .errors import UnsupportedLeafError

#: The plain tensor types: exactly these (not subclasses) take ``numpy(force=True)`` as the
#: whole conversion when it succeeds, and are written to files as they are. A frozenset, so
#: that ``type(x) in PLAIN`` and ``types <= PLAIN`` are both one hash lookup.
PLAIN: frozenset[type] = frozenset({torch.Tensor, torch.nn.Parameter})

#: torch dtypes that ``Tensor.numpy()`` supports as they are.
NATIVE: frozenset[torch.dtype] = frozenset(
    getattr(torch, name)
    for name in (
        "bool",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "int8",
        "int16",
        "int32",
        "int64",
        "float16",
        "float32",
        "float64",
        "complex64",
        "complex128",
    )
    if hasattr(torch, name)
)

#: torch dtypes that have a bit-identical ``ml_dtypes`` type (same name in both libraries).
_ML_NAMES = (
    "bfloat16",
    "float8_e4m3fn",
    "float8_e4m3fnuz",
    "float8_e5m2",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",
)
ML_DTYPES: dict[torch.dtype, str] = {
    getattr(torch, name): name for name in _ML_NAMES if hasattr(torch, name)
}

#: Two float4 (e2m1) values per byte; the first value sits in the low nibble.
FLOAT4_X2: torch.dtype | None = getattr(torch, "float4_e2m1fn_x2", None)

#: The value of each of the 16 e2m1 codes (sign bit 3, exponent bits 2-1, mantissa bit 0).
_E2M1_VALUES = np.array(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
    dtype=np.float32,
)

#: An integer torch dtype of each item size, to move raw bits without touching values.
BITS: dict[int, torch.dtype] = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

#: 1-byte float types without a negative zero: their byte 0x80 is NaN, and -0 is 0.
_NO_NEGATIVE_ZERO = frozenset(
    getattr(torch, name) for name in ("float8_e4m3fnuz", "float8_e5m2fnuz") if hasattr(torch, name)
)
#: float8_e8m0fnu holds powers of two only: it has no sign bit, so no negated value exists.
_UNSIGNED = frozenset(getattr(torch, name) for name in ("float8_e8m0fnu",) if hasattr(torch, name))


def resolve_neg(t: torch.Tensor) -> torch.Tensor:
    """``t.resolve_neg()``, also for float8 dtypes, which torch cannot negate.

    A tensor with the negative bit set reads as the negation of what it stores. For float8
    the negation is done on the bits: the sign bit is flipped, except in the ``fnuz`` types
    for the zero and NaN bytes (0x00 and 0x80), which negation leaves as they are.

    Examples:
        >>> v = torch._neg_view(torch.tensor([1.5, -2.0]).to(torch.float8_e4m3fn))
        >>> resolve_neg(v).float()
        tensor([-1.5000,  2.0000])

    Raises:
        UnsupportedLeafError: ``float8_e8m0fnu`` with the negative bit: it has no negative
            values.
    """
    dtype = t.dtype
    if dtype.itemsize != 1 or dtype not in ML_DTYPES:
        return t.resolve_neg()
    if dtype in _UNSIGNED:
        msg = f"{dtype} has no sign bit, so the negated values of this negative view do not exist"
        raise UnsupportedLeafError(msg)
    stored = torch._neg_view(t).view(torch.uint8)  # noqa: SLF001 - negating twice clears the bit
    flipped = stored ^ 0x80
    if dtype in _NO_NEGATIVE_ZERO:
        flipped = torch.where(stored & 0x7F == 0, stored, flipped)
    return flipped.view(dtype)


_ml_module: ModuleType | None = None


def ml_dtypes_module() -> ModuleType:
    """Import ``ml_dtypes`` on first use.

    Raises:
        UnsupportedLeafError: ml_dtypes is not installed; the message says how to install it.
    """
    global _ml_module  # noqa: PLW0603 - a lazily imported module, cached once
    if _ml_module is None:
        try:
            _ml_module = importlib.import_module("ml_dtypes")
        except ImportError as exc:
            raise UnsupportedLeafError.naming(
                "",
                "ml_dtypes",
                " needs the 'ml_dtypes' package: pip install ml_dtypes (or pip install "
                "'tonumpy[ml_dtypes]'); or pass ml_dtypes=False to widen bfloat16/float8 to "
                "float32 instead",
            ) from exc
    return _ml_module


def ml_numpy_dtype(dtype: torch.dtype) -> np.dtype[Any]:
    """The ``ml_dtypes`` NumPy dtype that holds ``dtype``'s bits exactly."""
    result: np.dtype[Any] = np.dtype(getattr(ml_dtypes_module(), ML_DTYPES[dtype]))
    return result


def unpack_float4(codes: np.ndarray, *, ml_dtypes: bool) -> np.ndarray:
    """Unpack ``float4_e2m1fn_x2`` bytes (shape ``(..., n)``) into ``(..., 2n)`` values.

    Examples:
        >>> unpack_float4(np.array([0x21], dtype=np.uint8), ml_dtypes=False)
        array([0.5, 1. ], dtype=float32)
    """
    low = codes & 0x0F
    high = codes >> 4
    both = np.stack([low, high], axis=-1).reshape(*codes.shape[:-1], -1)
    if ml_dtypes:
        return both.view(ml_dtypes_module().float4_e2m1fn)
    return _E2M1_VALUES[both]


def is_ml_dtype(dtype: np.dtype[Any]) -> bool:
    """Whether ``dtype`` is one of ``ml_dtypes``' types (bfloat16, float8_*, float4, ...).

    Examples:
        >>> is_ml_dtype(np.dtype("float32")), is_ml_dtype(np.dtype("V2"))
        (False, False)
    """
    return dtype.type.__module__.startswith("ml_dtypes")


def torch_dtype_of(dtype: np.dtype[Any]) -> torch.dtype | None:
    """The torch dtype whose bits an ``ml_dtypes`` array holds, or None for other dtypes.

    Examples:
        >>> torch_dtype_of(np.dtype("float32")) is None
        True
    """
    if not is_ml_dtype(dtype):
        return None
    module = ml_dtypes_module()
    for torch_dtype, name in ML_DTYPES.items():
        if dtype == np.dtype(getattr(module, name)):
            return torch_dtype
    return None


def widened(t: torch.Tensor) -> np.ndarray:
    """A bfloat16/float8 tensor's values as a new float32 array on the host.

    The one widening of a whole tensor (the converter, the file writers):
    exact, since float32 holds every bfloat16 and float8 value. A negative view is the
    caller's to resolve first (``resolve_neg``).

    Examples:
        >>> widened(torch.tensor([0.5, -2.0], dtype=torch.bfloat16))
        array([ 0.5, -2. ], dtype=float32)
    """
    return t.to(device="cpu", dtype=torch.float32).numpy()


def bit_view(t: torch.Tensor) -> np.ndarray:
    """A host bfloat16/float8 tensor as its ``ml_dtypes`` array over the same bytes (no copy).

    The one bit view (the converter, the file writers store the same bits as unsigned ints).

    Examples:
        >>> bit_view(torch.tensor([1.5], dtype=torch.bfloat16)).dtype.name
        'bfloat16'
    """
    return t.view(BITS[t.dtype.itemsize]).numpy().view(ml_numpy_dtype(t.dtype))


def widen_bfloat16_bits(bits: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """float32 values of bfloat16 bit patterns (``uint16``): exact, NaN payloads included.

    A bfloat16 is the top half of a float32, so the widening is a 16-bit left shift. ``out``
    (``uint32``, the shape of ``bits``) receives the result when given (a writer widening a
    file chunk by chunk reuses one buffer).

    Examples:
        >>> widen_bfloat16_bits(np.array([0x3FC0, 0xFF80], dtype=np.uint16))
        array([ 1.5, -inf], dtype=float32)
    """
    if out is None:
        out = np.empty(bits.shape, np.uint32)
    np.left_shift(bits, 16, out=out, dtype=np.uint32)
    result: np.ndarray = out.view(np.float32)
    return result


_f8_tables: dict[torch.dtype, np.ndarray] = {}


def float8_table(dtype: torch.dtype) -> np.ndarray:
    """The float32 value of each of the 256 codes of a float8 dtype, as torch computes it.

    Examples:
        >>> float8_table(torch.float8_e4m3fn)[0x38]
        np.float32(1.0)
    """
    table = _f8_tables.get(dtype)
    if table is None:
        codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
        table = _f8_tables[dtype] = codes.view(dtype).float().numpy()
    result: np.ndarray = table
    return result
