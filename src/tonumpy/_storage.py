"""Where accumulated rows live: large slabs in memory, or a ``.npy`` file that grows.

[`tonumpy.Accumulator`][] copies each batch of a leaf once, into a [`Slabs`][tonumpy._storage.Slabs]
(in memory) or a [`GrowingNpy`][tonumpy._storage.GrowingNpy] (with ``directory=``), and never
touches it again until ``result()``. Both are about bytes and memory, not about trees: the
column policy (``tonumpy._columns``) has already decided each batch's dtype and padded shape.

``bfloat16``/``float8`` rows (``ml_dtypes``) are stored in files as their bits, unsigned
integers of the same size ([`stored_dtype`][tonumpy._storage.stored_dtype]), the one bit
representation of every tonumpy file; the directory's structure names the real dtype.
"""

from __future__ import annotations

import ast
import math
import os
import weakref
from pathlib import Path
from typing import Any

import numpy as np

from ._columns import copy_padded
from ._dtypes import is_ml_dtype

__all__ = ["GrowingNpy", "Slabs", "stored_dtype"]


def stored_dtype(dtype: np.dtype[Any]) -> np.dtype[Any]:
    """The dtype rows of ``dtype`` are stored as in a file: ``ml_dtypes`` as unsigned bits.

    Examples:
        >>> stored_dtype(np.dtype("float32"))
        dtype('float32')
    """
    if is_ml_dtype(dtype):
        return np.dtype(f"u{dtype.itemsize}")
    return dtype


# ------------------------------------------------------------------------------ .npy files

_MAGIC = b"\x93NUMPY\x01\x00"
_BLOCK_BYTES = 16 << 20  # re-layouts copy about this much at a time


def _pwrite(fd: int, data: memoryview, offset: int) -> int:
    if hasattr(os, "pwrite"):
        return os.pwrite(fd, data, offset)
    os.lseek(fd, offset, os.SEEK_SET)  # pragma: no cover - Windows
    return os.write(fd, data)  # pragma: no cover


def _pread(fd: int, n: int, offset: int) -> bytes:
    if hasattr(os, "pread"):
        return os.pread(fd, n, offset)
    os.lseek(fd, offset, os.SEEK_SET)  # pragma: no cover - Windows
    return os.read(fd, n)  # pragma: no cover


def _read_all(fd: int, n: int, offset: int) -> bytes:
    parts = []
    while n > 0:
        part = _pread(fd, n, offset)
        if not part:
            raise OSError(f"unexpected end of file at byte {offset}")
        parts.append(part)
        n -= len(part)
        offset += len(part)
    return b"".join(parts)


def _write_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        written = _pwrite(fd, data, offset)
        data = data[written:]
        offset += written


def _bytes_of(arr: np.ndarray) -> memoryview:
    flat: np.ndarray = np.ascontiguousarray(arr).reshape(-1)
    return flat.view(np.uint8).data


