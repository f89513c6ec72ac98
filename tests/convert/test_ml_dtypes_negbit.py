"""bfloat16/float8 tensors with the negative bit: ``ml_dtypes=True`` resolves it (issue 12.14)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

import tonumpy
from _helpers.engine import HostEngine, pending_through

ml_dtypes = pytest.importorskip("ml_dtypes")

LOW_PRECISION = [
    getattr(torch, name)
    for name in ("bfloat16", "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz")
    if hasattr(torch, name)
]

ROUTES: dict[str, Callable[[torch.Tensor, bool], Any]] = {
    "lone": lambda t, ml: tonumpy.to_numpy(t, ml_dtypes=ml),
    "list": lambda t, ml: tonumpy.to_numpy([t, torch.ones(2, dtype=t.dtype)], ml_dtypes=ml)[0],
    "repeated": lambda t, ml: tonumpy.to_numpy([t, t], ml_dtypes=ml)[1],
    "copy=True": lambda t, ml: tonumpy.to_numpy([t], copy=True, ml_dtypes=ml)[0],
    "async": lambda t, ml: tonumpy.to_numpy_async({"t": t}, ml_dtypes=ml).result()["t"],
    "concat": lambda t, ml: tonumpy.concat([t, t], ml_dtypes=ml)[:2],
    "transfer engine": lambda t, ml: _through_engine(t, ml),
}


def _through_engine(t: torch.Tensor, ml: bool) -> Any:
    """The CUDA route (flags resolved on the device, bits moved), driven with a CPU tensor."""
    engine = HostEngine()
    pending = pending_through(engine, [t], ml_dtypes=ml)
    assert engine.copies, "the leaf must go through the engine"
    return pending.result()[0]


def negated(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A negative view of ``[1.5, -2.0]`` in ``dtype`` and its values, ``[-1.5, 2.0]``, stored."""
    view = torch._neg_view(torch.tensor([1.5, -2.0]).to(dtype))
    assert view.is_neg()
    return view, torch.tensor([-1.5, 2.0]).to(dtype)


@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_negative_bit_is_resolved_with_ml_dtypes(dtype: torch.dtype, route: str) -> None:
    """A negative-bit view converts with ml_dtypes=True to the negated bits on every route."""
    view, resolved = negated(dtype)
    out = ROUTES[route](view, True)
    assert out.dtype == np.dtype(getattr(ml_dtypes, str(dtype).removeprefix("torch.")))
    expected = resolved.view(torch.int16 if dtype.itemsize == 2 else torch.uint8).numpy()
    np.testing.assert_array_equal(out.view(expected.dtype), expected)  # bit for bit
    np.testing.assert_array_equal(out.astype(np.float32), [-1.5, 2.0])


@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_ml_dtypes_true_and_false_agree(dtype: torch.dtype, route: str) -> None:
    """ml_dtypes=True and the float32 widening give the same values for a negative-bit view."""
    view, _ = negated(dtype)
    widened = ROUTES[route](view, False)
    exact = ROUTES[route](view, True)
    assert widened.dtype == np.float32
    np.testing.assert_array_equal(exact.astype(np.float32), widened)


def test_copy_false_names_the_copy_the_negative_bit_needs() -> None:
    """copy=False on a negative-bit view is a ConversionError naming the leaf and the copy."""
    view, _ = negated(torch.bfloat16)
    with pytest.raises(tonumpy.ConversionError, match=r"tree\['w'\].*copy=False") as info:
        tonumpy.to_numpy({"w": view}, ml_dtypes=True, copy=False)
    assert type(info.value) is tonumpy.ConversionError  # a copy is needed, nothing unsupported
    assert info.value.path == ("w",)


def test_the_input_is_left_as_it_was() -> None:
    """Converting a negative-bit view leaves the input tensor and its storage unchanged."""
    for dtype in LOW_PRECISION:
        view, _ = negated(dtype)
        tonumpy.to_numpy(view, ml_dtypes=True)
        assert view.is_neg()
        stored = torch._neg_view(view).view(torch.int16 if dtype.itemsize == 2 else torch.uint8)
        expected = torch.tensor([1.5, -2.0]).to(dtype).view(stored.dtype)
        assert torch.equal(stored, expected)


@pytest.mark.parametrize(
    ("dtype", "stored", "read"),
    [
        ("float8_e4m3fn", [0x00, 0x80, 0x7F], [0x80, 0x00, 0xFF]),  # -0 exists; NaN sign flips
        ("float8_e5m2", [0x00, 0x80], [0x80, 0x00]),
        ("float8_e4m3fnuz", [0x00, 0x80, 0x40], [0x00, 0x80, 0xC0]),  # no -0: 0x80 is NaN
        ("float8_e5m2fnuz", [0x00, 0x80, 0x40], [0x00, 0x80, 0xC0]),
    ],
)
def test_float8_zero_and_nan_bytes(dtype: str, stored: list[int], read: list[int]) -> None:
    """Negating float8 zeros and NaNs gives the bytes the format defines for them."""
    torch_dtype = getattr(torch, dtype, None)
    if torch_dtype is None:
        pytest.skip(f"this torch has no {dtype}")
    view = torch._neg_view(torch.tensor(stored, dtype=torch.uint8).view(torch_dtype))
    out = tonumpy.to_numpy(view, ml_dtypes=True)
    assert out.view(np.uint8).tolist() == read


def test_float8_e8m0fnu_negative_view_is_refused_naming_the_leaf() -> None:
    """A negative view of float8_e8m0fnu (no sign bit) is refused, naming the leaf."""
    dtype = getattr(torch, "float8_e8m0fnu", None)
    if dtype is None:
        pytest.skip("this torch has no float8_e8m0fnu")
    view = torch._neg_view(torch.tensor([1.0, 2.0]).to(dtype))
    for ml in (True, False):
        with pytest.raises(tonumpy.UnsupportedLeafError, match=r"tree\['s'\].*no sign bit"):
            tonumpy.to_numpy({"s": view}, ml_dtypes=ml)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_cuda_negative_view(dtype: torch.dtype) -> None:
    """Negative-bit views on CUDA convert to the negated values, with and without ml_dtypes."""
    view = torch._neg_view(torch.tensor([1.5, -2.0], device="cuda").to(dtype))
    other = torch.ones(2, device="cuda").to(dtype)
    for ml in (True, False):
        out = tonumpy.to_numpy([view, other], ml_dtypes=ml)
        np.testing.assert_array_equal(out[0].astype(np.float32), [-1.5, 2.0])
