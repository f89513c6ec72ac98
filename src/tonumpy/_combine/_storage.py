"""Where accumulated rows live: one growing buffer in memory, or a ``.npy`` file that grows.

[`tonumpy.Accumulator`][] writes each batch of a leaf once, padded, into a
[`Rows`][tonumpy._combine._storage.Rows] (in memory: a buffer laid out as the result, handed out as
the result's memory by ``result()``) or a [`GrowingNpy`][tonumpy._combine._storage.GrowingNpy] (with
``directory=``). Both are about bytes and memory, not about trees: the column policy
(``tonumpy._combine._columns``) has already decided each batch's dtype and padded shape.

``bfloat16``/``float8`` rows (``ml_dtypes``) are stored in files as their bits, unsigned
integers of the same size ([`stored_dtype`][tonumpy._combine._storage.stored_dtype]), the one bit
representation of every tonumpy file; the directory's structure names the real dtype.
"""

from __future__ import annotations

import contextlib
import io
import math
import mmap
import os
import platform
import sys
import weakref
from pathlib import Path
from typing import Any

import numpy as np

from .._dtypes import is_ml_dtype
from .._format import _npyheader
from ..errors import FileFormatError
from ._columns import Column, concat_arrays, copy_padded

__all__ = ["GrowingNpy", "Rows", "stored_dtype"]


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


def _write_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        written = _pwrite(fd, data, offset)
        data = data[written:]
        offset += written


#: The most buffers one ``pwritev`` call takes (POSIX guarantees at least 16; Linux: 1024).
_IOV_MAX = min(os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 16, 1024) or 16


def _pwritev_all(fd: int, buffers: list[memoryview], offset: int) -> int:
    """Write ``buffers`` one after the other at ``offset``; the offset after them."""
    total = sum(len(b) for b in buffers)
    while buffers:
        written = os.pwritev(fd, buffers, offset)
        offset += written
        total -= written
        if not total:  # the usual case: everything in one call
            break
        while buffers and written >= len(buffers[0]):
            written -= len(buffers[0])
            buffers = buffers[1:]
        if buffers and written:  # a short write ended inside a buffer
            buffers = [buffers[0][written:], *buffers[1:]]
    return offset


def _bytes_of(arr: np.ndarray) -> memoryview:
    flat: np.ndarray = np.ascontiguousarray(arr).reshape(-1)
    return flat.view(np.uint8).data


def _mapped(fd: int, offset: int, nbytes: int) -> np.ndarray:
    """Bytes ``[offset, offset + nbytes)`` of file ``fd``, memory-mapped read-only (``uint8``).

    The map is unmapped when the last array viewing it goes. Where the system can, its page
    table is filled in one call (``MAP_POPULATE``), not one fault per page.
    """
    if nbytes == 0:
        return np.empty(0, np.uint8)
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    length = offset + nbytes - start
    populate = getattr(mmap, "MAP_POPULATE", 0)
    if populate:
        flags = mmap.MAP_SHARED | populate
        mapped = mmap.mmap(fd, length, flags=flags, prot=mmap.PROT_READ, offset=start)
    else:  # pragma: no cover - not Linux
        mapped = mmap.mmap(fd, length, access=mmap.ACCESS_READ, offset=start)
    return np.frombuffer(mapped, np.uint8, count=nbytes, offset=offset - start)


