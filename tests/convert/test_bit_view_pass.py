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


@pytest.mark.parametrize("name", list(TREES))
def test_same_values_as_each_leaf_alone(name: str) -> None:
    """The bit-view pass gives each leaf the dtype, shape and bits it gets converted alone."""
    tree = TREES[name]()
    out = tonumpy.to_numpy(tree, ml_dtypes=True)
    for t, arr in zip(tree, out, strict=True):
        want = alone(t)
        assert arr.dtype == want.dtype
        assert arr.shape == want.shape
        np.testing.assert_array_equal(bits(arr), bits(want))


def test_views_share_memory_with_the_tensors() -> None:
    """Zero-copy: each array is a view of its tensor, writable when no grad is involved."""
    tree = [base[i].bfloat16() for i in range(3)]
    out = tonumpy.to_numpy(tree, ml_dtypes=True)
    for t, arr in zip(tree, out, strict=True):
        assert arr.dtype == BF16
        assert arr.ctypes.data == t.data_ptr()
        assert arr.flags.writeable


def test_tensors_that_require_grad_give_read_only_views() -> None:
    """Only the views of tensors that require grad are read-only, wherever they are."""
    grad = base[1].bfloat16().requires_grad_() * 2
    float_grad = base[2].clone().requires_grad_()
    tree = [base[0].bfloat16(), grad, float_grad, base[3].bfloat16()]
    out = tonumpy.to_numpy(tree, ml_dtypes=True)
    assert [a.flags.writeable for a in out] == [True, False, False, True]
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
