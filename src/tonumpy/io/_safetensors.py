"""``.safetensors`` files, read and written here (the ``safetensors`` package is not needed).

The format is an 8-byte header length, a JSON header (each tensor's dtype, shape and byte range,
and an optional ``__metadata__`` of strings), then the data. Reading checks the header against
the file (every range inside the data, the size its shape and dtype need, no two overlapping)
and memory-maps the data copy-on-write: nothing is read until it is used. Writing streams one
tensor at a time, largest items first so that every tensor stays aligned.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from .. import _dtypes
from .._format import _arrays
from .._format._fs import open_regular, short
from .._format._names import STRUCTURE, tensor_name
from .._format._structure import Layout
from ..errors import ConversionError, FileFormatError

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

    The file is held to the rules of the ``safetensors`` library (its ``safe_open``): a header of
    at most 100 MB, strict JSON (no ``NaN``, no lone UTF-16 surrogate, nested at most 127 deep,
    no field given twice), each tensor's dtype, shape and offsets, the tensors' bytes one after
    the other from offset 0 to the file's last byte, with no gap, overlap or trailing byte.

    Raises:
        FileFormatError: The header is not valid or does not match the file.
    """
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        header, start = _header(f, size, path)
        metadata, specs = _interpret(header, path)
        _check_layout(specs, size - start, path)
        checked = {name: _checked(name, spec, path) for name, spec in specs.items()}
        data = None
        if size > start:
            data = np.memmap(f, dtype=np.uint8, mode="c", offset=start, shape=(size - start,))
    tensors = {}
    for name, (dtype, shape) in checked.items():
        begin, end = specs[name][2:]
        if end == begin or data is None:
            tensors[name] = torch.empty(shape, dtype=dtype)
            continue
        raw = torch.from_numpy(np.asarray(data[begin:end]))
        tensors[name] = raw.view(dtype).reshape(shape)
    return tensors, metadata


# The header as the safetensors library parses it (serde_json into Rust types): these are the
# rules a file must meet for ``safe_open`` to open it, which tonumpy's reader follows exactly.
_DEPTH = 127  # serde_json refuses JSON nested 128 levels deep
_USIZE = 1 << 64  # a shape or offset is a Rust usize
_INFO_FIELDS = ("dtype", "shape", "data_offsets")
_PACKED = frozenset({"F4", "F6_E2M3", "F6_E3M2"})  # sub-byte codes NumPy cannot hold
_KNOWN_CODES = _PACKED | {
    "BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ",
    "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64",
}  # fmt: skip
_Spec = tuple[str, tuple[int, ...], int, int]  # dtype code, shape, begin, end


class _Object(list[tuple[str, Any]]):
    """A JSON object as its (key, value) pairs, in order, repeats kept."""


class _NotUsize(float):
    """A JSON integer the safetensors library reads as a float: a negative one (``-0`` too)."""


class _HeaderError(ValueError):
    pass


def _json_int(text: str) -> int | float:
    if len(text) > 20:  # beyond 64 bits: serde_json reads it as a float, which may overflow
        _json_float(text)
    return _NotUsize(text) if text.startswith("-") else int(text)


def _json_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise _HeaderError(f"the number {text[:40]} is out of range")
    return value


def _json_constant(text: str) -> float:
    raise _HeaderError(f"{text} is not JSON")


def _header(f: BinaryIO, size: int, path: Path) -> tuple[_Object, int]:
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
        header = json.loads(
            f.read(length).decode("utf-8"),
            object_pairs_hook=_Object,
            parse_int=_json_int,
            parse_float=_json_float,
            parse_constant=_json_constant,
        )
    except UnicodeDecodeError:
        raise FileFormatError(
            f"{path}: not a .safetensors file (its header is not UTF-8)"
        ) from None
    except RecursionError:
        header = None  # nested beyond any limit: refused below as too deep
    except ValueError as exc:
        raise FileFormatError(
            f"{path}: not a .safetensors file (its header is not JSON: {exc})"
        ) from None
    _check_json(header, path)
    if not isinstance(header, _Object):
        raise FileFormatError(f"{path}: not a .safetensors file (its header is not a mapping)")
    return header, 8 + length


