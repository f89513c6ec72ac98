"""Array leaves as bytes: what is stored for each leaf, and how it is written, a chunk at a time.

A leaf is a torch tensor, a NumPy array or scalar, or a ``LazyArray`` (a member of a ``.npz``
that has not been read: only its header is known). Writers never hold more than one converted
leaf at once, and most leaves not even that: contiguous arrays are written from their own memory,
bfloat16/float8 tensors are widened a chunk at a time, lazy members are copied a chunk at a time.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from .. import _dtypes
from ..convert import to_numpy
from ..errors import ConversionError, FileFormatError, TonumpyError
from ._npyheader import write_header

__all__ = [
    "CHUNK",
    "LazyArray",
    "blocks",
    "from_bits",
    "is_array",
    "is_lazy",
    "leaf_array",
    "nbytes",
    "unsigned",
    "value_chunks",
    "widened_chunks",
    "write_array",
    "write_lazy",
    "write_widened",
]

CHUNK = 1 << 24  # bytes read, copied or converted at once
_WIDEN_CHUNK = 1 << 18  # elements widened at once: 1 MiB of float32
_WRITE_CHUNK = 1 << 26  # bytes handed to a zip member at once


class LazyArray:
    """An array in a file whose data has not been read: its header, and ways to read it.

    [`tonumpy.io.read`][] with ``lazy=True`` gives the members of a ``.npz`` as such leaves.

    Examples:
        >>> import os, tempfile, tonumpy
        >>> path = os.path.join(tempfile.mkdtemp(), "a.npz")
        >>> np.savez(path, w=np.arange(4, dtype=np.int16))
        >>> member = tonumpy.io.read(path, lazy=True).tree["w"]
        >>> member.shape, member.nbytes, member.bits, member.array()
        ((4,), 8, None, array([0, 1, 2, 3], dtype=int16))

    Attributes:
        shape: The shape the file declares.
        dtype: The NumPy dtype of the stored data.
        fortran: True when the data is in Fortran (column-major) order.
        bits: The ``ml_dtypes`` name when the data holds the bits of a bfloat16/float8 array.
    """

    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    fortran: bool
    bits: str | None

    @property
    def nbytes(self) -> int:
        """Bytes of data, as the header declares them."""
        return math.prod(self.shape) * self.dtype.itemsize

    def chunks(self, size: int = CHUNK) -> Iterator[bytes]:  # pragma: no cover - abstract
        """The raw data in file order, ``size`` bytes at a time (a whole number of items)."""
        raise NotImplementedError

    def array(self) -> np.ndarray:  # pragma: no cover - abstract
        """The data, read into memory."""
        raise NotImplementedError


def is_array(leaf: Any) -> bool:
    """True for the leaves stored as arrays (tensors, NumPy arrays and scalars, lazy arrays)."""
    return isinstance(leaf, torch.Tensor | np.ndarray | np.generic | LazyArray)


def is_lazy(leaf: Any) -> bool:
    """True for a ``LazyArray`` (a leaf to keep whole when walking a tree: ``is_leaf=``).

    Examples:
        >>> is_lazy(np.ones(2))
        False
    """
    return isinstance(leaf, LazyArray)


def nbytes(leaf: Any) -> int:
    """The bytes a leaf holds: for a sparse tensor, those of its indices and values.

    A meta tensor holds none; a [`LazyArray`][tonumpy.io.LazyArray] holds what its header
    declares; a leaf that is not an array, none.

    Examples:
        >>> import torch
        >>> nbytes(torch.ones(3)), nbytes(torch.eye(3).to_sparse()), nbytes("text")
        (12, 60, 0)
    """
    if isinstance(leaf, torch.Tensor):
        if leaf.layout == torch.strided:
            return 0 if leaf.is_meta else leaf.numel() * leaf.element_size()
        if leaf.is_meta:
            return 0
        if leaf.layout == torch.sparse_coo:
            parts = [leaf._indices(), leaf._values()]  # noqa: SLF001 - uncoalesced too
        elif leaf.layout in (torch.sparse_csr, torch.sparse_bsr):
            parts = [leaf.crow_indices(), leaf.col_indices(), leaf.values()]
        elif leaf.layout in (torch.sparse_csc, torch.sparse_bsc):
            parts = [leaf.ccol_indices(), leaf.row_indices(), leaf.values()]
        else:  # pragma: no cover - a layout torch may add
            return 0
        return sum(p.numel() * p.element_size() for p in parts)
    if isinstance(leaf, LazyArray):
        return leaf.nbytes
    return int(getattr(leaf, "nbytes", 0))


def from_bits(bits: np.ndarray, name: str) -> Any:
    """Stored bits back to data: a torch tensor of the exact dtype (or an ml_dtypes array)."""
    torch_dtype = getattr(torch, name, None)
    if isinstance(torch_dtype, torch.dtype) and torch_dtype in _dtypes.ML_DTYPES:
        if bits.dtype.itemsize != torch_dtype.itemsize or bits.dtype.kind not in "iu":
            raise FileFormatError(f"bits of {bits.dtype} cannot hold {name}")
        wide = np.array(bits, order="C").view(f"i{bits.dtype.itemsize}")  # a copy, 0-d kept
        return torch.from_numpy(wide).view(torch_dtype)
    module = _dtypes.ml_dtypes_module()
    ml_type = getattr(module, name, None) if re.fullmatch(r"[a-z0-9_]+", name) else None
    if ml_type is None:
        raise FileFormatError(f"unknown stored dtype {name[:40]!r}")
    return bits.view(ml_type)


def unsigned(dtype: np.dtype[Any]) -> np.dtype[Any]:
    """The unsigned integer dtype of ``dtype``'s size and byte order: how bits are stored.

    Examples:
        >>> unsigned(np.dtype("<i2")), unsigned(np.dtype("uint8"))
        (dtype('uint16'), dtype('uint8'))
    """
    return dtype if dtype.kind == "u" else np.dtype(f"{dtype.byteorder}u{dtype.itemsize}")


def leaf_array(
    leaf: Any, place: Callable[[], str], path: tuple[Any, ...], *, ml_dtypes: bool
) -> tuple[np.ndarray, str | None]:
    """The array to store for an array leaf, and the ml_dtypes name when it holds raw bits.

    Bits are stored as unsigned integers of their size (``uint16`` for bfloat16, ``uint8``
    for float8). ``place()`` renders the leaf's place in the tree, for errors only.
    """
    if isinstance(leaf, LazyArray):
        array = leaf.array()
        if leaf.bits is None:
            return array, None
        if ml_dtypes:
            return array.view(unsigned(array.dtype)), leaf.bits
        leaf = from_bits(array, leaf.bits)
    if isinstance(leaf, torch.Tensor):
        if ml_dtypes and leaf.dtype in _dtypes.ML_DTYPES and leaf.layout == torch.strided:
            bits = leaf.detach().view(_dtypes.BITS[leaf.dtype.itemsize]).numpy(force=True)
            return bits.view(unsigned(bits.dtype)), _dtypes.ML_DTYPES[leaf.dtype]
        try:
            converted = to_numpy(leaf)
        except TonumpyError as exc:
            raise type(exc)(f"{place()}: {exc}", path=path) from exc
        if isinstance(converted, list):  # a nested tensor: one array per component
            raise ConversionError(
                f"cannot store {place()}: a nested tensor; store its components "
                "(list(t.unbind())) instead",
                path=path,
            )
        return converted, None
    array = np.asarray(leaf)  # an array, or a NumPy scalar
    if _dtypes.is_ml_dtype(array.dtype):
        return array.view(f"u{array.dtype.itemsize}"), array.dtype.name
    if array.dtype.hasobject:
        raise ConversionError(
            f"cannot store {place()}: an object array needs pickle; convert it to a numeric or "
            "string array first",
            path=path,
        )
    return array, None


def write_array(file: Any, array: np.ndarray) -> None:
    """Write ``array`` to ``file`` in the ``.npy`` format, from its own memory where it can.

    NumPy writes into streams (a ``.npz`` member) through 16 MiB ``tobytes`` copies and into
    real files with ``tofile``, whose errors say "N requested and M written"; here a contiguous
    array's buffer is handed over in large slices, and any other array a block at a time.
    """
    fortran = bool(array.flags.f_contiguous and not array.flags.c_contiguous and array.ndim > 1)
    write_header(file, array.dtype, array.shape, fortran)
    if array.size == 0 or array.dtype.itemsize == 0:
        return
    if array.flags.c_contiguous or fortran:
        raw = (array.T if fortran else array).reshape(-1).view(np.uint8)
        for start in range(0, raw.size, _WRITE_CHUNK):
            file.write(raw[start : start + _WRITE_CHUNK].data)
        return
    for block in blocks(array, max(CHUNK // array.dtype.itemsize, 1)):
        file.write(np.ascontiguousarray(block).view(np.uint8).data)


def write_lazy(file: Any, leaf: LazyArray) -> np.dtype[Any]:
    """A lazy array copied into ``file`` as a ``.npy``, a chunk at a time; the dtype written.

    Bits of an ``ml_dtypes`` type are written as unsigned integers (older files may hold
    signed ones: the bytes are the same).
    """
    dtype = unsigned(leaf.dtype) if leaf.bits else leaf.dtype
    write_header(file, dtype, leaf.shape, leaf.fortran)
    for chunk in leaf.chunks():
        file.write(chunk)
    return dtype


def write_widened(file: Any, t: torch.Tensor) -> None:
    """Write ``t`` (bfloat16/float8) as a float32 ``.npy``, widening it a chunk at a time.

    bfloat16 is the upper half of a float32, so it is widened in NumPy by a shift into one
    reused buffer; the float8 types go through torch. Small torch ops are avoided on purpose:
    each one may wake torch's thread pool, which costs milliseconds on a busy machine.
    """
    write_header(file, np.dtype("<f4"), tuple(t.shape), False)
    for chunk in widened_chunks(t):
        file.write(chunk.data.cast("B"))


def widened_chunks(t: torch.Tensor) -> Iterator[np.ndarray]:
    """``t`` (bfloat16/float8) as float32, in C order, a chunk at a time (a reused buffer)."""
    t = t.detach().resolve_neg()
    if t.dtype == torch.bfloat16:
        buffer = np.empty(min(_WIDEN_CHUNK, t.numel()), dtype=np.uint32)
        for block in blocks(t, _WIDEN_CHUNK):
            bits = block.view(torch.int16).numpy(force=True).view(np.uint16)
            yield _dtypes.widen_bfloat16_bits(bits, buffer[: bits.size])
        return
    for block in blocks(t, _WIDEN_CHUNK * 4):
        yield _dtypes.widened(block)


def value_chunks(leaf: Any, /, items: int = CHUNK) -> Iterator[np.ndarray]:
    """The values of an array leaf as 1-d NumPy arrays of at most ``items`` values, in C order.

    For going through an array larger than memory (to summarise it, say): a
    [`LazyArray`][tonumpy.io.LazyArray] is read a chunk at a time, in the order of its file
    (Fortran order where ``fortran`` is True), a tensor or an array is cut
    into views where it is contiguous and into copies of one chunk where it is not. Values come
    as [`tonumpy.to_numpy`][] gives them: bfloat16 and float8 (tensors, ``ml_dtypes`` arrays,
    or their stored bits) widened to float32, quantized tensors dequantized.

    Examples:
        >>> import torch
        >>> [c.tolist() for c in value_chunks(torch.arange(5, dtype=torch.bfloat16), 2)]
        [[0.0, 1.0], [2.0, 3.0], [4.0]]

    Raises:
        UnsupportedLeafError: A tensor has no values to give (a meta tensor, say).
    """
    if isinstance(leaf, LazyArray):
        for chunk in leaf.chunks(items * leaf.dtype.itemsize):
            values = np.frombuffer(chunk, dtype=leaf.dtype)
            if leaf.bits is None:
                yield values
            else:
                yield from value_chunks(from_bits(values, leaf.bits), items)
    elif isinstance(leaf, torch.Tensor):
        for block in blocks(leaf.detach(), items):
            yield to_numpy(block)  # bfloat16/float8 widened, quantized dequantized: one block
    else:
        array = np.asarray(leaf)
        wide = _dtypes.is_ml_dtype(array.dtype)  # bfloat16 etc.: as float32
        for block in blocks(array, items):
            yield block.astype(np.float32) if wide else block


def blocks(x: Any, limit: int) -> Iterator[Any]:
    """``x`` (a strided tensor or an array) as 1-d C-order blocks of at most ``limit`` items.

    Views where ``x`` is contiguous; otherwise copies of at most ``limit`` items, never of the
    whole of ``x``.

    Examples:
        >>> import numpy as np
        >>> [b.tolist() for b in blocks(np.arange(6).reshape(2, 3).T, 4)]  # 3 rows of 2
        [[0, 3, 1, 4], [2, 5]]
    """
    size = x.numel() if isinstance(x, torch.Tensor) else x.size
    contiguous = x.is_contiguous() if isinstance(x, torch.Tensor) else x.flags.c_contiguous
    if x.ndim == 0 or size <= limit or contiguous:
        flat = x.reshape(-1)
        for start in range(0, size, limit):
            yield flat[start : start + limit]
        return
    row = size // x.shape[0]
    if row > limit:
        for i in range(x.shape[0]):
            yield from blocks(x[i], limit)
        return
    step = max(limit // row, 1)
    for start in range(0, x.shape[0], step):
        yield x[start : start + step].reshape(-1)