class GrowingNpy:
    """One leaf growing along its first axis in a ``.npy`` file (format version 1.0).

    The header is written with room for any row count, and rewritten in place after every
    append, once the batch's bytes are in the file: at every moment the file is a valid
    ``.npy`` whose header counts only complete rows (bytes of a batch whose append was cut
    short lie past the counted rows, where ``np.load`` does not look).

    When a batch is larger than the file's rows in another dimension, the file is rewritten
    (to a temporary file, then renamed over the old one, so a crash leaves one or the other)
    with those dimensions grown: to the exact size while all rewrites so far stay within twice
    the bytes appended plus 64 MiB (the usual case: the largest length shows up early, while
    the file is small), otherwise by half as much again, so that rewrites stay amortised O(1)
    per appended byte even when every batch is longer than the last; the surplus is trimmed
    when the result is read.
    """

    #: Re-layouts may rewrite this many bytes, plus twice the bytes appended, before growing
    #: dimensions geometrically instead of exactly (rewriting small files early costs nothing).
    rewrite_slack = 64 << 20

    def __init__(
        self,
        path: Path,
        dtype: np.dtype[Any],
        trailing: tuple[int, ...],
        *,
        rewrite_slack: int = rewrite_slack,
    ) -> None:
        self.path = path
        self.rewrite_slack = rewrite_slack
        # O_EXCL: never another run's file; 0o666 & ~umask, as any new file
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        self._finalizer = weakref.finalize(self, os.close, self.fd)
        self.reset(dtype, trailing)

    def reset(self, dtype: np.dtype[Any], trailing: tuple[int, ...]) -> None:
        """Empty the file and start it again with rows of ``dtype`` and shape ``trailing``."""
        self.dtype = dtype
        self.trailing = trailing
        self.rows = 0
        self._appended = 0
        self._rewritten = 0
        self._descr = np.lib.format.dtype_to_descr(stored_dtype(dtype))
        probe = self._header_text(self._descr, (2**63, *(2**63 for _ in trailing)))
        self._header_len = -(-(len(probe) + 10 + 16) // 64) * 64  # room for any row count
        os.ftruncate(self.fd, 0)
        self._write_header(self.fd)

    @classmethod
    def adopt(cls, path: Path, rows: int, dtype: np.dtype[Any] | None = None) -> GrowingNpy:
        """Continue a file this class wrote (``resume=True``): keep ``rows`` rows, cut the rest.

        ``dtype``: the rows' real dtype where the file holds its bits (``ml_dtypes``).

        Raises:
            OSError: The file is not one this class wrote, or holds fewer than ``rows`` rows.
        """
        self = cls.__new__(cls)
        self.path = path
        self.fd = os.open(path, os.O_RDWR | getattr(os, "O_NOFOLLOW", 0))
        self._finalizer = weakref.finalize(self, os.close, self.fd)
        size = os.fstat(self.fd).st_size
        head = _pread(self.fd, min(size, 1 << 16), 0)
        if not head.startswith(_MAGIC) or len(head) < 10:
            raise OSError(f"{path}: not a .npy file this tonumpy wrote (format 1.0)")
        header_len = 10 + int.from_bytes(head[8:10], "little")
        try:
            header = ast.literal_eval(head[10:header_len].decode("latin1"))
            stored = np.dtype(np.lib.format.descr_to_dtype(header["descr"]))
            shape = tuple(int(n) for n in header["shape"])
        except (ValueError, SyntaxError, KeyError, TypeError) as exc:
            raise OSError(f"{path}: unreadable .npy header ({exc})") from None
        if header.get("fortran_order") or not shape or shape[0] < rows:
            raise OSError(f"{path}: holds {shape[:1]} rows in C order, not the {rows} logged")
        self.dtype = dtype if dtype is not None else stored
        self.trailing = shape[1:]
        self._descr = np.lib.format.dtype_to_descr(stored)
        self._header_len = header_len
        if size < header_len + rows * self.row_bytes:
            raise OSError(f"{path}: holds fewer bytes than its {rows} logged rows")
        probe = self._header_text(self._descr, (2**63, *(2**63 for _ in self.trailing)))
        if len(probe) > header_len - 11:
            raise OSError(f"{path}: its header has no room to grow (not written by tonumpy)")
        self.rows = rows
        self._appended = rows * self.row_bytes
        self._rewritten = 0
        os.ftruncate(self.fd, header_len + rows * self.row_bytes)
        self._write_header(self.fd)
        return self

    @staticmethod
    def _header_text(descr: Any, shape: tuple[int, ...]) -> str:
        return repr({"descr": descr, "fortran_order": False, "shape": shape})

    def _header(self) -> bytes:
        text = self._header_text(self._descr, (self.rows, *self.trailing))
        body = text.ljust(self._header_len - 10 - 1) + "\n"
        return _MAGIC + len(body).to_bytes(2, "little") + body.encode("latin1")

    def _write_header(self, fd: int) -> None:
        _write_all(fd, memoryview(self._header()), 0)

    @property
    def row_bytes(self) -> int:
        return math.prod(self.trailing) * self.dtype.itemsize

    def append(self, chunk: np.ndarray, fill: np.ndarray | None) -> None:
        """Write ``chunk`` (rows first, at most the file's trailing shape) after the last row."""
        n = chunk.shape[0]
        if chunk.shape[1:] != self.trailing or chunk.dtype != self.dtype:
            padded = np.empty((n, *self.trailing), dtype=self.dtype)
            copy_padded(padded, chunk, fill)
            chunk = padded
        _write_all(self.fd, _bytes_of(chunk), self._header_len + self.rows * self.row_bytes)
        self.rows += n
        self._appended += n * self.row_bytes
        self._write_header(self.fd)

    def reserve(self, rows: int) -> None:
        """Make the (empty) file ``rows`` rows long, to be filled by ``write_rows`` in any order.

        The header counts them all at once: the file is complete when every row is written.
        """
        self.rows = rows
        os.ftruncate(self.fd, self._header_len + rows * self.row_bytes)
        self._write_header(self.fd)

    def write_rows(self, start: int, block: np.ndarray) -> None:
        """Write ``block`` (rows of the file's dtype and trailing shape) at row ``start``."""
        assert block.shape[1:] == self.trailing, (block.shape, self.trailing)  # noqa: S101
        _write_all(self.fd, _bytes_of(block), self._header_len + start * self.row_bytes)

    def grow_to(self, needed: tuple[int, ...], fill: np.ndarray | None) -> None:
        """Make room for rows of trailing shape ``needed`` (rewrites the file if it must)."""
        if all(n <= t for n, t in zip(needed, self.trailing, strict=True)):
            return
        cost = self._rewritten + self.rows * self.row_bytes
        exact = cost <= 2 * self._appended + self.rewrite_slack
        new = tuple(
            t if n <= t else (n if exact else max(n, t + t // 2))
            for n, t in zip(needed, self.trailing, strict=True)
        )
        self.relayout(new, fill)

    def relayout(
        self,
        trailing: tuple[int, ...],
        fill: np.ndarray | None,
        dtype: np.dtype[Any] | None = None,
    ) -> None:
        """Rewrite the file with rows of shape ``trailing`` (cropping or padding each row).

        ``dtype``: a wider dtype the rows are converted to (the column policy promoted the
        leaf's dtype; every value converts exactly).
        """
        old_trailing, old_row, old_dtype = self.trailing, self.row_bytes, self.dtype
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            self.trailing = trailing
            if dtype is not None:
                self.dtype = dtype
                self._descr = np.lib.format.dtype_to_descr(stored_dtype(dtype))
            self._write_header(fd)
            new_row = self.row_bytes
            step = max(1, _BLOCK_BYTES // max(1, old_row, new_row))
            keep = tuple(slice(0, min(a, b)) for a, b in zip(old_trailing, trailing, strict=True))
            for start in range(0, self.rows, step):
                n = min(step, self.rows - start)
                raw = _read_all(self.fd, n * old_row, self._header_len + start * old_row)
                block = np.frombuffer(raw, dtype=old_dtype).reshape(n, *old_trailing)
                out = np.empty((n, *trailing), dtype=self.dtype)
                rows_and_keep = (slice(None), *keep)
                cropped = block[rows_and_keep]
                copy_padded(out, cropped, fill)
                _write_all(fd, _bytes_of(out), self._header_len + start * new_row)
        except BaseException:
            os.close(fd)
            self.trailing, self.dtype = old_trailing, old_dtype
            self._descr = np.lib.format.dtype_to_descr(stored_dtype(old_dtype))
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, self.path)
        self._finalizer()  # closes the old descriptor
        self.fd = fd
        self._finalizer = weakref.finalize(self, os.close, fd)
        self._rewritten += self.rows * self.row_bytes

    def open(self, rows: int) -> np.ndarray:
        """The first ``rows`` rows, memory-mapped read-only (``ml_dtypes`` rows as such)."""
        shape = (rows, *self.trailing)
        if rows == 0 or math.prod(shape) == 0:
            return np.empty(shape, dtype=self.dtype)
        stored = stored_dtype(self.dtype)
        mapped = np.memmap(self.path, dtype=stored, mode="r", offset=self._header_len, shape=shape)
        return mapped if stored == self.dtype else mapped.view(self.dtype)


# ------------------------------------------------------------------------------ slabs

#: Larger than glibc's largest mmap threshold (32 MiB on 64-bit): an allocation this big is
#: always a memory mapping of its own, returned to the system the moment it is freed.
_SLAB_MAX = 48 << 20
_SLAB_MIN = 256 << 10


class Slabs:
    """Storage for one leaf's chunks: batches are copied, back to back, into large slabs.

    Batch-sized arrays are small enough for the C allocator to serve from its heap, where
    memory freed in the middle stays counted in the process's RSS. Slabs grow from 256 KiB to
    48 MiB, so all but the first few are memory mappings of their own: when
    [`Accumulator.result`][] has copied every chunk of a slab, the slab is unmapped, and
    memory peaks near the result's size instead of the chunks' plus the result's.
    """

    __slots__ = ("buf", "next_size", "used")

    def __init__(self) -> None:
        self.buf: np.ndarray | None = None
        self.used = 0
        self.next_size = _SLAB_MIN

    def store(self, arr: np.ndarray) -> np.ndarray:
        """A copy of ``arr`` (C-contiguous) in a slab; it keeps its slab alive."""
        n = arr.nbytes
        if n == 0 or n >= _SLAB_MAX or arr.dtype.hasobject:
            return np.array(arr, order="C", copy=True)
        if self.buf is None or self.used + n > self.buf.nbytes:
            self.buf = np.empty(max(self.next_size, n), dtype=np.uint8)
            self.used = 0
            self.next_size = min(2 * self.next_size, _SLAB_MAX)
        out = self.buf[self.used : self.used + n].view(arr.dtype).reshape(arr.shape)
        np.copyto(out, arr, casting="no")
        self.used += -(-n // 64) * 64  # the next chunk starts 64-byte aligned
        return out