def _check_json(header: Any, path: Path) -> None:
    """Refuse what serde_json refuses and Python's ``json`` takes: deep nesting, surrogates."""
    if header is None:
        raise FileFormatError(
            f"{path}: not a .safetensors file (its header is nested deeper than {_DEPTH} levels)"
        )
    todo: list[tuple[Any, int]] = [(header, 1)]
    while todo:
        value, depth = todo.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise FileFormatError(
                    f"{path}: not a .safetensors file (its header holds the string "
                    f"{short(value)}, a lone UTF-16 surrogate that is not Unicode text)"
                ) from None
        elif isinstance(value, list):  # an array, or an object's pairs
            if depth > _DEPTH:
                raise FileFormatError(
                    f"{path}: not a .safetensors file (its header is nested deeper than "
                    f"{_DEPTH} levels)"
                )
            items = (
                (item for pair in value for item in pair) if isinstance(value, _Object) else value
            )
            todo.extend((item, depth + 1) for item in items)


def _interpret(header: _Object, path: Path) -> tuple[dict[str, str], dict[str, _Spec]]:
    """(``__metadata__``, each tensor's (dtype, shape, begin, end)) of a parsed header.

    A tensor named twice is the last of its descriptions (each must be valid), as in the
    safetensors library; ``__metadata__`` given twice is refused.
    """
    metadata: dict[str, str] | None = None
    specs: dict[str, _Spec] = {}
    for name, value in header:
        if name != "__metadata__":
            specs[name] = _spec(name, value, path)
            continue
        if metadata is not None:
            raise FileFormatError(f"{path}: not a .safetensors file (__metadata__ given twice)")
        if value is None:
            metadata = {}
        elif isinstance(value, _Object) and all(isinstance(v, str) for _, v in value):
            metadata = dict(value)
        else:
            raise FileFormatError(
                f"{path}: its __metadata__ is {short(_plain(value))}, not a mapping of strings "
                "to strings: not a valid .safetensors file"
            )
    return metadata or {}, specs


def _plain(value: Any) -> Any:
    """A parsed JSON value with its objects as dicts again (for messages)."""
    if isinstance(value, _Object):
        return {k: _plain(v) for k, v in value}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _usizes(value: Any, count: int | None) -> bool:
    return (
        isinstance(value, list)
        and not isinstance(value, _Object)
        and (count is None or len(value) == count)
        and all(type(n) is int and 0 <= n < _USIZE for n in value)
    )


def _spec(name: str, spec: Any, path: Path) -> _Spec:
    source = f"{path}: tensor {short(name)}"
    if isinstance(spec, _Object):
        fields: dict[str, Any] = {}
        for key, value in spec:
            if key in _INFO_FIELDS and key in fields:
                raise FileFormatError(f"{source}: its {key} is given twice")
            fields[key] = value
    elif isinstance(spec, list) and len(spec) == len(_INFO_FIELDS):
        fields = dict(zip(_INFO_FIELDS, spec, strict=True))  # serde reads a struct from a list
    else:
        raise FileFormatError(f"{source}: {short(_plain(spec))} is not a tensor description")
    missing = [key for key in _INFO_FIELDS if key not in fields]
    if missing:
        raise FileFormatError(f"{source}: its description has no {missing[0]}")
    code, shape, offsets = fields["dtype"], fields["shape"], fields["data_offsets"]
    if isinstance(code, _Object) and len(code) == 1 and code[0][1] is None:
        code = code[0][0]  # serde reads a name-only enum value from {"U8": null} too
    if not isinstance(code, str) or code not in _KNOWN_CODES:
        raise FileFormatError(f"{source}: {short(_plain(code))} is not a safetensors dtype")
    if not _usizes(shape, None):
        raise FileFormatError(f"{source}: a bad shape {short(_plain(shape))}")
    if not _usizes(offsets, 2):
        raise FileFormatError(f"{source}: bad data_offsets {short(_plain(offsets))}")
    return code, tuple(shape), offsets[0], offsets[1]


