"""``.safetensors`` files, read and written here (the ``safetensors`` package is not needed).

The format is an 8-byte header length, a JSON header (each tensor's dtype, shape and byte range,
and an optional ``__metadata__`` of strings), then the data. Reading checks the header against
the file (every range inside the data, the size its shape and dtype need, no two overlapping)
and memory-maps the data copy-on-write: nothing is read until it is used. Writing streams one
tensor at a time, largest items first so that every tensor stays aligned.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from . import _arrays, _dtypes
from ._fs import open_regular, short
from ._names import STRUCTURE, tensor_name
from ._structure import Plan
from .errors import ConversionError, FileFormatError

__all__ = ["read", "write"]

MAX_HEADER = 100_000_000  # the safetensors package's own limit
_CODES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "C64": torch.complex64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
for _suffix_code, _torch_name in (
    ("U16", "uint16"),
    ("U32", "uint32"),
    ("U64", "uint64"),
    ("F8_E4M3FNUZ", "float8_e4m3fnuz"),
    ("F8_E5M2FNUZ", "float8_e5m2fnuz"),
    ("F8_E8M0", "float8_e8m0fnu"),
):
    if isinstance(getattr(torch, _torch_name, None), torch.dtype):
        _CODES[_suffix_code] = getattr(torch, _torch_name)
_CODE_OF = {dtype: code for code, dtype in _CODES.items()}
_TYPES_TEXT = (
    "bool, int8-64, uint8-64, float16/32/64, bfloat16, float8 and complex64 (not complex128)"
)


def read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of a ``.safetensors`` file (memory-mapped), and its ``__metadata__``.

    Raises:
        FileFormatError: The header is not valid or does not match the file.
    """
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        header, start = _header(f, size, path)
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
        ):
            raise FileFormatError(f"{path}: its __metadata__ is not a mapping of strings")
        specs = [_spec(name, spec, size - start, path) for name, spec in header.items()]
        spans = sorted((begin, end, name) for name, _, _, begin, end in specs if end > begin)
        for (_, end, first), (begin, _, second) in itertools.pairwise(spans):
            if begin < end:
                raise FileFormatError(
                    f"{path}: tensors {short(first)} and {short(second)} overlap; refused"
                )
        data = None
        if size > start:
            data = np.memmap(f, dtype=np.uint8, mode="c", offset=start, shape=(size - start,))
    tensors = {}
    for name, dtype, shape, begin, end in specs:
        if end == begin or data is None:
            tensors[name] = torch.empty(shape, dtype=dtype)
            continue
        raw = torch.from_numpy(np.asarray(data[begin:end]))
        tensors[name] = raw.view(dtype).reshape(shape)
    return tensors, metadata


