"""A growing .npy file's header: NumPy's, padded in place, and older files still resumed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tonumpy._combine._storage import GrowingNpy


def _write_old_style(path: Path, array: np.ndarray) -> None:
    """A file as tonumpy wrote it before NumPy made its headers: repr() text, 16 bytes spare."""
    descr = np.lib.format.dtype_to_descr(array.dtype)
    probe = repr({"descr": descr, "fortran_order": False, "shape": (2**63,) * array.ndim})
    size = -(-(len(probe) + 10 + 16) // 64) * 64
    text = repr({"descr": descr, "fortran_order": False, "shape": array.shape})
    body = text.ljust(size - 10 - 1) + "\n"
    magic = b"\x93NUMPY\x01\x00"
    path.write_bytes(magic + len(body).to_bytes(2, "little") + body.encode() + array.tobytes())


@pytest.mark.parametrize("trailing", [(), (3,), (2, 5)])
def test_a_file_written_before_numpy_made_the_header_is_resumed(
    tmp_path: Path, trailing: tuple[int, ...]
) -> None:
    """resume=True adopts a file whose header an older tonumpy wrote, and keeps growing it."""
    path = tmp_path / "a.npy"
    old = np.arange(4 * int(np.prod(trailing)), dtype=np.float32).reshape(4, *trailing)
    _write_old_style(path, old)
    grown = GrowingNpy.adopt(path, 3)  # the log counted 3 rows: the 4th is cut
    more = np.full((2, *trailing), -1, dtype=np.float32)
    grown.append(more, None)
    np.testing.assert_array_equal(np.load(path), np.concatenate([old[:3], more]))


def test_the_header_keeps_its_size_as_rows_and_dtypes_change(tmp_path: Path) -> None:
    """Rows appended and a widened dtype rewrite the header in place, as np.load reads it."""
    path = tmp_path / "a.npy"
    grown = GrowingNpy(path, np.dtype(np.int8), (3,))
    first = np.ones((2, 3), dtype=np.int8)
    grown.append(first, None)
    size = path.stat().st_size - first.nbytes
    grown.relayout((3,), None, np.dtype(np.int64))
    wide = np.full((10**3, 3), 2**40, dtype=np.int64)
    grown.append(wide, None)
    assert path.stat().st_size - first.nbytes * 8 - wide.nbytes == size
    np.testing.assert_array_equal(np.load(path), np.concatenate([first.astype(np.int64), wide]))


def test_a_file_that_is_not_npy_is_not_adopted(tmp_path: Path) -> None:
    """adopt refuses a file with no .npy header (an OSError naming the file)."""
    path = tmp_path / "a.npy"
    path.write_bytes(b"not a header at all" * 4)
    with pytest.raises(OSError, match=r"not a \.npy array"):
        GrowingNpy.adopt(path, 0)