#: Re-layouts may rewrite this many bytes, plus twice the bytes appended, before growing
#: dimensions geometrically instead of exactly (rewriting small data early costs nothing).
_REWRITE_SLACK = 64 << 20


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

    def __init__(
        self,
        path: Path,
        dtype: np.dtype[Any],
        trailing: tuple[int, ...],
        *,
        rewrite_slack: int | None = None,
    ) -> None:
        self.path = path
        #: Re-layouts may rewrite this many bytes, plus twice the bytes appended, before
        #: growing dimensions geometrically (default ``_REWRITE_SLACK``).
        self.rewrite_slack = _REWRITE_SLACK if rewrite_slack is None else rewrite_slack
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
        self._header_len = _npyheader.room(stored_dtype(dtype), 1 + len(trailing))
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
        self.rewrite_slack = _REWRITE_SLACK
        self.fd = os.open(path, os.O_RDWR | getattr(os, "O_NOFOLLOW", 0))
        self._finalizer = weakref.finalize(self, os.close, self.fd)
        size = os.fstat(self.fd).st_size
        head = _pread(self.fd, min(size, _npyheader.MAX_HEADER + 16), 0)
        try:
            header = _npyheader.read_header(io.BytesIO(head), str(path))
        except FileFormatError as exc:
            raise OSError(str(exc)) from None
        header_len, shape, stored = header.size, header.shape, header.dtype
        if header.fortran or not shape or shape[0] < rows:
            raise OSError(f"{path}: holds {shape[:1]} rows in C order, not the {rows} logged")
        self.dtype = dtype if dtype is not None else stored
        self.trailing = shape[1:]
        self._header_len = header_len
        if size < header_len + rows * self.row_bytes:
            raise OSError(f"{path}: holds fewer bytes than its {rows} logged rows")
        if not _npyheader.grows_in(stored, len(shape), header_len):
            raise OSError(f"{path}: its header has no room to grow (not written by tonumpy)")
        self.rows = rows
        self._appended = rows * self.row_bytes
        self._rewritten = 0
        os.ftruncate(self.fd, header_len + rows * self.row_bytes)
        self._write_header(self.fd)
        return self

    def _header(self) -> bytes:
        shape = (self.rows, *self.trailing)
        return _npyheader.header(stored_dtype(self.dtype), shape, size=self._header_len)

    def _write_header(self, fd: int) -> None:
        _write_all(fd, memoryview(self._header()), 0)

    @property
    def row_bytes(self) -> int:
        return math.prod(self.trailing) * self.dtype.itemsize

    def append(self, chunk: np.ndarray, fill: np.ndarray | None) -> None:
        """Write ``chunk`` (rows first, at most the file's trailing shape) after the last row."""
        n = chunk.shape[0]
        offset = self._header_len + self.rows * self.row_bytes
        if not self._write_padded_rows(self.fd, chunk, fill, offset):
            if chunk.shape[1:] != self.trailing or chunk.dtype != self.dtype:
                padded = np.empty((n, *self.trailing), dtype=self.dtype)
                copy_padded(padded, chunk, fill)
                chunk = padded
            _write_all(self.fd, _bytes_of(chunk), offset)
        self.rows += n
        self._appended += n * self.row_bytes
        self._write_header(self.fd)

    def _write_padded_rows(
        self, fd: int, chunk: np.ndarray, fill: np.ndarray | None, offset: int
    ) -> bool:
        """Write rows that are short only along their first axis into ``fd``, without a copy.

        ``(L, vocab)`` rows into ``(width, vocab)`` ones: each row's bytes, then the same
        padding bytes, gathered by ``pwritev``. False when the rows are not of that form (or
        the platform lacks ``pwritev``): the caller pads a copy.
        """
        trailing = self.trailing
        if (
            not hasattr(os, "pwritev")
            or fill is None
            or chunk.dtype != self.dtype
            or not trailing
            or chunk.shape[2:] != trailing[1:]
            or chunk.shape[1] >= trailing[0]
            or not chunk.flags.c_contiguous
        ):
            return False
        inner = math.prod(trailing[1:])
        pad = np.full((trailing[0] - chunk.shape[1]) * inner, fill, dtype=self.dtype)
        pad_bytes = pad.view(np.uint8).data
        rows = chunk.reshape(chunk.shape[0], -1).view(np.uint8)
        step = max(1, _IOV_MAX // 2)
        for start in range(0, chunk.shape[0], step):
            buffers = [part for row in rows[start : start + step] for part in (row.data, pad_bytes)]
            offset = _pwritev_all(fd, buffers, offset)
        return True

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
        old_trailing, old_dtype = self.trailing, self.dtype
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            self.trailing = trailing
            if dtype is not None:
                self.dtype = dtype
            self._write_header(fd)
            self._copy_rows(fd, old_trailing, old_dtype, fill)
        except BaseException:
            os.close(fd)
            self.trailing, self.dtype = old_trailing, old_dtype
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, self.path)
        self._finalizer()  # closes the old descriptor
        self.fd = fd
        self._finalizer = weakref.finalize(self, os.close, fd)
        self._rewritten += self.rows * self.row_bytes

    def _copy_rows(
        self,
        fd: int,
        old_trailing: tuple[int, ...],
        old_dtype: np.dtype[Any],
        fill: np.ndarray | None,
    ) -> None:
        """Write this file's rows (laid out as ``old_trailing``, ``old_dtype``) into ``fd``.

        They are written in the layout the file has now, about ``_BLOCK_BYTES`` at a time. Each
        block of old rows is read through a read-only memory map of its own (unmapped
        before the next, so memory stays bounded by a block). Rows that only grow along their
        first axis go from the old file's pages to the new file's in one copy (``pwritev`` of
        each row and its padding); others are cropped and padded into a block buffer first.
        """
        old_row = math.prod(old_trailing) * old_dtype.itemsize
        new_row = self.row_bytes
        step = max(1, _BLOCK_BYTES // max(1, old_row, new_row))
        pairs = zip(old_trailing, self.trailing, strict=True)
        keep = (slice(None), *(slice(0, min(a, b)) for a, b in pairs))
        out: np.ndarray | None = None
        offset = self._header_len
        for start in range(0, self.rows, step):
            n = min(step, self.rows - start)
            raw = _mapped(self.fd, self._header_len + start * old_row, n * old_row)
            block = raw.view(old_dtype).reshape(n, *old_trailing)
            if not self._write_padded_rows(fd, block, fill, offset):  # also False: a new dtype
                if out is None:
                    out = np.empty((min(step, self.rows), *self.trailing), dtype=self.dtype)
                copy_padded(out[:n], block[keep], fill)
                _write_all(fd, _bytes_of(out[:n]), offset)
            offset += n * new_row
            del raw, block  # unmaps the block

    def open(self, rows: int) -> np.ndarray:
        """The first ``rows`` rows, memory-mapped read-only (``ml_dtypes`` rows as such)."""
        shape = (rows, *self.trailing)
        if rows == 0 or math.prod(shape) == 0:
            return np.empty(shape, dtype=self.dtype)
        stored = stored_dtype(self.dtype)
        mapped = np.memmap(self.path, dtype=stored, mode="r", offset=self._header_len, shape=shape)
        return mapped if stored == self.dtype else mapped.view(self.dtype)


# ------------------------------------------------------------------------------ in memory

#: A leaf's buffer starts as a NumPy array and moves to an anonymous memory map of its own once
#: it needs more than this: small leaves (a loss, a few ids) never cost a mapping each.
_MAP_MIN = 1 << 20
#: Re-layouts move about this many bytes at a time (through a temporary copy of the block).
_LAYOUT_BLOCK = 8 << 20


def _anonymous(nbytes: int) -> mmap.mmap:
    """A private anonymous memory map of ``nbytes`` (zero pages, faulted in on first write).

    Advised ``MADV_NOHUGEPAGE`` where the platform has it: the rows are written once, in
    order, and a transparent huge page would make each fault wait for the kernel to assemble
    2 MiB of contiguous memory (on a host whose THP setting is ``madvise``, the advice NumPy
    gives every large array makes ``np.empty`` of a large buffer several times slower to fill
    than ordinary pages).
    """
    flags = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
    mm = mmap.mmap(-1, nbytes, flags=flags) if flags else mmap.mmap(-1, nbytes)
    _advise(mm)
    return mm


def _advise(mm: mmap.mmap) -> None:
    advice = getattr(mmap, "MADV_NOHUGEPAGE", None)
    if advice is not None:
        with contextlib.suppress(OSError):  # a kernel without transparent huge pages
            mm.madvise(advice)


#: ``madvise(MADV_POPULATE_WRITE)`` (Linux 5.14): fault a range in with one call, not one trap
#: per page. Python's ``mmap`` module names it from 3.13 on; before, its value (23, from the
#: kernel's generic ``mman-common.h``) is used on the architectures that take those values.
_POPULATE_WRITE: int | None = getattr(
    mmap,
    "MADV_POPULATE_WRITE",
    23
    if sys.platform.startswith("linux") and platform.machine() in ("x86_64", "aarch64")
    else None,
)


def _populate(mm: mmap.mmap, start: int, nbytes: int) -> None:
    """Fault in the whole pages of ``mm`` within ``[start, start + nbytes)``, if the kernel can.

    Only pages past ``start`` are named, never one holding earlier bytes. A kernel older than
    5.14 refuses the advice once and is not asked again (the writes fault the pages in).
    """
    global _POPULATE_WRITE  # noqa: PLW0603 - learnt once per process
    advice = _POPULATE_WRITE
    page = mmap.PAGESIZE
    low = -(-start // page) * page
    if advice is None or start + nbytes - low < page:
        return
    try:
        mm.madvise(advice, low, start + nbytes - low)
    except OSError:
        _POPULATE_WRITE = None


class _Buffer:
    """Bytes that grow geometrically without copying where the platform allows.

    Below ``map_min`` bytes they are a NumPy array (regrown by copying, amortised O(1) per
    byte); from there on, an anonymous memory map that ``mremap`` grows in place (``mmap.resize``):
    rows already written are never copied to grow. Where resizing a map is not available
    (no ``mremap``), a larger map is made and the bytes copied, amortised O(1) per byte too.
    No view of the buffer may be alive when it grows: callers take views, write, drop them.
    """

    __slots__ = ("array", "map", "map_min")

    def __init__(self, map_min: int) -> None:
        self.array: np.ndarray | None = None
        self.map: mmap.mmap | None = None
        self.map_min = map_min

    @property
    def capacity(self) -> int:
        if self.map is not None:
            return len(self.map)
        return 0 if self.array is None else self.array.nbytes

    def reserve(self, nbytes: int, used: int) -> None:
        """Make room for ``nbytes`` bytes, keeping the first ``used``."""
        have = self.capacity
        if nbytes <= have:
            return
        size = max(nbytes, 2 * have, 4096)
        if size < self.map_min:
            grown = np.empty(size, dtype=np.uint8)
            if used:
                assert self.array is not None  # noqa: S101
                grown[:used] = self.array[:used]
            self.array = grown
            return
        if self.map is not None:
            try:
                self.map.resize(size)  # mremap: the pages move, the bytes are not copied
            except (OSError, SystemError, ValueError):  # pragma: no cover - no mremap
                pass
            else:
                _advise(self.map)
                return
        grown_map = _anonymous(size)
        if used:
            target = np.frombuffer(grown_map, dtype=np.uint8, count=used)
            target[:] = self.bytes(used)
            del target
        self.release()
        self.map = grown_map

    def prefault(self, start: int, nbytes: int) -> None:
        """Fault in the pages of bytes ``[start, start + nbytes)`` (of a map) at once."""
        if self.map is not None:
            _populate(self.map, start, min(nbytes, len(self.map) - start))

    def bytes(self, nbytes: int) -> np.ndarray:
        """The first ``nbytes`` bytes, as a ``uint8`` array (a view: drop it before growing)."""
        if self.map is not None:
            return np.frombuffer(self.map, dtype=np.uint8, count=nbytes)
        assert self.array is not None or nbytes == 0  # noqa: S101
        return self.array[:nbytes] if self.array is not None else np.empty(0, np.uint8)

    def view(self, dtype: np.dtype[Any], shape: tuple[int, ...]) -> np.ndarray:
        """The first bytes as an array of ``dtype`` and ``shape`` (drop it before growing)."""
        nbytes = math.prod(shape) * dtype.itemsize
        return self.bytes(nbytes).view(dtype).reshape(shape)

    def hand_out(self, dtype: np.dtype[Any], shape: tuple[int, ...]) -> np.ndarray:
        """The first bytes as a new array that alone holds them; the buffer is left empty.

        A map is shrunk to exactly those bytes (the rest returns to the system) and becomes
        the array's memory: no copy. A small buffer's bytes are copied into an array of their
        own.
        """
        nbytes = math.prod(shape) * dtype.itemsize
        mapped = self.map
        if mapped is None or nbytes == 0:
            out = np.array(self.view(dtype, shape), copy=True)
            self.release()
            return out
        if nbytes < len(mapped):
            try:
                mapped.resize(nbytes)
            except (OSError, SystemError, ValueError):  # pragma: no cover - no mremap
                out = np.array(self.view(dtype, shape), copy=True)
                self.release()
                return out
        self.map = None
        self.array = None
        return np.frombuffer(mapped, dtype=np.uint8).view(dtype).reshape(shape)

    def release(self) -> None:
        """Return the bytes to the system (no view may be alive)."""
        if self.map is not None:
            self.map.close()
        self.map = None
        self.array = None


class Rows:
    """One leaf's rows in memory, rows first, laid out as the result will be.

    Each batch is written once, padded, into one buffer of the column's dtype and padded
    trailing shape so far (``_Buffer``: grown by ``mremap``, so rows already written are not
    copied to make room). A batch wider than the rows so far (or of a promoted dtype) makes the
    rows written so far move, in place, to the wider layout: to the exact width while all such
    re-layouts stay within twice the bytes appended plus 64 MiB (the usual case: the longest
    batch shows up while the buffer is small), otherwise by half as much again, so re-layouts
    stay amortised O(1) per appended byte even when every batch is longer than the last.

    [`result`][tonumpy._combine._storage.Rows.result] hands the buffer itself out as the result's
    memory where the layout allows (``axis=0``): no copy, and memory peaks at the result's
    size. The returned array then alone holds that memory: later appends go to a new buffer.
    """

    __slots__ = (
        "_appended",
        "_buf",
        "_rewritten",
        "dtype",
        "parts",
        "returned",
        "rewrite_slack",
        "rows",
        "trailing",
    )

    def __init__(self, *, rewrite_slack: int | None = None, map_min: int | None = None) -> None:
        #: Re-layouts may move this many bytes, plus twice the bytes appended, before
        #: growing dimensions geometrically (default ``_REWRITE_SLACK``, as ``GrowingNpy``).
        self.rewrite_slack = _REWRITE_SLACK if rewrite_slack is None else rewrite_slack
        # the buffer is a NumPy array below this many bytes, a memory map of its own from
        # there on (default ``_MAP_MIN``)
        self._buf = _Buffer(_MAP_MIN if map_min is None else map_min)
        self.dtype: np.dtype[Any] | None = None
        self.trailing: tuple[int, ...] = ()
        self.rows = 0  # rows in the buffer
        self.parts: list[np.ndarray] = []  # rows first, before the buffer's rows
        self.returned: np.ndarray | None = None  # the array result() handed out and kept
        self._appended = 0
        self._rewritten = 0

    @property
    def _row_bytes(self) -> int:
        assert self.dtype is not None  # noqa: S101
        return math.prod(self.trailing) * self.dtype.itemsize

    def _view(self) -> np.ndarray:
        assert self.dtype is not None  # noqa: S101
        return self._buf.view(self.dtype, (self.rows, *self.trailing))

    def append(
        self,
        chunk: np.ndarray,
        dtype: np.dtype[Any],
        trailing: tuple[int, ...],
        fill: np.ndarray | None,
    ) -> None:
        """Write ``chunk`` (rows first) after the last row.

        ``dtype`` and ``trailing`` are the column's dtype and padded trailing shape so far;
        ``fill`` pads (needed only where shapes differ).
        """
        n = chunk.shape[0]
        if n == 0:
            return
        if dtype.hasobject:  # Python objects cannot live in raw memory
            self._flush()
            self.parts.append(np.array(chunk, order="C", copy=True))
            return
        if self.rows == 0:
            self.dtype, self.trailing = dtype, trailing
        elif dtype != self.dtype or any(
            t > have for t, have in zip(trailing, self.trailing, strict=True)
        ):
            self._grow(dtype, trailing, fill)
        row_bytes = self._row_bytes
        self._buf.reserve((self.rows + n) * row_bytes, self.rows * row_bytes)
        self._buf.prefault(self.rows * row_bytes, n * row_bytes)
        assert self.dtype is not None  # noqa: S101
        view = self._buf.view(self.dtype, (self.rows + n, *self.trailing))
        copy_padded(view[self.rows :], chunk, fill)
        del view
        self.rows += n
        self._appended += n * row_bytes

    def _grow(
        self, dtype: np.dtype[Any], trailing: tuple[int, ...], fill: np.ndarray | None
    ) -> None:
        cost = self._rewritten + self.rows * self._row_bytes
        exact = cost <= 2 * self._appended + self.rewrite_slack
        new = tuple(
            have if t <= have else (t if exact else max(t, have + have // 2))
            for t, have in zip(trailing, self.trailing, strict=True)
        )
        self._relayout(dtype, new, fill)

    def _relayout(
        self, dtype: np.dtype[Any], trailing: tuple[int, ...], fill: np.ndarray | None
    ) -> None:
        """Move the rows, in place, to rows of ``dtype`` and shape ``trailing``.

        Rows that grow move last row first: block ``[a, b)`` lands at or after byte
        ``a * new_row``, past every row before it, which are still to move. Rows that shrink
        (only to trim a surplus of padding) move first row first, by the mirror argument.
        Each block is copied out before it is written back, since it may overlap itself.
        """
        old_dtype, old_trailing, old_row = self.dtype, self.trailing, self._row_bytes
        assert old_dtype is not None  # noqa: S101
        new_row = math.prod(trailing) * dtype.itemsize
        rows = self.rows
        self._buf.reserve(rows * new_row, rows * old_row)
        step = max(1, _LAYOUT_BLOCK // max(1, old_row, new_row))
        starts = list(range(0, rows, step))
        if new_row >= old_row:
            starts.reverse()
        keep = tuple(slice(0, min(a, b)) for a, b in zip(old_trailing, trailing, strict=True))
        old = self._buf.view(old_dtype, (rows, *old_trailing))
        new = self._buf.view(dtype, (rows, *trailing))
        for start in starts:
            stop = min(start + step, rows)
            index = (slice(start, stop), *keep)
            block = old[index].copy()
            copy_padded(new[start:stop], block, fill)
            del block
        del old, new
        self.dtype, self.trailing = dtype, trailing
        self._rewritten += rows * new_row

    def _flush(self) -> None:
        """Move the buffer's rows into ``parts`` (an array of their own)."""
        if self.rows:
            assert self.dtype is not None  # noqa: S101
            self.parts.append(self._buf.hand_out(self.dtype, (self.rows, *self.trailing)))
        self._buf.release()
        self.rows = 0

    def result(self, column: Column, keep: int) -> np.ndarray:
        """The first ``keep`` rows of the result (the column's axis in place), as a new array.

        With ``axis=0`` and no earlier result, the buffer becomes the result's memory (trimmed
        in place to the column's trailing shape first, if it grew by more): no copy. Rows past
        ``keep`` are then copied into an array the accumulator keeps, so a later ``result()``
        still has them. Otherwise the rows are copied into one new array, which then serves as
        the accumulator's storage for them (and a later ``result()`` returns it again).
        """
        dtype, trailing = column.dtype, column.trailing
        assert dtype is not None  # noqa: S101 - a column with chunks
        assert trailing is not None  # noqa: S101
        total = sum(p.shape[0] for p in self.parts) + self.rows
        returned = self.returned
        if (
            returned is not None
            and keep == total
            and self.rows == 0
            and len(self.parts) == 1
            and (self.parts[0] is returned or self.parts[0].base is returned)
        ):
            return returned
        if column.axis == 0 and not self.parts and self.rows and self.dtype == dtype:
            if self.trailing != trailing:  # trim the surplus of a geometric growth
                self._relayout(dtype, trailing, None)
            tail = self._view()[keep:].copy() if keep < self.rows else None
            out = self._buf.hand_out(dtype, (keep, *trailing))
            self.rows = 0
            self.parts = [out] if tail is None else [out, tail]
            self.returned = out
            return out
        crop = tuple(slice(0, t) for t in trailing)
        chunks = list(self.parts)
        if self.rows:
            index = (slice(None), *crop)
            chunks.append(self._view()[index])
        out = concat_arrays(chunks, column, rows=keep)
        del chunks
        if keep == total:
            self._buf.release()
            self.rows = 0
            moved = np.moveaxis(out, column.axis, 0) if column.axis else out
            self.parts = [moved]
            self.returned = out
        return out
