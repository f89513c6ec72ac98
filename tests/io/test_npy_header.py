"""The one home of the .npy header (``tonumpy._format._npyheader``): NumPy's text, our bounds.

Every writer and reader of ``.npy`` data makes and reads headers there: written by
``np.lib.format``, padded in place for a file that grows, read with the length checked before
the text, and refused where NumPy would let a damaged shape or a pickle through.
"""

from __future__ import annotations

import functools
import io
import warnings
from typing import Any

import numpy as np
import pytest

import tonumpy
from tonumpy._format import _npyheader

DTYPES = ["<f4", "|u1", ">i8", "<U10", "<M8[ns]", "|b1"]


class _Recording(io.BytesIO):
    """A file that records how many bytes each read asked for."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.asked: list[int] = []

    def read(self, size: int | None = -1, /) -> bytes:
        self.asked.append(-1 if size is None else size)
        return super().read(size)


@pytest.mark.parametrize("descr", DTYPES)
def test_a_header_is_the_one_numpy_writes(descr: str) -> None:
    """Unpadded, the header is byte for byte what np.save writes before the data."""
    array = np.zeros((2, 3), dtype=descr)
    saved = io.BytesIO()
    np.save(saved, array)
    made = _npyheader.header(array.dtype, array.shape)
    assert saved.getvalue()[: len(made)] == made
    assert len(made) % 64 == 0


@pytest.mark.parametrize("descr", DTYPES)
@pytest.mark.parametrize("trailing", [(), (3,), (7, 1000)])
def test_a_padded_header_holds_any_row_count_and_numpy_reads_it(
    descr: str, trailing: tuple[int, ...]
) -> None:
    """A header padded to room() keeps its size for every row count; np.load reads the file."""
    dtype = np.dtype(descr)
    size = _npyheader.room(dtype, 1 + len(trailing))
    assert size % 64 == 0
    for rows in (0, 1, 12345, 2**63 - 1):
        made = _npyheader.header(dtype, (rows, *trailing), size=size)
        assert len(made) == size
        got = _npyheader.read_header(io.BytesIO(made), "h.npy")
        assert (got.shape, got.dtype, got.fortran, got.size) == (
            (rows, *trailing),
            dtype,
            False,
            size,
        )
    array = np.arange(2 * int(np.prod(trailing)), dtype="u1").astype(dtype).reshape(2, *trailing)
    blob = _npyheader.header(dtype, array.shape, size=size) + array.tobytes()
    np.testing.assert_array_equal(np.load(io.BytesIO(blob)), array)


def test_a_header_that_does_not_fit_its_size_is_an_error() -> None:
    """header(size=) refuses a size smaller than the header's text, instead of overrunning."""
    with pytest.raises(ValueError, match="needs more than 64 bytes"):
        _npyheader.header(np.dtype("<f4"), (2**62, 2**62), size=64)


def test_a_declared_length_over_the_limit_is_refused_before_it_is_read() -> None:
    """A header declaring 4 GiB of text is refused without asking the file for it."""
    blob = b"\x93NUMPY\x02\x00" + (2**32 - 1).to_bytes(4, "little") + b"{" * 100
    f = _Recording(blob)
    with pytest.raises(tonumpy.FileFormatError, match="header of 4,294,967,295 bytes"):
        _npyheader.read_header(f, "h.npy")
    assert max(f.asked) <= _npyheader.MAX_HEADER


def test_a_utf8_header_is_read() -> None:
    """A version 3.0 header (UTF-8 field names, as np.save writes them) is read."""
    array = np.zeros(2, dtype=[("ж", "<f4")])
    saved = io.BytesIO()
    with pytest.warns(UserWarning, match="format 3.0"):
        np.save(saved, array)
    assert saved.getvalue()[6:8] == b"\x03\x00"
    header = _npyheader.read_header(io.BytesIO(saved.getvalue()), "h.npy")
    assert (header.shape, header.dtype) == ((2,), array.dtype)


