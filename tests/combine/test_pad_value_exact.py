"""pad_value is checked exactly against every integer width: nothing wraps (issue 12.5)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

import tonumpy
from tonumpy import ConversionError

INTEGER_DTYPES = ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"]


def ragged(dtype: str) -> list[np.ndarray]:
    """Two batches of one leaf that differ along axis 1, so that padding is needed."""
    return [np.ones((1, 1), dtype=dtype), np.ones((1, 2), dtype=dtype)]


def padded_with(value: Any, dtype: str) -> Any:
    """The value concat pads with (the corner the first batch does not fill)."""
    return tonumpy.concat(ragged(dtype), pad_value=value)[0, 1]


def bounds(dtype: str) -> tuple[int, int]:
    info = np.iinfo(dtype)
    return int(info.min), int(info.max)


@pytest.mark.parametrize("dtype", INTEGER_DTYPES)
def test_bounds_are_accepted_exactly(dtype: str) -> None:
    """An integer dtype's smallest and largest values (and 0) pad exactly."""
    low, high = bounds(dtype)
    for value in (low, high, 0):
        out = padded_with(value, dtype)
        assert out.dtype == np.dtype(dtype)
        assert int(out) == value


@pytest.mark.parametrize("dtype", INTEGER_DTYPES)
def test_one_past_the_bounds_is_refused(dtype: str) -> None:
    """A pad value one past an integer dtype's range is refused, never wrapped."""
    low, high = bounds(dtype)
    for value in (low - 1, high + 1, -100 if low == 0 else high * 2):
        with pytest.raises(ConversionError, match=f"cannot be represented in {dtype}"):
            padded_with(value, dtype)


@pytest.mark.parametrize(
    ("value", "dtype"),
    [
        (-100, "uint64"),
        (-1, "uint64"),
        (2**63, "int64"),
        (2**64 - 1, "int64"),
        (2**64, "uint64"),
        (-(2**63) - 1, "int64"),
        (np.uint64(2**64 - 1), "int64"),
        (np.int64(-1), "uint64"),
        (np.uint64(2**63), "int64"),
        (np.array(-1), "uint64"),
        (torch.tensor(-100), "uint64"),
        (torch.tensor(2**64 - 1, dtype=torch.uint64), "int64"),
        (2.0**63, "int64"),
        (2.0**64, "uint64"),
        (-1.0, "uint64"),
        (float(2**53 + 1), "int32"),
    ],
    ids=repr,
)
def test_64_bit_values_that_used_to_wrap_are_refused(value: Any, dtype: str) -> None:
    """64-bit pad values that once wrapped around are refused for dtypes that cannot hold them."""
    with pytest.raises(ConversionError, match=f"cannot be represented in {dtype}"):
        padded_with(value, dtype)


@pytest.mark.parametrize(
    ("value", "dtype", "expected"),
    [
        (np.uint64(2**64 - 1), "uint64", 2**64 - 1),
        (np.int64(-(2**63)), "int64", -(2**63)),
        (2.0**63, "uint64", 2**63),
        (-0.0, "uint8", 0),
        (3.0, "int8", 3),
        (np.float32(-128.0), "int8", -128),
        (np.longdouble(2**63), "uint64", 2**63),
        (True, "int8", 1),
        (np.True_, "uint64", 1),
        (5 + 0j, "int16", 5),
        (torch.tensor(7), "uint16", 7),
        (np.array(9, dtype=np.uint64), "int64", 9),
    ],
    ids=repr,
)
def test_exact_integral_values_of_any_type_are_accepted(
    value: Any, dtype: str, expected: int
) -> None:
    """Integral pad values of any type (3.0, NumPy scalars, bool) pad with their exact value."""
    out = padded_with(value, dtype)
    assert out.dtype == np.dtype(dtype)
    assert int(out) == expected


@pytest.mark.parametrize(
    "value", [0.5, -0.5, float("nan"), float("inf"), -float("inf"), 1 + 1j, "3", b"3", None]
)
@pytest.mark.parametrize("dtype", ["int8", "int64", "uint64"])
def test_non_integral_values_are_refused(value: Any, dtype: str) -> None:
    """Non-integral pad values for integer leaves are refused; None asks for pad_value=."""
    if value is None:  # None means: this leaf has no pad value
        with pytest.raises(ConversionError, match="pass pad_value="):
            padded_with(value, dtype)
        return
    with pytest.raises(ConversionError, match=f"cannot be represented in {dtype}"):
        padded_with(value, dtype)


