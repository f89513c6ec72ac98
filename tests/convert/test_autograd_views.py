"""Arrays of tensors that require grad: zero-copy but read-only on every route (issue 12.7)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

import tonumpy


class Tagged(torch.Tensor):
    """A plain Python tensor subclass: its presence makes the bulk passes decline."""


def saved_result() -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` and ``y = x.exp()``: autograd saves ``y`` itself for the backward pass."""
    x = torch.tensor([0.0, 1.0, 2.0], requires_grad=True)
    return x, x.exp()


def test_writing_is_refused_and_the_gradient_stays_right() -> None:
    """The repro: the array of a saved tensor cannot be written, so x.grad stays exp(x)."""
    x, y = saved_result()
    a = tonumpy.to_numpy(y)
    assert np.shares_memory(a, y.detach().numpy())  # still zero-copy
    with pytest.raises(ValueError, match="read-only"):
        a[:] = 0.0
    y.sum().backward()
    assert x.grad is not None
    torch.testing.assert_close(x.grad, torch.tensor([0.0, 1.0, 2.0]).exp())


def _first(out: Any) -> np.ndarray:
    while not isinstance(out, np.ndarray):
        out = out[0] if isinstance(out, list | tuple) else next(iter(out.values()))
    return out


ROUTES: dict[str, Callable[[torch.Tensor], Any]] = {
    "lone tensor": lambda y: tonumpy.to_numpy(y),
    "bulk pass": lambda y: tonumpy.to_numpy([y, y.detach() * 2, y * 3]),
    "bulk pass with a bfloat16 leaf": lambda y: tonumpy.to_numpy([y, y.detach().bfloat16()]),
    "ml_dtypes bulk pass": lambda y: tonumpy.to_numpy(
        [y, torch.ones(2).bfloat16(), y * 3], ml_dtypes=True
    ),
    "per-leaf loop (a subclass present)": lambda y: tonumpy.to_numpy(
        [y, torch.ones(2).as_subclass(Tagged)]
    ),
    "repeated tensor (careful path)": lambda y: tonumpy.to_numpy({"a": y, "b": [y]}),
    "scalars=True (careful path)": lambda y: tonumpy.to_numpy([y], scalars=True),
    "copy=False": lambda y: tonumpy.to_numpy([y, y * 2], copy=False),
    "to_numpy_async": lambda y: tonumpy.to_numpy_async({"y": y, "z": y * 2}).result(),
    "numpy_args": lambda y: tonumpy.numpy_args(lambda v: v)(y),
    "subclass requiring grad": lambda y: tonumpy.to_numpy(y.as_subclass(Tagged)),
    "nn.Parameter": lambda y: tonumpy.to_numpy(torch.nn.Parameter(y.detach())),
}


@pytest.mark.parametrize("route", list(ROUTES))
def test_every_route_returns_a_read_only_view(route: str) -> None:
    """Every route gives a tensor saved for backward as a read-only zero-copy view."""
    _, y = saved_result()
    a = _first(ROUTES[route](y))
    assert np.shares_memory(a, y.detach().numpy()), "the conversion must stay zero-copy"
    assert not a.flags.writeable
    if route == "repeated tensor (careful path)":
        out = ROUTES[route](y)
        assert out["a"] is out["b"][0]


def test_other_arrays_of_the_tree_stay_writable() -> None:
    """Only the arrays of tensors that require grad are protected."""
    _, y = saved_result()
    plain = torch.zeros(3)
    for out in (tonumpy.to_numpy([y, plain]), tonumpy.to_numpy([y, plain, y])):
        assert not out[0].flags.writeable
        assert out[1].flags.writeable
        out[1][:] = 1.0
    assert bool((plain == 1).all())


def test_components_of_a_nested_tensor_that_requires_grad() -> None:
    """The components of a nested tensor that requires grad come back read-only."""
    nt = torch.nested.nested_tensor([torch.ones(2), torch.ones(3)], requires_grad=True)
    parts = tonumpy.to_numpy(nt)
    assert [p.shape for p in parts] == [(2,), (3,)]
    assert not any(p.flags.writeable for p in parts)


def test_ml_dtypes_bit_view_of_a_bfloat16_that_requires_grad() -> None:
    """The ml_dtypes bit view of a bfloat16 that requires grad is zero-copy and read-only."""
    pytest.importorskip("ml_dtypes")
    t = torch.ones(3, dtype=torch.bfloat16, requires_grad=True) * 2
    a = tonumpy.to_numpy(t, ml_dtypes=True)
    assert np.shares_memory(a, t.detach().view(torch.int16).numpy())
    assert not a.flags.writeable


@pytest.mark.parametrize(
    "convert",
    [
        lambda y: tonumpy.to_numpy([y, y * 2], copy=True)[0],
        lambda y: tonumpy.to_numpy(y, copy=True),
        lambda y: tonumpy.to_numpy_async([y], copy=True).result()[0],
        lambda y: tonumpy.numpy_args(copy=True)(lambda v: v)(y),
        lambda y: tonumpy.concat([y, y]),
    ],
    ids=["to_numpy list", "to_numpy lone", "to_numpy_async", "numpy_args", "concat"],
)
def test_copies_are_writable_and_independent(convert: Callable[[torch.Tensor], Any]) -> None:
    """A copy is writable, and writing to it leaves the saved tensor and its gradient intact."""
    x, y = saved_result()
    a = convert(y)
    assert a.flags.writeable
    assert not np.shares_memory(a, y.detach().numpy())
    a[...] = 0.0
    y.sum().backward()
    assert x.grad is not None
    torch.testing.assert_close(x.grad, torch.tensor([0.0, 1.0, 2.0]).exp())


def test_widened_arrays_of_grad_tensors_are_fresh_and_writable() -> None:
    """A conversion that had to copy (bfloat16 widened) shares nothing: no need to protect it."""
    t = torch.ones(3, dtype=torch.bfloat16, requires_grad=True) * 2
    for a in (tonumpy.to_numpy(t), tonumpy.to_numpy([t, t * 2])[0]):
        assert a.dtype == np.float32
        assert a.flags.writeable


def test_capture_and_accumulator_hold_writable_copies() -> None:
    """capture and Accumulator keep writable copies that share no memory with the outputs."""
    model = torch.nn.Linear(2, 2)
    with tonumpy.capture(model) as acts:
        out = model(torch.ones(1, 2))
    captured = acts[""][0]
    assert captured.flags.writeable
    assert not np.shares_memory(captured, out.detach().numpy())
    acc = tonumpy.Accumulator()
    acc.append({"y": out})
    assert acc.result()["y"].flags.writeable