def _header(f: BinaryIO, size: int, path: Path) -> tuple[dict[str, Any], int]:
    raw = f.read(8)
    if len(raw) < 8:
        raise FileFormatError(f"{path}: not a .safetensors file (shorter than its header)")
    (length,) = struct.unpack("<Q", raw)
    if length > min(MAX_HEADER, size - 8):
        raise FileFormatError(
            f"{path}: not a .safetensors file (its header claims {length:,} bytes of a "
            f"{size:,}-byte file)"
        )
    try:
        header = json.loads(f.read(length).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise FileFormatError(f"{path}: not a .safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise FileFormatError(f"{path}: not a .safetensors file (its header is not a mapping)")
    return header, 8 + length


def _spec(
    name: str, spec: Any, data_size: int, path: Path
) -> tuple[str, torch.dtype, tuple[int, ...], int, int]:
    where = f"{path}: tensor {short(name)}"
    if not isinstance(spec, dict):
        raise FileFormatError(f"{where}: not a tensor description")
    code, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
    dtype = _CODES.get(code) if isinstance(code, str) else None
    if dtype is None:
        raise FileFormatError(f"{where}: dtype {short(code)} is not one torch has")
    if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
        raise FileFormatError(f"{where}: a bad shape {short(shape)}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(n) is int for n in offsets)
        or not 0 <= offsets[0] <= offsets[1] <= data_size
    ):
        raise FileFormatError(f"{where}: its data lies outside the file: truncated or corrupt")
    begin, end = offsets
    need = math.prod(shape) * dtype.itemsize
    if end - begin != need:
        raise FileFormatError(
            f"{where}: a {tuple(shape)} {str(dtype).removeprefix('torch.')} tensor needs "
            f"{need:,} bytes, the file gives it {end - begin:,}: corrupt"
        )
    return name, dtype, tuple(shape), begin, end


# ------------------------------------------------------------------------------ writing


_Chunks = Callable[[], Iterator[Any]]


def write(
    file: BinaryIO,
    plan: Plan,
    metadata: dict[str, str],
    progress: Callable[[int], None] | None = None,
) -> None:
    """Write the array leaves of ``plan`` (exact dtypes), its structure in the metadata.

    Each tensor is named by its key path ([`tonumpy._names.tensor_name`][]): the keys of a
    flat dict are its tensors' names. ``metadata`` (the source file's, say) is kept;
    ``progress(i)`` follows each leaf.

    Raises:
        ConversionError: A leaf has a dtype safetensors lacks (complex128, strings, ...), or
            a name it cannot hold (not UTF-8, ``__metadata__``, the name of another leaf).
    """
    plan.names = _tensor_names(plan)  # the structure lists the names other readers see
    entries = [_entry(plan, i) for i in range(len(plan.leaves))]
    order = sorted(range(len(entries)), key=lambda i: -_CODES[entries[i][0]].itemsize)
    header: dict[str, Any] = {}
    at = 0
    for i in order:
        code, shape, nbytes, _ = entries[i]
        offsets = [at, at + nbytes]
        header[plan.names[i]] = {"dtype": code, "shape": list(shape), "data_offsets": offsets}
        at += nbytes
    header["__metadata__"] = {**metadata, STRUCTURE: plan.structure_bytes().decode("utf-8")}
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # data starts 8-byte aligned
    file.write(struct.pack("<Q", len(text)))
    file.write(text)
    for i in order:
        code, _, nbytes, chunks = entries[i]
        written = 0
        for chunk in chunks():
            view = memoryview(chunk).cast("B")
            file.write(view)
            written += view.nbytes
        if written != nbytes:  # pragma: no cover - a lazy member shorter than its header
            raise FileFormatError(f"{plan.where(i)}: {written} bytes written of {nbytes}")
        if progress is not None:
            progress(i)


def _tensor_names(plan: Plan) -> list[str]:
    """The name of each array leaf: its key path joined by dots; checked to be writable."""
    names = [tensor_name(path) for path in plan.paths]
    first: dict[str, int] = {}
    for index, name in enumerate(names):
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise ConversionError(
                f"cannot write {plan.where(index)} to .safetensors: its name {short(name)} is "
                "not valid UTF-8 (it holds a lone surrogate), which a .safetensors tensor name "
                "must be; rename the key, or write .npz, .npy or a directory instead",
                path=plan.paths[index],
            ) from None
        if name == "__metadata__":
            raise ConversionError(
                f"cannot write {plan.where(index)} to .safetensors: __metadata__ is reserved "
                "for the file's metadata, no tensor can have that name; rename the key, or "
                "write .npz, .npy or a directory instead",
                path=plan.paths[index],
            )
        other = first.setdefault(name, index)
        if other != index:
            raise ConversionError(
                f"cannot write both {plan.where(other)} and {plan.where(index)} to "
                f".safetensors: a tensor is named by its key path joined by dots, and both are "
                f"named {short(name)}; rename one of the keys, or write .npz, .npy or a "
                "directory, which keep both",
                path=plan.paths[index],
            )
    return names


def _entry(plan: Plan, index: int) -> tuple[str, tuple[int, ...], int, _Chunks]:
    """(dtype code, shape, bytes, chunks) of leaf ``index``; completes its node."""
    leaf = plan.leaf(index)
    if isinstance(leaf, _arrays.LazyArray) and not leaf.fortran and leaf.dtype.isnative:
        code = _code(plan, index, _torch_dtype(leaf.dtype, leaf.bits))
        plan.complete(index, None, leaf.bits or str(leaf.dtype))
        return code, leaf.shape, leaf.nbytes, leaf.chunks
    if (
        isinstance(leaf, torch.Tensor)
        and not leaf.is_meta
        and not leaf.is_nested
        and (leaf.layout != torch.strided or leaf.is_quantized)
    ):  # a sparse tensor is written dense, a quantized one dequantized (as .npz has them)
        leaf = leaf.to_dense() if leaf.layout != torch.strided else leaf.dequantize()
    if type(leaf) in (torch.Tensor, torch.nn.Parameter) and leaf.layout == torch.strided:
        t = leaf.detach()
        code = _code(plan, index, t.dtype)
        plan.complete(index, None, str(t.dtype).removeprefix("torch."))
        return code, tuple(t.shape), t.numel() * t.element_size(), lambda: _tensor_chunks(t)
    array, bits = plan.array(index)  # the bits of an ml_dtypes array: stored as their type
    bits_of = _torch_dtype(array.dtype, bits) if bits else None
    native = array.dtype.newbyteorder("=") if array.dtype.byteorder not in "=|" else array.dtype
    code = _code(plan, index, bits_of if bits else _torch_dtype(native, None))
    return code, array.shape, array.nbytes, lambda: _array_chunks(array, native)


def _torch_dtype(dtype: np.dtype[Any], bits: str | None) -> torch.dtype | None:
    if bits is not None:
        found = getattr(torch, bits, None)
        return found if isinstance(found, torch.dtype) else None
    try:
        return torch.from_numpy(np.empty(0, dtype)).dtype
    except TypeError:
        return _dtypes.torch_dtype_of(dtype)


def _code(plan: Plan, index: int, dtype: torch.dtype | None) -> str:
    code = _CODE_OF.get(dtype) if dtype is not None else None
    if code is None:
        array_leaf = plan.leaves[index]
        shown = getattr(array_leaf, "dtype", dtype)
        raise ConversionError(
            f"cannot write {plan.where(index)} ({str(shown).removeprefix('torch.')}) to "
            f".safetensors: safetensors has no such type (its types are {_TYPES_TEXT}); write "
            ".npz, .npy or a directory of .npy files instead, which keep it",
            path=plan.paths[index],
        )
    return code


def _tensor_chunks(t: torch.Tensor) -> Iterator[np.ndarray]:
    step = max(_arrays.CHUNK // max(t.element_size(), 1), 1)
    for block in _arrays.blocks(t, step):
        if not block.numel():
            yield np.empty(0, np.uint8)
            continue
        flat = block.resolve_conj().resolve_neg()
        if flat.stride() != (1,):  # torch calls a size-1 view of stride 2 contiguous, too
            flat = flat.clone(memory_format=torch.contiguous_format)
        yield flat.view(torch.uint8).numpy(force=True)


def _array_chunks(array: np.ndarray, native: np.dtype[Any]) -> Iterator[np.ndarray]:
    step = max(_arrays.CHUNK // max(array.dtype.itemsize, 1), 1)
    for block in _arrays.blocks(array, step):
        yield np.ascontiguousarray(block, dtype=native)