@pytest.mark.parametrize(
    ("shape", "message"), [("(-1,)", "bad shape"), ("(True, 2)", "bad shape"), ("[2]", "damaged")]
)
def test_shapes_numpy_lets_through_are_refused(shape: str, message: str) -> None:
    """Dimensions that are negative or bools (which NumPy's parser accepts) are refused."""
    text = f"{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}\n".encode()
    blob = b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text
    with pytest.raises(tonumpy.FileFormatError, match=message):
        _npyheader.read_header(io.BytesIO(blob), "h.npy")


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (b"\x93NUMP", "not a .npy array"),
        (b"PK\x03\x04" + bytes(20), "not a .npy array"),
        (b"\x93NUMPY\x04\x00\x10\x00", "version 4.0"),
        (b"\x93NUMPY\x01\x01\x10\x00", "version 1.1"),
        (b"\x93NUMPY\x01\x00\x10", "truncated"),
        (b"\x93NUMPY\x01\x00\x10\x00{'descr'", "truncated"),
        (b"\x93NUMPY\x01\x00\x10\x00" + b"(" * 16, "damaged"),
    ],
)
def test_damaged_headers_are_refused(blob: bytes, message: str) -> None:
    """Each kind of damage is a FileFormatError naming it."""
    with pytest.raises(tonumpy.FileFormatError, match=message):
        _npyheader.read_header(io.BytesIO(blob), "h.npy")


def test_is_npy_knows_numpy_s_magic_string() -> None:
    """is_npy tells a .npy file by its first bytes, as the readers sniff it."""
    assert _npyheader.is_npy(_npyheader.header(np.dtype("<f4"), (1,)))
    assert not _npyheader.is_npy(b"\x93NUMP")
    assert not _npyheader.is_npy(b"PAR1")


def test_an_object_dtype_is_refused_after_parsing() -> None:
    """A header whose data would be a pickle is refused, naming the dtype."""
    text = b"{'descr': '|O', 'fortran_order': False, 'shape': (3,), }\n"
    blob = b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text
    with pytest.raises(tonumpy.FileFormatError, match="only pickle can read"):
        _npyheader.read_header(io.BytesIO(blob), "h.npy")


def test_write_header_writes_the_header() -> None:
    """write_header writes what header() makes, for the writers of whole arrays."""
    out: Any = io.BytesIO()
    _npyheader.write_header(out, np.dtype(">i8"), (4, 5), True)
    assert out.getvalue() == _npyheader.header(np.dtype(">i8"), (4, 5), True)
    assert _npyheader.read_header(io.BytesIO(out.getvalue()), "h.npy").fortran


def _python2_file(shape: str, values: np.ndarray) -> bytes:
    """A version 1.0 ``.npy`` as Python 2's NumPy wrote it: long integers (``3L``) in the shape."""
    text = f"{{'descr': '<i8', 'fortran_order': False, 'shape': {shape}, }}".encode()
    text += b" " * (-(10 + len(text) + 1) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text + values.tobytes()


def test_a_python2_header_is_read_and_warns_as_np_load_does(tmp_path: Any) -> None:
    """A header written by Python 2 gives np.load's values and np.load's own warning."""
    _npyheader._parse.cache_clear()  # a header parsed before (cached) would not warn again
    blob = _python2_file("(3L, 7L)", np.arange(21, dtype="<i8"))
    path = tmp_path / "old.npy"
    path.write_bytes(blob)
    with pytest.warns(UserWarning, match="created on Python 2") as theirs:
        want = np.load(io.BytesIO(blob))
    with pytest.warns(UserWarning, match="created on Python 2") as ours:
        got = tonumpy.load(path)
    np.testing.assert_array_equal(got, want)
    assert got.shape == (3, 7)
    assert [str(w.message) for w in ours] == [str(w.message) for w in theirs]


def test_reading_headers_from_threads_leaves_the_warning_filters_alone() -> None:
    """Headers read by several threads at once never change the process's warning filters."""
    from _helpers.threads import run_beside

    before = list(warnings.filters)
    seen: list[Any] = []

    def watch() -> None:
        if warnings.filters != before:
            seen.append(list(warnings.filters[:1]))

    def read(start: int) -> None:
        for n in range(start, start + 300):  # distinct shapes: each one is parsed, not cached
            blob = _npyheader.header(np.dtype("<f4"), (n, 5))
            assert _npyheader.read_header(io.BytesIO(blob), "h.npy").shape == (n, 5)

    run_beside(watch, [functools.partial(read, 10_000 * k) for k in range(1, 4)])
    assert warnings.filters == before
    assert not seen, seen[:3]
