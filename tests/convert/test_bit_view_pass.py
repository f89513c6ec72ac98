"""The bit-view pass of ``to_numpy(ml_dtypes=True)``: trees whose first tensor is bfloat16/float8.

Every check of the careful per-leaf converter holds there too: a negative bit is resolved, a
non-contiguous tensor keeps its strides, a tensor that requires grad gives a read-only view,
leaves of other dtypes are converted as they would be alone.
"""

from __future__ import annotations

from collections.abc import Callable

import ml_dtypes
import numpy as np
import pytest
import torch

import tonumpy

BF16 = np.dtype(ml_dtypes.bfloat16)


def bits(arr: np.ndarray) -> np.ndarray:
    return arr.view(f"u{arr.dtype.itemsize}")


def alone(t: torch.Tensor) -> np.ndarray:
    """The leaf converted by itself (the per-leaf converter)."""
    out: np.ndarray = tonumpy.to_numpy([t], ml_dtypes=True, copy=True)[0]
    return out


base = torch.linspace(-3, 3, 24).reshape(4, 6)

TREES: dict[str, Callable[[], list[torch.Tensor]]] = {
    "all bfloat16": lambda: [base[i].bfloat16() for i in range(4)],
    "bfloat16 then float8 and float32": lambda: [
        base[0].bfloat16(),
        base[1].to(torch.float8_e4m3fn),
        base[2].clone(),
        base[3].to(torch.float8_e5m2),
    ],
    "non-contiguous": lambda: [base.bfloat16().t(), base.bfloat16()[:, ::2]],
    "negative bit": lambda: [base[0].bfloat16(), torch._neg_view(base[1].bfloat16())],
    "native leaf with a negative bit": lambda: [base[0].bfloat16(), torch._neg_view(base[1])],
    "0-d": lambda: [torch.tensor(1.5, dtype=torch.bfloat16), base[0].bfloat16()],
}


# a tree made this many times over (distinct tensors): small trees and trees of 32 leaves or
# more, whose integer views the pass takes in inference mode
COPIES = [1, 16]


def many(make: Callable[[], list[torch.Tensor]], copies: int) -> list[torch.Tensor]:
    """``make()``'s leaves, ``copies`` times over, every tensor a new one."""
    return [t for _ in range(copies) for t in make()]


@pytest.mark.parametrize("copies", COPIES)
@pytest.mark.parametrize("name", list(TREES))
def test_same_values_as_each_leaf_alone(name: str, copies: int) -> None:
    """The bit-view pass gives each leaf the dtype, shape and bits it gets converted alone."""
    tree = many(TREES[name], copies)
    out = tonumpy.to_numpy(tree, ml_dtypes=True)
    for t, arr in zip(tree, out, strict=True):
        want = alone(t)
        assert arr.dtype == want.dtype
        assert arr.shape == want.shape
        np.testing.assert_array_equal(bits(arr), bits(want))


@pytest.mark.parametrize("copies", COPIES)
def test_views_share_memory_with_the_tensors(copies: int) -> None:
    """Zero-copy: each array is a view of its tensor, writable when no grad is involved."""
    tree = many(lambda: [base[i].bfloat16() for i in range(3)], copies)
    out = tonumpy.to_numpy(tree, ml_dtypes=True)
    for t, arr in zip(tree, out, strict=True):
        assert arr.dtype == BF16
        assert arr.ctypes.data == t.data_ptr()
        assert arr.flags.writeable


@pytest.mark.parametrize("copies", COPIES)
def test_tensors_that_require_grad_give_read_only_views(copies: int) -> None:
    """Only the views of tensors that require grad are read-only, wherever they are."""
    grad = base[1].bfloat16().requires_grad_() * 2
    float_grad = base[2].clone().requires_grad_()
    rest = many(lambda: [base[0].bfloat16(), base[1].bfloat16().requires_grad_()], copies - 1)
    tree = [base[0].bfloat16(), grad, float_grad, base[3].bfloat16(), *rest]
    out = tonumpy.to_numpy(tree, ml_dtypes=True)
    want = [True, False, False, True] + [True, False] * (copies - 1)
    assert [a.flags.writeable for a in out] == want
    with pytest.raises(ValueError, match="read-only"):
        out[1][0] = 0
    np.testing.assert_array_equal(bits(out[1]), bits(alone(grad)))


def test_a_negative_bit_is_resolved_and_the_other_leaves_stay_views() -> None:
    """A bfloat16-first tree with a negative-bit leaf: that leaf's values are negated, the
    others are still zero-copy views of their tensors."""
    tree = [base[0].bfloat16(), torch._neg_view(base[1].bfloat16()), base[2].bfloat16()]
    out = tonumpy.to_numpy(tree, ml_dtypes=True)
    assert [a.dtype for a in out] == [BF16] * 3
    np.testing.assert_array_equal(bits(out[1]), bits(alone((-base[1]).bfloat16())))
    for i in (0, 2):
        assert out[i].ctypes.data == tree[i].data_ptr()
        np.testing.assert_array_equal(bits(out[i]), bits(alone(tree[i])))


@pytest.mark.parametrize("copies", COPIES)
def test_the_tensors_stay_as_they_were(copies: int) -> None:
    """The pass leaves its tensors ordinary: not inference tensors, writable in place (the
    array sees it), and a tensor with a graph still runs its backward."""
    leaf = base[0].clone().requires_grad_()
    grad = leaf.bfloat16() * 2
    tree = [grad, *many(lambda: [base[1].bfloat16()], copies)]
    out = tonumpy.to_numpy(tree, ml_dtypes=True)
    for t in tree:
        assert not t.is_inference()
    tree[1].add_(1)
    np.testing.assert_array_equal(bits(out[1]), bits(alone(tree[1])))
    grad.float().sum().backward()
    assert leaf.grad is not None
    np.testing.assert_array_equal(leaf.grad.numpy(), np.full(6, 2.0, np.float32))


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_same_views_under_the_callers_grad_mode(mode: str) -> None:
    """Called under ``torch.no_grad()`` or ``torch.inference_mode()``, the pass gives the same
    arrays: views of the tensors, read-only for a tensor that requires grad."""
    grad = base[0].bfloat16().requires_grad_()
    tree = [grad, *many(lambda: [base[1].bfloat16()], 40)]
    with getattr(torch, mode)():
        out = tonumpy.to_numpy(tree, ml_dtypes=True)
    assert [a.flags.writeable for a in out] == [False] + [True] * 40
    for t, arr in zip(tree, out, strict=True):
        assert arr.ctypes.data == t.data_ptr()
        np.testing.assert_array_equal(bits(arr), bits(alone(t)))