def _checked(name: str, spec: _Spec, path: Path) -> tuple[torch.dtype, tuple[int, ...]]:
    """The dtype and shape of a tensor kept, its size checked against its offsets."""
    source = f"{path}: tensor {short(name)}"
    code, shape, begin, end = spec
    numel = 1
    for n in shape:  # in this order, as the safetensors library multiplies (it overflows)
        numel *= n
        if numel >= _USIZE:
            raise FileFormatError(f"{source}: its shape {shape} overflows a 64-bit size")
    dtype = _CODES.get(code)
    if dtype is None or code in _PACKED:
        raise FileFormatError(
            f"{source}: dtype {code} is not one {'NumPy' if code in _PACKED else 'this torch'} "
            "can hold; tonumpy cannot read it"
        )
    nbytes = numel * dtype.itemsize
    if nbytes >= _USIZE:
        raise FileFormatError(f"{source}: its shape {shape} overflows a 64-bit size")
    if end < begin or end - begin != nbytes:
        raise FileFormatError(
            f"{source}: a {shape} {str(dtype).removeprefix('torch.')} tensor needs "
            f"{nbytes:,} bytes, the file gives it {max(end - begin, 0):,} "
            f"(bytes {begin:,} to {end:,}): corrupt"
        )
    if not numel:  # no data: the shape alone must be one NumPy (and torch) can hold
        try:
            np.empty(shape, dtype=f"u{min(dtype.itemsize, 8)}")
        except (ValueError, OverflowError):
            raise FileFormatError(
                f"{source}: NumPy cannot hold an empty array of shape {shape}; tonumpy "
                "cannot read it"
            ) from None
    return dtype, shape


def _check_layout(specs: dict[str, _Spec], data_size: int, path: Path) -> None:
    """The tensors' bytes follow each other, in offset order, from 0 to the file's end."""
    at, before = 0, None
    ranked = sorted(specs.items(), key=lambda item: (item[1][2], item[1][3]))
    for name, (_, _, begin, end) in ranked:
        if begin < at:
            raise FileFormatError(
                f"{path}: tensors {short(before)} and {short(name)} overlap (bytes {begin:,} to "
                f"{at:,} of the data): not a valid .safetensors file"
            )
        if begin > at:
            raise FileFormatError(
                f"{path}: tensor {short(name)} starts at byte {begin:,} of the data, the tensors "
                f"before it end at {at:,}: a gap of bytes no tensor owns, not a valid "
                ".safetensors file"
            )
        at, before = end, name
    if at < data_size:
        raise FileFormatError(
            f"{path}: its tensors end at byte {at:,} of the data, the file has {data_size:,} "
            "(bytes after the last tensor): not a valid .safetensors file"
        )
    if at > data_size:
        raise FileFormatError(
            f"{path}: its tensors end at byte {at:,} of the data, outside the file "
            f"({data_size:,} bytes of data): truncated or corrupt"
        )


# ------------------------------------------------------------------------------ writing


_Chunks = Callable[[], Iterator[Any]]


def write(
    file: BinaryIO,
    layout: Layout,
    metadata: dict[str, str],
    progress: Callable[[int], None] | None = None,
) -> None:
    """Write the array leaves of ``plan`` (exact dtypes), its structure in the metadata.

    Each tensor is named by its key path ([`tonumpy._format._names.tensor_name`][]): the keys of a
    flat dict are its tensors' names. ``metadata`` (the source file's, say) is kept;
    ``progress(i)`` follows each leaf.

    Raises:
        ConversionError: A leaf has a dtype safetensors lacks (complex128, strings, ...), or
            a name it cannot hold (not UTF-8, ``__metadata__``, the name of another leaf).
    """
    layout.names = _tensor_names(layout)  # the structure lists the names other readers see
    entries = [_entry(layout, i) for i in range(len(layout.leaves))]
    order = sorted(range(len(entries)), key=lambda i: -_CODES[entries[i][0]].itemsize)
    header: dict[str, Any] = {}
    at = 0
    for i in order:
        code, shape, nbytes, _ = entries[i]
        offsets = [at, at + nbytes]
        header[layout.names[i]] = {"dtype": code, "shape": list(shape), "data_offsets": offsets}
        at += nbytes
    header["__metadata__"] = {**metadata, STRUCTURE: layout.structure_bytes().decode("utf-8")}
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
            raise FileFormatError(f"{layout.place(i)}: {written} bytes written of {nbytes}")
        if progress is not None:
            progress(i)


