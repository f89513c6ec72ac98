"""Padding helpers shared by [`tonumpy.concat`][], [`tonumpy.Accumulator`][] and ``gather``.

Three main pieces, each usable on its own (their docstrings give their signatures):

* ``pad_value_for`` resolves the user's ``pad_value`` option (a scalar, a mapping from key
  path to value, or a callable ``(path, dtype) -> value``) for one leaf, and checks that the
  value fits the leaf's dtype without changing it;
* ``target_shape`` finds the shape every chunk of one leaf is padded to (the largest size in
  every dimension but the first), and names the leaf and the shapes when chunks cannot be
  padded to one shape;
* ``concat_arrays`` concatenates the chunks of one leaf along their first axis into one
  freshly allocated array, padding each chunk while it is copied (one allocation, every byte
  written once).

Everything here works on chunks whose concatenation axis has already been moved to the front
(``np.moveaxis(arr, axis, 0)``). ``check_pad_value``, ``result_dtype`` and
``copy_padded`` are the smaller steps they are built from.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeAlias

import numpy as np

from ._options import check_callable_signature
from ._tree import format_path
from .errors import ConversionError

__all__ = [
    "PadValue",
    "check_pad_option",
    "check_pad_value",
    "concat_arrays",
    "copy_padded",
    "pad_value_for",
    "result_dtype",
    "target_shape",
]

#: What ``pad_value=`` accepts: ``None`` (no padding), a scalar, a mapping from key path (a tuple
#: of keys, indices and field names; a bare key stands for a 1-tuple) to value, or a callable
#: ``(path, dtype) -> value`` (returning ``None`` means: this leaf has no pad value).
PadValue: TypeAlias = Any


def check_pad_option(pad_value: PadValue, where: str) -> None:
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
            f"{where}(pad_value=...): a callable pad_value is called as pad_value(path, dtype) "
            "and returns the value (or None)",
        )


def _is_pad_callable(pad_value: PadValue) -> bool:
    return (
        callable(pad_value)
        and not isinstance(pad_value, Mapping | np.generic | np.ndarray)
        and not hasattr(pad_value, "numel")  # a one-element tensor is a value
    )


def _lookup(mapping: Mapping[Any, Any], path: tuple[Any, ...]) -> Any:
    """The value of the longest key in ``mapping`` that is ``path`` or a prefix of it."""
    for end in range(len(path), -1, -1):
        prefix = path[:end]
        if prefix in mapping:
            return mapping[prefix]
        if end == 1 and path[0] in mapping and not isinstance(path[0], tuple):
            return mapping[path[0]]
    return None


def pad_value_for(
    pad_value: PadValue, path: tuple[Any, ...], dtype: np.dtype[Any]
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

    Returns:
        A 0-d array of ``dtype`` holding the value, or ``None`` when no value applies.

    Raises:
        ConversionError: The value cannot be represented in ``dtype`` (see
            ``check_pad_value``).
    """
    if pad_value is None:
        return None
    if isinstance(pad_value, Mapping):
        value = _lookup(pad_value, path)
    elif _is_pad_callable(pad_value):
        value = pad_value(path, dtype)
    else:
        value = pad_value
    if value is None:
        return None
    return check_pad_value(value, dtype, path)


def _float_like(dtype: np.dtype[Any]) -> bool:
    if dtype.kind in "fc":
        return True
    # ml_dtypes floats (bfloat16, float8_*): kind "V", but they behave as floats.
    return dtype.kind == "V" and dtype.type.__module__.startswith("ml_dtypes")


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


def check_pad_value(value: Any, dtype: np.dtype[Any], path: tuple[Any, ...] | None) -> np.ndarray:
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
    where = format_path(path)
    if given.ndim != 0:
        raise ConversionError(
            f"pad_value for {where} must be a single value, got an array of shape {given.shape}",
            path=path,
        )
    if dtype.kind in "biu":  # compared as Python ints: exact at every width, no wrap-around
        cast = _fits_integer(value, dtype)
        ok = cast is not None
    else:
        ok, cast = _fits(given, dtype)
    if not ok or cast is None:
        raise ConversionError(
            f"pad_value {value!r} cannot be represented in {dtype}, the dtype of {where}; "
            "padding never changes a dtype: pass a value that fits, for this leaf alone with "
            f"pad_value={{{path!r}: value}}",
            path=path,
        )
    return cast