@pytest.mark.parametrize(
    ("value", "expected"),
    [(True, True), (False, False), (0, False), (1, True), (1.0, True), (np.uint64(0), False)],
    ids=repr,
)
def test_bool_accepts_exactly_false_and_true(value: Any, expected: bool) -> None:
    """A bool leaf pads with exactly False/True (and their integral equals 0/1)."""
    out = padded_with(value, "bool")
    assert out.dtype == np.bool_
    assert bool(out) is expected


@pytest.mark.parametrize("value", [2, -1, -100, 0.5, 2**64, np.int64(-1), np.uint64(2**64 - 1)])
def test_bool_refuses_everything_else(value: Any) -> None:
    """A bool leaf refuses any pad value other than False/True and 0/1."""
    with pytest.raises(ConversionError, match="cannot be represented in bool"):
        padded_with(value, "bool")


class TestMlDtypes:
    """bfloat16/float8 as pad values for integer leaves, and as leaves padded with floats."""

    ml_dtypes = pytest.importorskip("ml_dtypes")

    @pytest.mark.parametrize(
        ("value", "dtype", "expected"),
        [("bfloat16", "int16", 3), ("float8_e4m3fn", "uint8", 3), ("bfloat16", "uint64", 3)],
    )
    def test_integral_ml_dtypes_values_fit_integers(
        self, value: str, dtype: str, expected: int
    ) -> None:
        """An ml_dtypes scalar with an integral value pads an integer leaf exactly."""
        out = padded_with(getattr(self.ml_dtypes, value)(3.0), dtype)
        assert int(out) == expected

    @pytest.mark.parametrize(
        ("value", "dtype"),
        [(0.5, "int16"), (-1.0, "uint8"), (256.0, "uint8"), (float("nan"), "int64")],
    )
    def test_other_ml_dtypes_values_are_refused(self, value: float, dtype: str) -> None:
        """An ml_dtypes scalar non-integral or out of range is refused for an integer leaf."""
        with pytest.raises(ConversionError, match=f"cannot be represented in {dtype}"):
            padded_with(self.ml_dtypes.bfloat16(value), dtype)

    @pytest.mark.parametrize(
        ("torch_dtype", "ok", "too_big"),
        [(torch.bfloat16, -1.5, 1e39), (torch.float8_e4m3fn, 448.0, 1000.0)],
    )
    def test_ml_dtypes_leaves(self, torch_dtype: torch.dtype, ok: float, too_big: float) -> None:
        """ml_dtypes leaves pad with values their dtype holds and refuse others."""
        batches = [torch.ones(1, 1, dtype=torch_dtype), torch.ones(1, 2, dtype=torch_dtype)]
        out = tonumpy.concat(batches, pad_value=ok, ml_dtypes=True)
        assert out.dtype.name == str(torch_dtype).removeprefix("torch.")
        assert float(out[0, 1]) == ok
        with pytest.raises(ConversionError, match="cannot be represented"):
            tonumpy.concat(batches, pad_value=too_big, ml_dtypes=True)


def test_floats_may_round_but_not_overflow() -> None:
    """Unchanged behaviour for float leaves: a big integer rounds, a huge one is refused."""
    assert padded_with(2**64 - 1, "float32") == np.float32(2**64)
    with pytest.raises(ConversionError, match="cannot be represented in float16"):
        padded_with(2**64, "float16")
    with pytest.raises(ConversionError, match="cannot be represented in float64"):
        padded_with(10**400, "float64")


def test_accumulator_refuses_what_used_to_wrap() -> None:
    """The repro's Accumulator case: -1 into uint64 batches, raised by the ragged append."""
    acc = tonumpy.Accumulator(pad_value=-1)
    acc.append(torch.tensor([[1]], dtype=torch.uint64))
    with pytest.raises(ConversionError, match="cannot be represented in uint64"):
        acc.append(torch.tensor([[1, 2]], dtype=torch.uint64))
    assert acc.result().tolist() == [[1]]  # the refused batch was not added


def test_mapping_and_callable_values_are_checked_too() -> None:
    """Pad values from a mapping or a callable are range-checked like a single value."""
    with pytest.raises(ConversionError, match=r"pad_value 18446744073709551615 .* int64"):
        tonumpy.concat(ragged("int64"), pad_value={(): 2**64 - 1})
    with pytest.raises(ConversionError, match=r"int64"):
        tonumpy.concat(ragged("int64"), pad_value=lambda path, dtype: 2**63)