def _tensor_names(layout: Layout) -> list[str]:
    """The name of each array leaf: its key path joined by dots; checked to be writable."""
    names = [tensor_name(path) for path in layout.paths]
    first: dict[str, int] = {}
    for index, name in enumerate(names):
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise ConversionError(
                f"cannot write {layout.place(index)} to .safetensors: its name {short(name)} is "
                "not valid UTF-8 (it holds a lone surrogate), which a .safetensors tensor name "
                "must be; rename the key, or write .npz, .npy or a directory instead",
                path=layout.paths[index],
            ) from None
        if name == "__metadata__":
            raise ConversionError(
                f"cannot write {layout.place(index)} to .safetensors: __metadata__ is reserved "
                "for the file's metadata, no tensor can have that name; rename the key, or "
                "write .npz, .npy or a directory instead",
                path=layout.paths[index],
            )
        other = first.setdefault(name, index)
        if other != index:
            raise ConversionError(
                f"cannot write both {layout.place(other)} and {layout.place(index)} to "
                f".safetensors: a tensor is named by its key path joined by dots, and both are "
                f"named {short(name)}; rename one of the keys, or write .npz, .npy or a "
                "directory, which keep both",
                path=layout.paths[index],
            )
    return names


def _entry(layout: Layout, index: int) -> tuple[str, tuple[int, ...], int, _Chunks]:
    """(dtype code, shape, bytes, chunks) of leaf ``index``; completes its node."""
    leaf = layout.leaf(index)
    if isinstance(leaf, _arrays.LazyArray) and not leaf.fortran and leaf.dtype.isnative:
        code = _code(layout, index, _torch_dtype(leaf.dtype, leaf.bits))
        layout.complete(index, None, leaf.bits or str(leaf.dtype))
        return code, leaf.shape, leaf.nbytes, leaf.chunks
    if (
        isinstance(leaf, torch.Tensor)
        and not leaf.is_meta
        and not leaf.is_nested
        and (leaf.layout != torch.strided or leaf.is_quantized)
    ):  # a sparse tensor is written dense, a quantized one dequantized (as .npz has them)
        leaf = leaf.to_dense() if leaf.layout != torch.strided else leaf.dequantize()
    if type(leaf) in _dtypes.PLAIN and leaf.layout == torch.strided:
        t = leaf.detach()
        code = _code(layout, index, t.dtype)
        layout.complete(index, None, str(t.dtype).removeprefix("torch."))
        return code, tuple(t.shape), t.numel() * t.element_size(), lambda: _tensor_chunks(t)
    array, bits = layout.array(index)  # the bits of an ml_dtypes array: stored as their type
    bits_of = _torch_dtype(array.dtype, bits) if bits else None
    native = array.dtype.newbyteorder("=") if array.dtype.byteorder not in "=|" else array.dtype
    code = _code(layout, index, bits_of if bits else _torch_dtype(native, None))
    return code, array.shape, array.nbytes, lambda: _array_chunks(array, native)


def _torch_dtype(dtype: np.dtype[Any], bits: str | None) -> torch.dtype | None:
    if bits is not None:
        found = getattr(torch, bits, None)
        return found if isinstance(found, torch.dtype) else None
    try:
        return torch.from_numpy(np.empty(0, dtype)).dtype
    except TypeError:
        return _dtypes.torch_dtype_of(dtype)


def _code(layout: Layout, index: int, dtype: torch.dtype | None) -> str:
    code = _CODE_OF.get(dtype) if dtype is not None else None
    if code is None:
        array_leaf = layout.leaves[index]
        shown = getattr(array_leaf, "dtype", dtype)
        raise ConversionError(
            f"cannot write {layout.place(index)} ({str(shown).removeprefix('torch.')}) to "
            f".safetensors: safetensors has no such type (its types are {_TYPES_TEXT}); write "
            ".npz, .npy or a directory of .npy files instead, which keep it",
            path=layout.paths[index],
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
