"""The ``pad_value=`` option: which value pads which leaf, checked against the leaf's dtype.

``concat``, ``Accumulator``, ``gather`` and ``Activations.concat`` take the same option: a
value for every leaf, a mapping from key-path pattern to value (the patterns of
``tonumpy._combine._select``: a key path or a bare key; prefixes cover whole subtrees, ``()`` is a
default), or a callable ``(path, dtype) -> value``. [`pad_value_for`][] resolves it for one
leaf; [`check_pad_value`][] decides whether the leaf's dtype holds the value exactly,
because padding never changes a dtype and never wraps a value around.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any, TypeAlias

import numpy as np

from .._dtypes import is_ml_dtype
from .._options import check_callable_signature
from .._tree import format_path
from ..errors import ConversionError
from ._select import lookup

__all__ = ["PadValue", "check_pad_option", "check_pad_value", "pad_value_for"]

#: What ``pad_value=`` accepts: ``None`` (no padding), a scalar, a mapping from key path (a tuple
#: of keys, indices and field names; a bare key stands for a 1-tuple) to value, or a callable
#: ``(path, dtype) -> value`` (returning ``None`` means: this leaf has no pad value).
PadValue: TypeAlias = Any


def check_pad_option(pad_value: PadValue, caller: str) -> None:
    """Raise [`OptionError`][] if a callable ``pad_value`` is unusable.

    A callable is called as ``pad_value(path, dtype)``: one that cannot take those two
    arguments is refused before any work, not at the first ragged batch.

    Examples:
        >>> check_pad_option(lambda path, dtype: 0, "concat")
        >>> check_pad_option(lambda dtype: 0, "concat")
        Traceback (most recent call last):
        ...
        tonumpy.errors.OptionError: concat(pad_value=...): a callable pad_value is called as ...
    """
    if _is_pad_callable(pad_value):
        check_callable_signature(
            pad_value,
            (("key",), np.dtype(np.float32)),
            f"{caller}(pad_value=...): a callable pad_value is called as pad_value(path, dtype) "
            "and returns the value (or None)",
        )


def _is_pad_callable(pad_value: PadValue) -> bool:
    return (
        callable(pad_value)
        and not isinstance(pad_value, Mapping | np.generic | np.ndarray)
        and not hasattr(pad_value, "numel")  # a one-element tensor is a value
    )


def pad_value_for(
    pad_value: PadValue, path: tuple[Any, ...], dtype: np.dtype[Any], place: str | None = None
) -> np.ndarray | None:
    """Resolve ``pad_value`` for the leaf at ``path`` and check that it fits ``dtype``.

    Signature: ``pad_value_for(pad_value, path, dtype) -> 0-d ndarray of dtype, or None``.

    * ``None`` gives ``None`` (the leaf has no pad value: ragged chunks are an error).
    * A mapping is looked up with ``path``; when ``path`` itself is not a key, the longest key
      that is a prefix of it applies, so ``{("hidden",): 0.0}`` covers ``("hidden", 2)`` and
      ``{(): 0}`` is a default for every leaf. A key that is not a tuple stands for the 1-tuple
      (``{"labels": -100}`` is ``{("labels",): -100}``). No matching key gives ``None``.
    * A callable is called as ``pad_value(path, dtype)``; it may return ``None``.
    * Anything else is the value for every leaf.

    Examples:
        >>> import numpy as np
        >>> pad_value_for({"labels": -100, (): 0}, ("labels",), np.dtype("int64"))
        array(-100)
        >>> pad_value_for({"labels": -100, (): 0}, ("logits",), np.dtype("float32"))
        array(0., dtype=float32)
        >>> pad_value_for(lambda path, dtype: dtype.type(7), ("x",), np.dtype("uint8"))
        array(7, dtype=uint8)

    Args:
        pad_value: The user's option, as given to [`tonumpy.concat`][].
        path: The leaf's key path, as ``optree.tree_paths`` gives it.
        dtype: The dtype of the padded result.
        place: How error messages name the leaf (default: rendered from ``path``).

    Returns:
        A 0-d array of ``dtype`` holding the value, or ``None`` when no value applies.

    Raises:
        ConversionError: The value cannot be represented in ``dtype`` (see
            ``check_pad_value``).
    """
    if pad_value is None:
        return None
    if isinstance(pad_value, Mapping):
        value = lookup(pad_value, path)
    elif _is_pad_callable(pad_value):
        value = pad_value(path, dtype)
    else:
        value = pad_value
    if value is None:
        return None
    return check_pad_value(value, dtype, path, place)


def _float_like(dtype: np.dtype[Any]) -> bool:
    # ml_dtypes floats (bfloat16, float8_*): kind "V", but they behave as floats.
    return dtype.kind in "fc" or is_ml_dtype(dtype)


def _as_integer(value: Any) -> int | None:
    """The Python int equal to the number ``value``, or None if it is not an integral number.

    Exact for every width: integers (and bools) become Python ints as they are, floats
    (NumPy's, ``ml_dtypes``' and ``longdouble`` included) only when finite and integral, and
    complex numbers only when their imaginary part is zero. Strings and other objects are not
    numbers here.
    """
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value[()]
    if isinstance(value, numbers.Integral | np.bool_):
        return int(value)
    if isinstance(value, complex | np.complexfloating):
        return _as_integer(value.real) if value.imag == 0 else None
    if isinstance(value, float | np.floating):
        number: Any = value  # np.longdouble stays as it is: float() would round it
    elif isinstance(value, np.generic) and _float_like(value.dtype):
        number = float(value)  # bfloat16, float8: exact in a Python float
    else:
        return None
    if not np.isfinite(number) or number != np.floor(number):
        return None
    return int(number)


def _fits_integer(value: Any, dtype: np.dtype[Any]) -> np.ndarray | None:
    """``value`` as a 0-d array of the integer or bool ``dtype``, if it holds it exactly."""
    number = _as_integer(value)
    if number is None:
        return None
    if dtype.kind == "b":
        low, high = 0, 1
    else:
        info = np.iinfo(dtype)
        low, high = int(info.min), int(info.max)
    if not low <= number <= high:
        return None
    return np.array(number, dtype=dtype)


def _fits(given: np.ndarray, dtype: np.dtype[Any]) -> tuple[bool, np.ndarray | None]:
    """Whether the 0-d array ``given`` fits ``dtype``, and the cast value if it does."""
    if given.dtype.kind == "c" and dtype.kind != "c":
        if given.imag != 0:
            return False, None
        given = given.real
    try:
        with np.errstate(all="ignore"):
            cast = given.astype(dtype)
            if _float_like(dtype) and given.dtype.kind in "biuf":
                want = given.astype(np.float64)
                back = cast.astype(np.float64)
            elif _float_like(dtype) and given.dtype.kind == "c":
                want = given.astype(np.complex128)
                back = cast.astype(np.complex128)
            else:  # exact: integers, bools, strings, datetimes
                return bool(np.all(cast.astype(given.dtype) == given)), cast
    except (TypeError, ValueError, OverflowError):
        return False, None
    finite = np.isfinite(want)
    ok = np.where(finite, np.isfinite(back), np.isnan(want) & np.isnan(back) | (back == want))
    return bool(np.all(ok)), cast


def check_pad_value(
    value: Any, dtype: np.dtype[Any], path: tuple[Any, ...] | None, place: str | None = None
) -> np.ndarray:
    """``value`` as a 0-d array of ``dtype``, or an error if ``dtype`` cannot represent it.

    Signature: ``check_pad_value(value, dtype, path) -> 0-d ndarray of dtype``.

    Integers and bools must hold the value exactly (``-100`` does not fit ``uint8``, ``uint64``
    or ``bool``, ``2**63`` does not fit ``int64``, ``0.5`` does not fit ``int64``): the value is
    compared as a Python int with the dtype's bounds, never through a NumPy cast that could wrap
    around; float values (``ml_dtypes``' too) must be finite and integral. Float dtypes
    (NumPy's and ``ml_dtypes``') may round a finite value but not overflow it to infinity;
    ``nan`` and ``inf`` must exist in the dtype. Object arrays
    take anything. Other dtypes (strings, datetimes) must hold the value exactly. A 0-d tensor
    is read with ``.item()``.

    Examples:
        >>> import numpy as np
        >>> check_pad_value(-100, np.dtype("int16"), ("labels",))
        array(-100, dtype=int16)
        >>> check_pad_value(-100, np.dtype("uint64"), ("labels",))
        Traceback (most recent call last):
        ...
        tonumpy.errors.ConversionError: pad_value -100 cannot be represented in uint64, ...
        >>> check_pad_value(2**64 - 1, np.dtype("uint64"), ("ids",))
        array(18446744073709551615, dtype=uint64)

    Raises:
        ConversionError: The value does not fit; the message names ``path`` and the dtype.
    """
    if dtype.kind == "O":
        out = np.empty((), dtype=dtype)
        out[()] = value
        return out
    if hasattr(value, "numel") and hasattr(value, "item") and value.numel() == 1:
        value = value.item()  # a one-element tensor
    given = np.asarray(value)
    place = format_path(path) if place is None else place
    if given.ndim != 0:
        raise ConversionError(
            f"pad_value for {place} must be a single value, got an array of shape {given.shape}",
            path=path,
        )
    if dtype.kind in "biu":  # compared as Python ints: exact at every width, no wrap-around
        cast = _fits_integer(value, dtype)
        ok = cast is not None
    else:
        ok, cast = _fits(given, dtype)
    if not ok or cast is None:
        raise ConversionError(
            f"pad_value {value!r} cannot be represented in {dtype}, the dtype of {place}; "
            "padding never changes a dtype: pass a value that fits, for this leaf alone with "
            f"pad_value={{{path!r}: value}}",
            path=path,
        )
    return cast
