"""The ``.npy`` header, made and read in one place, through NumPy's ``np.lib.format``.

Every ``.npy`` file and ``.npz`` member tonumpy writes, the ``.npy`` files that grow as rows
arrive (``tonumpy._combine._storage``) and every one it reads have their header made or read
here. NumPy writes the header's text and parses it (``write_array_header_1_0``/``2_0``,
``read_magic``, ``read_array_header_1_0``/``2_0``); this module adds what a file from
anywhere needs before anything is allocated from it:

* the header's length is checked before its text is read (at most ``MAX_HEADER`` bytes:
  NumPy would read whatever length a damaged file declares, then check it);
* every dimension is an ``int`` of 0 or more (NumPy lets ``-1`` and ``True`` through);
* a dtype holding Python objects is refused: its data is a pickle, never read.

The caller then checks that the file holds the bytes the header declares
([`NpyHeader.nbytes`][tonumpy._format._npyheader.NpyHeader.nbytes]) before it maps or reads
them. NumPy takes tens of microseconds to parse a header, so parsed headers are remembered by
their bytes: the members of one file mostly share a few.

A header written to be rewritten in place (a growing file's row count) is padded to a fixed
size ([`header`][tonumpy._format._npyheader.header] with ``size=``);
[`room`][tonumpy._format._npyheader.room] is a size that a header of any shape of a rank fits.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import io
import math
from typing import Any, BinaryIO

import numpy as np

from ..errors import FileFormatError
from ._fs import short

# NumPy's reader of every version: np.lib.format names none for 3.0 (UTF-8 text); NumPy 1
# keeps it in np.lib.format, NumPy 2 in numpy.lib._format_impl
_read_array_header: Any = (
    getattr(np.lib.format, "_read_array_header", None)
    or importlib.import_module("numpy.lib._format_impl")._read_array_header  # noqa: SLF001
)

__all__ = [
    "MAX_HEADER",
    "NpyHeader",
    "grows_in",
    "header",
    "is_npy",
    "read_header",
    "room",
    "write_header",
]

#: Bytes of a ``.npy`` header's text read at most; NumPy writes a few hundred.
MAX_HEADER = 1 << 16
_LENGTH_BYTES = {(1, 0): 2, (2, 0): 4, (3, 0): 4}  # the length field of each format version
_LARGEST = 2**63  # the largest dimension a header is made room for (19 digits)
_SPARE = 16  # bytes a growing file's header keeps beyond its largest shape
_REMEMBERED = 1024  # bytes of the longest header remembered once parsed (NumPy's: ~120)


@dataclasses.dataclass(frozen=True)
class NpyHeader:
    """What a ``.npy`` header declares; ``size`` is the header's own length in bytes."""

    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    fortran: bool
    size: int

    @property
    def nbytes(self) -> int:
        """Bytes of data the header declares."""
        return math.prod(self.shape) * self.dtype.itemsize

    def describe(self) -> str:
        """The declared array, for messages: ``a (2, 3) float32 array (24 bytes)``."""
        return f"a {self.shape} {self.dtype} array ({self.nbytes:,} bytes)"


def is_npy(head: bytes) -> bool:
    r"""Whether ``head``, the first bytes of a file, start a ``.npy`` header.

    Examples:
        >>> is_npy(header(np.dtype("<f4"), (2,))), is_npy(b"PK\x03\x04")
        (True, False)
    """
    return head.startswith(np.lib.format.MAGIC_PREFIX)


def header(
    dtype: np.dtype[Any], shape: tuple[int, ...], fortran: bool = False, *, size: int | None = None
) -> bytes:
    """The ``.npy`` header of an array of ``dtype`` and ``shape``, as NumPy writes it.

    ``size``: pad the header with spaces to exactly this many bytes (a header rewritten in
    place as a file grows; its row count, the first dimension, is all that changes, so NumPy's
    text is made once per dtype and trailing shape).

    Examples:
        >>> len(header(np.dtype("<f4"), (2, 3))), len(header(np.dtype("<f4"), (2, 3), size=192))
        (128, 192)
        >>> padded = io.BytesIO(header(np.dtype("<f4"), (2, 3), size=192))
        >>> np.lib.format.read_magic(padded), np.lib.format.read_array_header_1_0(padded)
        ((1, 0), ((2, 3), False, dtype('float32')))

    Raises:
        ValueError: The header needs more than ``size`` bytes.
    """
    if size is None or not shape:
        raw = _numpy_header(dtype, tuple(shape), fortran)
        if size is None or size == len(raw):
            return raw
        magic, text = _split(raw)
    else:
        magic, before, after = _around_rows(dtype, tuple(shape[1:]), fortran)
        text = before + b"%d" % shape[0] + after
    width = _LENGTH_BYTES[(magic[-2], magic[-1])]
    body = size - len(magic) - width
    if len(text) + 1 > body:
        raise ValueError(f"a .npy header for shape {shape} needs more than {size} bytes")
    return magic + body.to_bytes(width, "little") + text.ljust(body - 1) + b"\n"


def _numpy_header(dtype: np.dtype[Any], shape: tuple[int, ...], fortran: bool) -> bytes:
    fields = {
        "descr": np.lib.format.dtype_to_descr(dtype),
        "fortran_order": fortran,
        "shape": shape,
    }
    out = io.BytesIO()
    try:
        np.lib.format.write_array_header_1_0(out, fields)
    except ValueError:  # pragma: no cover - a header over 64 KiB (thousands of dimensions)
        np.lib.format.write_array_header_2_0(out, fields)
    return out.getvalue()