def result_dtype(dtypes: Sequence[np.dtype[Any]], path: tuple[Any, ...] | None) -> np.dtype[Any]:
    """The dtype of the concatenation of arrays of ``dtypes`` (NumPy's promotion rules).

    Signature: ``result_dtype(dtypes, path) -> dtype``; all equal gives that dtype unchanged.

    Raises:
        ConversionError: The dtypes have no common type; the message names ``path``.
    """
    first = dtypes[0]
    if all(d == first for d in dtypes):
        return first
    try:
        return np.result_type(*dtypes)
    except TypeError as exc:
        names = sorted({str(d) for d in dtypes})
        raise ConversionError(
            f"the batches of {format_path(path)} have dtypes {names} with no common dtype; "
            "cast them to one dtype first",
            path=path,
        ) from exc


def target_shape(
    shapes: Iterable[tuple[int, ...]],
    path: tuple[Any, ...] | None,
    *,
    padded: bool,
    axis: int = 0,
) -> tuple[int, ...]:
    """The shape, without the first axis, that every chunk of one leaf is padded to.

    Signature: ``target_shape(shapes, path, *, padded, axis=0) -> tuple``. ``shapes`` are the
    chunks' full shapes with the concatenation axis first; chunks with no rows along it take no
    part (a rank or a batch with no items) unless every chunk is empty.

    Examples:
        >>> target_shape([(2, 3, 5), (4, 7, 5), (0, 9, 5)], ("logits",), padded=True)
        (7, 5)

    Args:
        shapes: The chunks' shapes, concatenation axis first.
        path: The leaf's key path, for error messages.
        padded: Whether a pad value is available; without one, differing sizes are an error.
        axis: The user's ``axis``, only to phrase error messages.

    Raises:
        ConversionError: The chunks differ in number of dimensions, or differ in size along
            another axis and ``padded`` is false; the message names ``path`` and the shapes.
    """
    shapes = list(shapes)
    ndims = {len(s) for s in shapes}
    where = format_path(path)
    if len(ndims) > 1:
        raise ConversionError(
            f"the batches of {where} have different numbers of dimensions "
            f"(shapes {_show(shapes)}); every batch of a leaf must have the same rank",
            path=path,
        )
    full = [s for s in shapes if s[0] > 0] or shapes
    target = tuple(max(sizes) for sizes in zip(*(s[1:] for s in full), strict=True))
    if not padded:
        ragged = [s for s in full if s[1:] != target]
        if ragged:
            raise ConversionError(
                f"the batches of {where} differ in size along an axis other than axis={axis} "
                f"(shapes, axis {axis} first: {_show(shapes)}); pass pad_value= (a value, "
                "a mapping from key path to value, or a callable (path, dtype) -> value) to "
                "pad every such axis to the largest size",
                path=path,
            )
    return target


def _show(shapes: Sequence[tuple[int, ...]]) -> str:
    distinct = list(dict.fromkeys(shapes))
    text = ", ".join(str(s) for s in distinct[:6])
    return text + (f", ... ({len(distinct)} distinct)" if len(distinct) > 6 else "")


def copy_padded(dst: np.ndarray, src: np.ndarray, fill: np.ndarray | None) -> None:
    """Copy ``src`` into the leading corner of ``dst`` and fill the rest of ``dst`` with ``fill``.

    Signature: ``copy_padded(dst, src, fill) -> None``. ``dst`` and ``src`` have the same rank
    and ``src.shape[i] <= dst.shape[i]``; only the padding region is filled, so every element of
    ``dst`` is written exactly once. ``fill`` may be ``None`` only when the shapes are equal.

    Examples:
        >>> import numpy as np
        >>> dst = np.empty((2, 3), dtype=np.int8)
        >>> copy_padded(dst, np.ones((2, 2), dtype=np.int8), np.array(-1, dtype=np.int8))
        >>> dst
        array([[ 1,  1, -1],
               [ 1,  1, -1]], dtype=int8)
    """
    if src.shape == dst.shape:
        np.copyto(dst, src, casting="unsafe")
        return
    assert fill is not None, "copy_padded: shapes differ but there is no pad value"  # noqa: S101
    lead: list[slice] = []
    for size, full in zip(src.shape, dst.shape, strict=True):
        if size < full:
            region = (*lead, slice(size, None))
            dst[region] = fill
        lead.append(slice(0, size))
    np.copyto(dst[tuple(lead)], src, casting="unsafe")


