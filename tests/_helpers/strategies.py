"""Hypothesis strategies: random tensors and random nested trees of them."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from hypothesis import strategies as st

from _helpers.trees import Plain, Point

# dtypes that survive to_torch(to_numpy(x, ml_dtypes=True)) exactly
ROUND_TRIP_DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.complex64,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
]


@st.composite
def tensors(draw: st.DrawFn, dtypes: list[torch.dtype] = ROUND_TRIP_DTYPES) -> torch.Tensor:
    """A tensor of random dtype, shape (0-d and empty included) and layout variation."""
    dtype = draw(st.sampled_from(dtypes))
    shape = draw(st.lists(st.integers(0, 4), min_size=0, max_size=3))
    n = int(np.prod(shape)) if shape else 1
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (n * dtype.itemsize,), dtype=torch.uint8, generator=gen)
    if dtype == torch.bool:
        t = (raw[:n] % 2).bool()
    elif dtype.is_floating_point and dtype.itemsize >= 2:
        t = (torch.randn(n, generator=gen, dtype=torch.float64) * 100).to(dtype)
    elif dtype.is_complex:
        t = torch.randn(n, generator=gen, dtype=dtype)
    else:
        t = raw.view(dtype)  # every bit pattern, NaNs included, for 1-byte and integer types
    t = t.reshape(shape)
    variant = draw(st.sampled_from(["plain", "grad", "transpose", "slice"]))
    if variant == "grad" and dtype.is_floating_point and dtype.itemsize >= 2:
        t = t.clone().requires_grad_()
    elif variant == "transpose" and t.dim() >= 2:
        t = t.transpose(0, 1)
    elif variant == "slice" and t.dim() >= 1:
        t = t[::2]
    return t


_scalars = st.one_of(st.none(), st.integers(-5, 5), st.text(max_size=3), st.booleans())


def trees(leaves: st.SearchStrategy[Any] | None = None) -> st.SearchStrategy[Any]:
    """Random nestings of dict, list, tuple, namedtuple and dataclass around tensors."""
    base = st.one_of(leaves if leaves is not None else tensors(), _scalars)
    return st.recursive(
        base,
        lambda children: st.one_of(
            st.lists(children, max_size=4),
            st.lists(children, max_size=3).map(tuple),
            st.dictionaries(
                st.one_of(st.text(max_size=3), st.integers(0, 9)), children, max_size=4
            ),
            st.tuples(children, children).map(lambda xy: Point(*xy)),
            st.tuples(children, children).map(lambda xy: Plain(*xy)),
        ),
        max_leaves=12,
    )


def reference_to_numpy(tree: Any) -> Any:
    """A straightforward recursive conversion to compare tonumpy against."""
    if isinstance(tree, torch.Tensor):
        t = tree.detach().resolve_conj().resolve_neg()
        if t.dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
            t = t.to(torch.float32)
        return t.contiguous().numpy()
    if isinstance(tree, Point):
        return Point(*map(reference_to_numpy, tree))
    if isinstance(tree, Plain):
        return Plain(reference_to_numpy(tree.x), reference_to_numpy(tree.y))
    if isinstance(tree, dict):
        return {k: reference_to_numpy(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(map(reference_to_numpy, tree))
    return tree