def _split(raw: bytes) -> tuple[bytes, bytes]:
    """A header's magic string (with the version) and its text without NumPy's padding."""
    magic = raw[: np.lib.format.MAGIC_LEN]
    width = _LENGTH_BYTES[(magic[-2], magic[-1])]
    return magic, raw[len(magic) + width :].rstrip(b" \n")


@functools.lru_cache(maxsize=256)
def _around_rows(
    dtype: np.dtype[Any], trailing: tuple[int, ...], fortran: bool
) -> tuple[bytes, bytes, bytes]:
    """NumPy's header of shape ``(0, *trailing)``, cut where the row count goes.

    The magic string, the text before the row count and the text after it. ``'shape'`` is the
    last key NumPy writes (it sorts them), so its last mention is the shape's.
    """
    magic, text = _split(_numpy_header(dtype, (0, *trailing), fortran))
    at = text.rindex(b"'shape': (0") + len(b"'shape': (")
    return magic, text[:at], text[at + 1 :]


def room(dtype: np.dtype[Any], ndim: int) -> int:
    """A header size that the header of every shape of ``ndim`` dimensions of ``dtype`` fits.

    With 16 bytes to spare (for a dtype widened while rows arrive, whose description may be
    longer), a whole number of NumPy's 64-byte alignment, as NumPy pads its headers.

    Examples:
        >>> room(np.dtype("<f4"), 2)
        128
    """
    _, text = _split(header(dtype, (_LARGEST,) * ndim))
    align = np.lib.format.ARRAY_ALIGN
    return -(-(np.lib.format.MAGIC_LEN + 2 + len(text) + 1 + _SPARE) // align) * align


def grows_in(dtype: np.dtype[Any], ndim: int, size: int) -> bool:
    """Whether a header of ``size`` bytes holds every shape of ``ndim`` dimensions of ``dtype``.

    True for the headers [`room`][tonumpy._format._npyheader.room] sizes (a file that grows).

    Examples:
        >>> grows_in(np.dtype("<f4"), 2, room(np.dtype("<f4"), 2)), grows_in(np.dtype("<f4"), 2, 64)
        (True, False)
    """
    try:
        header(dtype, (_LARGEST,) * ndim, size=size)
    except ValueError:
        return False
    return True


def write_header(file: Any, dtype: np.dtype[Any], shape: tuple[int, ...], fortran: bool) -> None:
    """Write the ``.npy`` header of an array of ``shape`` and ``dtype`` to ``file``."""
    file.write(header(dtype, shape, fortran))


def read_header(f: BinaryIO, source: str) -> NpyHeader:
    """Read and check a ``.npy`` header from ``f`` (positioned at its start).

    At most ``MAX_HEADER`` bytes of text are read, whatever the header declares.

    Raises:
        FileFormatError: Not a ``.npy`` header, a damaged one (a bad shape or dtype included),
            one over ``MAX_HEADER`` bytes, or one whose data would need pickle (an object
            dtype). ``source`` starts the message.
    """
    try:
        version = np.lib.format.read_magic(f)
    except ValueError:
        raise FileFormatError(
            f"{source}: not a .npy array (it does not start with NumPy's header)"
        ) from None
    width = _LENGTH_BYTES.get(version)
    if width is None:
        raise FileFormatError(
            f"{source}: .npy format version {version[0]}.{version[1]} is not one NumPy writes"
        )
    prefix = f.read(width)
    if len(prefix) < width:
        raise FileFormatError(f"{source}: a truncated .npy header")
    length = int.from_bytes(prefix, "little")
    if length > MAX_HEADER:
        raise FileFormatError(
            f"{source}: a .npy header of {length:,} bytes (NumPy writes a few hundred); refused"
        )
    text = f.read(length)
    if len(text) < length:
        raise FileFormatError(f"{source}: a truncated .npy header")
    raw = prefix + text
    parse = _parse if len(raw) <= _REMEMBERED else _parse.__wrapped__
    try:
        shape, fortran, dtype = parse(version, raw)
    except Warning:  # NumPy's warning, made an error by the caller's filters: as np.load
        raise
    except Exception as exc:  # noqa: BLE001 - whatever NumPy's parser makes of damaged text
        raise FileFormatError(f"{source}: a damaged .npy header ({short(str(exc), 80)})") from None
    if not all(type(n) is int and n >= 0 for n in shape):  # type(): a bool is an int
        raise FileFormatError(f"{source}: a .npy header with a bad shape {short(shape)}")
    if dtype.hasobject:
        raise FileFormatError(
            f"{source}: holds Python objects (dtype {short(str(dtype))}), which only pickle can "
            "read; tonumpy never unpickles .npy data: save it as numbers or strings instead"
        )
    return NpyHeader(shape, dtype, fortran, np.lib.format.MAGIC_LEN + width + length)


@functools.lru_cache(maxsize=256)
def _parse(version: tuple[int, int], raw: bytes) -> tuple[tuple[int, ...], bool, np.dtype[Any]]:
    """NumPy's reading of a header (its length field and text): shape, Fortran order, dtype.

    NumPy's own warnings pass through, as ``np.load`` gives them (a header written by Python 2
    warns that it needed extra parsing), once per distinct header. They are not silenced here:
    ``warnings.catch_warnings`` swaps the process-wide filters, so two threads reading at once
    could leave every warning of the program ignored.
    """
    parsed: tuple[tuple[int, ...], bool, np.dtype[Any]]
    parsed = _read_array_header(io.BytesIO(raw), version, max_header_size=MAX_HEADER)
    return parsed
