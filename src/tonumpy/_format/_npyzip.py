"""NumPy files as hostile input: headers checked against the data, archives member by member.

``.npy`` headers are checked against the data they describe; ``.npz`` archives are checked
member by member against the file, and read a header (or a chunk) at a time.

A ``.npy`` header is read by [`tonumpy._format._npyheader.read_header`][] rather than by
``np.load``, and its shape and dtype must then describe exactly the bytes that follow, so that no
array is ever allocated or mapped from a size the file does not hold, and no object (pickled)
data is ever read. An archive's members must be stored or
deflated, lie inside the file without overlapping, and declare no more data than their
compressed bytes can hold (deflate expands at most 1032 times); a member is then read a chunk at
a time, its CRC-32 checked as it ends.
"""

from __future__ import annotations

import itertools
import os
import struct
import weakref
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ..errors import FileFormatError
from ._arrays import CHUNK, LazyArray
from ._fs import open_regular, short
from ._npyheader import NpyHeader, is_npy, read_header

__all__ = ["Archive", "Member", "check_members", "map_npy"]

DEFLATE_RATIO = 1032  # the most a deflate stream expands (258-byte matches in 2-bit codes)
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature ... file name length, extra field length


def _empty(header: NpyHeader) -> np.ndarray:
    return np.empty(header.shape, header.dtype, order="F" if header.fortran else "C")


def map_npy(path: Path, source: str, f: BinaryIO | None = None) -> np.ndarray:
    """A ``.npy`` file, checked, then memory-mapped copy-on-write (the file stays untouched).

    Bytes past the declared data are not read, as ``np.load`` does not read them: they are
    what an ``Accumulator(directory=)`` append that was cut short wrote past the rows its
    header counts.

    Raises:
        FileFormatError: The header declares more data than the file holds.
    """
    with f if f is not None else open_regular(path) as file:
        size = os.fstat(file.fileno()).st_size
        header = read_header(file, source)
        held = size - header.size
        if held < header.nbytes:
            raise FileFormatError(
                f"{source}: declares {header.describe()} but holds {held:,} bytes of data: "
                "truncated or corrupt"
            )
        if header.nbytes == 0:
            return _empty(header)
        mapped = np.memmap(
            file,
            dtype=header.dtype,
            mode="c",
            offset=header.size,
            shape=header.shape,
            order="F" if header.fortran else "C",
        )
        return np.asarray(mapped)


def check_members(
    zf: zipfile.ZipFile, f: BinaryIO, source: str, *, stored_only: bool
) -> dict[str, tuple[zipfile.ZipInfo, int]]:
    """The members of an archive by name, checked against the file, with their data's offsets.

    Every member is stored (or, unless ``stored_only``, deflated) and not encrypted; its data
    lies inside the file, before the central directory, overlapping no other member's; a stored
    member holds exactly its declared size, a deflated one declares no more than 1032 times its
    compressed size. So no member can declare more data than the file can hold.

    Raises:
        FileFormatError: A member breaks one of these rules.
    """
    infos = zf.infolist()
    found: dict[str, tuple[zipfile.ZipInfo, int]] = {}
    spans: list[tuple[int, int, str]] = []
    end_of_data = getattr(zf, "start_dir", None)
    for info in infos:
        name = short(info.filename, 80)
        if info.filename in found:
            raise FileFormatError(f"{source}: holds two members named {name}")
        if info.flag_bits & 0x1:
            raise FileFormatError(f"{source}: member {name} is encrypted")
        if info.compress_type == zipfile.ZIP_STORED:
            if info.compress_size != info.file_size:
                raise FileFormatError(
                    f"{source}: member {name} is stored uncompressed but declares "
                    f"{info.file_size:,} bytes in {info.compress_size:,}: corrupt"
                )
        elif info.compress_type == zipfile.ZIP_DEFLATED and not stored_only:
            if info.file_size > DEFLATE_RATIO * info.compress_size:
                raise FileFormatError(
                    f"{source}: member {name} declares {info.file_size:,} bytes from "
                    f"{info.compress_size:,} compressed, more than deflate can expand to: corrupt "
                    "or a zip bomb; refused"
                )
        else:
            allowed = "stored" if stored_only else "stored or deflated"
            raise FileFormatError(
                f"{source}: member {name} uses compression method {info.compress_type}; "
                f"tonumpy reads {allowed} members only"
            )
        f.seek(info.header_offset)
        local = f.read(_LOCAL_HEADER.size)
        if len(local) < _LOCAL_HEADER.size:
            raise FileFormatError(f"{source}: member {name} lies outside the file: truncated")
        signature, name_length, extra_length = _LOCAL_HEADER.unpack(local)
        if signature != b"PK\x03\x04":
            raise FileFormatError(f"{source}: member {name} has no local header: corrupt")
        start = info.header_offset + _LOCAL_HEADER.size + name_length + extra_length
        end = start + info.compress_size
        if end_of_data is not None and end > end_of_data:
            raise FileFormatError(f"{source}: member {name} runs past its data: corrupt")
        spans.append((info.header_offset, end, name))
        found[info.filename] = (info, start)
    spans.sort()
    for (_, end, first), (start, _, second) in itertools.pairwise(spans):
        if start < end:
            raise FileFormatError(
                f"{source}: members {first} and {second} overlap (the shape of a zip bomb); refused"
            )
    return found


