"""What an array made by a conversion keeps alive: its own data, nothing more (issue 12.15).

getting-started.md promises that an array made by a conversion shares memory with nothing in
the input and with no other array of the result, and holds exactly its own bytes (its ``.base``
may be the temporary tensor holding them). Checked for every kind that is converted, on every
CPU route.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

import tonumpy


def _ranges(t: torch.Tensor) -> list[tuple[int, int]]:
    """The byte ranges of memory a tensor of any layout uses."""
    if t.is_sparse:
        return _ranges(t._indices()) + _ranges(t._values())
    if t.layout != torch.strided:
        return [r for part in (t.values(), *_compressed_indices(t)) for r in _ranges(part)]
    storage = t.untyped_storage()
    return [(storage.data_ptr(), storage.data_ptr() + storage.nbytes())]


def _compressed_indices(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if t.layout in (torch.sparse_csr, torch.sparse_bsr):
        return t.crow_indices(), t.col_indices()
    return t.ccol_indices(), t.row_indices()


_byte_bounds: Callable[[np.ndarray], tuple[int, int]] = getattr(
    getattr(np.lib, "array_utils", None), "byte_bounds", None
) or getattr(np, "byte_bounds")  # noqa: B009 - NumPy 1.x only


def _overlaps(arr: np.ndarray, ranges: list[tuple[int, int]]) -> bool:
    low, high = _byte_bounds(arr)
    return any(low < end and start < high for start, end in ranges)


def kept_alive(arr: np.ndarray) -> int:
    """The bytes that keeping ``arr`` alive keeps alive: those of the end of its base chain."""
    owner: Any = arr
    while isinstance(owner, np.ndarray) and owner.base is not None:
        owner = owner.base
    if isinstance(owner, np.ndarray):
        return owner.nbytes
    if isinstance(owner, torch.Tensor):
        return owner.untyped_storage().nbytes()
    raise AssertionError(f"unexpected owner {type(owner).__name__} of the array's memory")


big = torch.arange(200_000, dtype=torch.float32).reshape(400, 500) / 1000

KINDS: dict[str, Callable[[], torch.Tensor]] = {
    "bfloat16 contiguous": lambda: big[:4, :6].contiguous().bfloat16(),
    "bfloat16 non-contiguous": lambda: big[:6, :4].bfloat16().t(),
    "bfloat16 slice of a large tensor": lambda: big.bfloat16()[::100, ::100],
    "bfloat16 requires grad": lambda: big[:4, :6].bfloat16().requires_grad_(),
    "float8_e4m3fn": lambda: big[:4, :6].to(torch.float8_e4m3fn),
    "float8_e5m2 slice": lambda: big.to(torch.float8_e5m2)[::100, ::50],
    "complex32": lambda: torch.complex(big[0, :6], big[1, :6]).to(torch.complex32),
    "conj complex64": lambda: torch.complex(big[0, :6], big[1, :6]).conj(),
    "conj slice of a large tensor": lambda: torch.complex(big[0], big[1]).conj()[::50],
    "negative view": lambda: torch._neg_view(big[0])[::50],
    "quantized": lambda: torch.quantize_per_tensor(big[:4, :6], 0.1, 0, torch.qint8),
    "quantized slice": lambda: torch.quantize_per_tensor(big, 0.1, 0, torch.qint8)[:4, :6],
    "sparse COO": lambda: big[:4, :6].to_sparse(),
    "sparse CSR": lambda: big[:4, :6].to_sparse_csr(),
}
if hasattr(torch, "float4_e2m1fn_x2"):
    KINDS["float4_e2m1fn_x2"] = lambda: (
        torch.arange(24, dtype=torch.uint8).reshape(4, 6).view(torch.float4_e2m1fn_x2)
    )

ROUTES: dict[str, Callable[[Callable[[], torch.Tensor]], tuple[Any, Any]]] = {
    "alone": lambda make: ((t := make()), tonumpy.to_numpy(t)),
    "in a list": lambda make: ((t := make()), tonumpy.to_numpy([t, make(), make()])[0]),
    "repeated": lambda make: ((t := make()), tonumpy.to_numpy([t, make(), t])[2]),
    "to_numpy_async": lambda make: ((t := make()), tonumpy.to_numpy_async([t, make()]).result()[0]),
    "copy=True": lambda make: ((t := make()), tonumpy.to_numpy([t, make()], copy=True)[0]),
    "scalars=True": lambda make: ((t := make()), tonumpy.to_numpy([t, make()], scalars=True)[0]),
}


@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize("kind", list(KINDS))
def test_converted_arrays_hold_exactly_their_own_data(kind: str, route: str) -> None:
    """Each route's array keeps alive exactly its own bytes, sharing none with the input."""
    t, arr = ROUTES[route](KINDS[kind])
    assert isinstance(arr, np.ndarray)
    assert kept_alive(arr) == arr.nbytes, f"keeps {kept_alive(arr)} bytes for {arr.nbytes}"
    assert not _overlaps(arr, _ranges(t)), "shares memory with the input"
    assert not _overlaps(arr, _ranges(big))


@pytest.mark.parametrize("kind", list(KINDS))
def test_arrays_of_one_result_share_nothing(kind: str) -> None:
    """The arrays of one result never share memory with each other."""
    make = KINDS[kind]
    out = tonumpy.to_numpy([make(), make(), make()])
    for i, a in enumerate(out):
        for b in out[i + 1 :]:
            assert not np.shares_memory(a, b)


def test_bit_exact_views_are_views_not_conversions() -> None:
    """``ml_dtypes=True`` bit views keep the tensor's storage alive, as every view does."""
    pytest.importorskip("ml_dtypes")
    t = big.bfloat16()
    arr = tonumpy.to_numpy(t[::100, ::100], ml_dtypes=True)
    assert kept_alive(arr) == t.untyped_storage().nbytes()
    assert _overlaps(arr, _ranges(t))