def concat_arrays(
    chunks: list[np.ndarray],
    path: tuple[Any, ...] | None,
    *,
    fill_for: Callable[[np.dtype[Any]], np.ndarray | None],
    axis: int = 0,
    rows: int | None = None,
    consume: bool = False,
) -> np.ndarray:
    """Concatenate ``chunks`` (concatenation axis first) into one new array, padding as needed.

    Signature: ``concat_arrays(chunks, path, *, fill_for, axis=0, rows=None, consume=False)
    -> ndarray``.

    * ``fill_for(dtype)`` gives the pad value for the result dtype, usually
      ``lambda dt: pad_value_for(pad_value, path, dt)``; it is called only when the chunks
      differ in shape.
    * The result is allocated once, with the concatenation axis at position ``axis`` (a
      non-negative index into the result's dimensions), and owns its memory.
    * ``rows`` keeps only the first ``rows`` rows. The padded shape and the dtype are still
      decided by every chunk, so the result equals the full result's first ``rows`` rows.
    * ``consume=True`` removes from the list ``chunks`` what was copied (the chunk straddling
      ``rows`` is replaced by a copy of its remaining rows), dropping each chunk as soon as it
      is copied, last chunk first, so that memory peaks near the larger of the chunks and
      the result, not their sum (provided that freeing a chunk returns its memory to the
      system: ``Accumulator`` keeps its chunks in large memory-mapped slabs for that).

    Examples:
        >>> import numpy as np
        >>> concat_arrays(
        ...     [np.ones((1, 2)), np.zeros((1, 3))], ("x",), fill_for=lambda dt: np.array(-1.0)
        ... )
        array([[ 1.,  1., -1.],
               [ 0.,  0.,  0.]])

    Raises:
        ConversionError: There are no chunks, ranks differ, the dtypes have no common type, or
            sizes differ and there is no pad value; the message names ``path``.
    """
    if not chunks:
        raise ConversionError(f"nothing to concatenate for {format_path(path)}", path=path)
    basis = [c for c in chunks if c.shape[0] > 0] or chunks
    dtype = result_dtype([c.dtype for c in basis], path)
    ragged = len({c.shape[1:] for c in basis}) > 1
    del basis  # hold no reference to the chunks: consume=True frees them one by one
    fill = fill_for(dtype) if ragged else None
    target = target_shape([c.shape for c in chunks], path, padded=fill is not None, axis=axis)
    total = sum(c.shape[0] for c in chunks)
    if rows is not None:
        total = min(total, rows)
    out = np.empty((*target[:axis], total, *target[axis:]), dtype=dtype)
    view = np.moveaxis(out, axis, 0) if axis else out
    plan: list[tuple[int, int, int]] = []
    start = 0
    for index, chunk in enumerate(chunks):
        if start >= total and plan:
            break
        n = min(chunk.shape[0], total - start)
        plan.append((index, start, n))
        start += n
    for index, start, n in reversed(plan):
        chunk = chunks[index]
        if n:
            copy_padded(view[start : start + n], chunk[:n], fill)
        if consume:
            if n == chunk.shape[0]:
                del chunks[index]
            elif n:
                chunks[index] = chunk[n:].copy()
        del chunk
    return out


def nbytes_of(shape: Sequence[int], dtype: np.dtype[Any]) -> int:
    """The number of bytes an array of ``shape`` and ``dtype`` takes."""
    return math.prod(shape) * dtype.itemsize