class Archive:
    """An opened ``.npz``, its members checked; it stays open while a member refers to it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        file = open_regular(path)
        self._closer = weakref.finalize(self, file.close)
        try:
            self.zip = zipfile.ZipFile(file)
        except (zipfile.BadZipFile, EOFError, OSError, ValueError, struct.error, UnicodeError):
            file.seek(0)
            hint = " (it is a .npy file: name it .npy)" if is_npy(file.read(8)) else ""
            self.close()
            raise FileFormatError(f"{path}: not a .npz file (not a zip archive){hint}") from None
        try:
            members = check_members(self.zip, file, str(path), stored_only=False)
            self.infos = [info for info, _ in members.values()]
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Close the file (members can no longer be read)."""
        self._closer()

    def member(self, info: zipfile.ZipInfo) -> Member:
        """The member ``info``, its header read and checked against its declared size."""
        source = f"{self.path}: member {short(info.filename, 80)}"
        try:
            with self.zip.open(info) as stream:
                header = read_header(stream, source)  # type: ignore[arg-type]
        except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
            raise FileFormatError(f"{source}: corrupt ({exc})") from None
        if info.file_size - header.size != header.nbytes:
            raise FileFormatError(
                f"{source}: declares {header.describe()} but holds "
                f"{info.file_size - header.size:,} bytes of data: corrupt"
            )
        return Member(self, info, header)


class Member(LazyArray):
    """A ``.npy`` member of an archive, not yet read: its header, and ways to read it."""

    def __init__(
        self, archive: Archive, info: zipfile.ZipInfo, header: NpyHeader, bits: str | None = None
    ) -> None:
        self.archive, self.info, self.header = archive, info, header
        self.shape, self.dtype, self.fortran = header.shape, header.dtype, header.fortran
        self.bits = bits

    def __repr__(self) -> str:
        return f"<member {short(self.info.filename, 80)}: {self.header.describe()}>"

    def with_bits(self, bits: str | None) -> Member:
        """The same member, read as the bits of an ``ml_dtypes`` type."""
        return self if bits == self.bits else Member(self.archive, self.info, self.header, bits)

    def chunks(self, size: int = CHUNK) -> Iterator[bytes]:
        """The member's data, a whole number of items at a time; its CRC-32 checked at the end.

        Raises:
            FileFormatError: The member is shorter than declared or its CRC-32 does not match.
        """
        source = f"{self.archive.path}: member {short(self.info.filename, 80)}"
        step = max(size // max(self.dtype.itemsize, 1), 1) * max(self.dtype.itemsize, 1)
        left = self.header.nbytes
        try:
            with self.archive.zip.open(self.info) as stream:
                stream.read(self.header.size)
                while left:
                    chunk = stream.read(min(step, left))
                    if not chunk:
                        raise FileFormatError(f"{source}: truncated")
                    left -= len(chunk)
                    yield chunk
                if stream.read(1):  # pragma: no cover - sizes were checked; this checks the CRC
                    raise FileFormatError(f"{source}: holds more data than it declares")
        except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
            raise FileFormatError(f"{source}: corrupt ({exc})") from None

    def array(self) -> np.ndarray:
        """The member's data, read into memory (exactly its declared size)."""
        if self.header.nbytes == 0:
            return _empty(self.header)
        buffer = bytearray(self.header.nbytes)
        view, at = memoryview(buffer), 0
        for chunk in self.chunks():
            view[at : at + len(chunk)] = chunk
            at += len(chunk)
        flat = np.frombuffer(buffer, dtype=self.dtype)
        return flat.reshape(self.shape, order="F" if self.fortran else "C")
