"""The in-memory storage of ``Accumulator`` (``tonumpy._combine._storage.Rows``): one buffer per
leaf, written once, re-laid out in place when a longer batch comes, handed out as the result.

``map_min`` (the size from which a leaf's buffer is a memory map) is lowered so that small
tests take the memory-mapped path that large leaves take; every result is compared with
``concat`` of the same batches.
"""

from __future__ import annotations

import gc
import mmap
import os
import weakref
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import torch

from tonumpy import Accumulator, concat
from tonumpy._combine import _storage
from tonumpy._combine._columns import Column
from tonumpy._combine._storage import GrowingNpy, Rows

PAD = -100


@pytest.fixture(params=[0, 1 << 40], ids=["mapped", "small"])
def map_min(request: pytest.FixtureRequest) -> int:
    """Every buffer a memory map (as large leaves are), or every buffer a NumPy array."""
    return int(request.param)


def owner(arr: np.ndarray) -> Any:
    """The object at the end of ``arr``'s base chain (what keeps its memory alive)."""
    base: Any = arr
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    return base.obj if isinstance(base, memoryview) else base


def held_bytes(arr: np.ndarray) -> int:
    """The bytes that keeping ``arr`` alive keeps alive."""
    base = owner(arr)
    return len(base) if isinstance(base, mmap.mmap) else base.nbytes


def ragged(lengths: list[int], seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        {
            "logits": torch.randn(3, n, 5, generator=gen),
            "labels": torch.randint(0, 9, (3, n), generator=gen),
            "loss": torch.rand((), generator=gen),
        }
        for n in lengths
    ]


def accumulate(batches: list[Any], map_min: int | None = None, **options: Any) -> Accumulator:
    """An ``Accumulator(**options)``, its buffers maps from ``map_min`` bytes, fed ``batches``."""
    acc = Accumulator(**options)
    acc._map_min = map_min
    for batch in batches:
        acc.append(batch)
    return acc


def assert_equal_trees(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert value.dtype == b[key].dtype, key
        np.testing.assert_array_equal(value, b[key], err_msg=key)


@pytest.mark.parametrize(
    "lengths",
    [[4, 4, 4], [2, 7, 3, 9, 1], [1, 2, 3, 4, 5, 6, 7, 8], [9, 8, 7, 1]],
    ids=["equal", "mixed", "growing", "shrinking"],
)
def test_result_equals_concat(lengths: list[int], map_min: int) -> None:
    """Rows re-laid out in place as longer batches come equal the padded concatenation."""
    batches = ragged(lengths)
    out = accumulate(batches, map_min=map_min, pad_value=PAD).result()
    assert_equal_trees(out, concat(batches, pad_value=PAD))
    assert all(a.flags.c_contiguous and a.flags.writeable for a in out.values())


def store(rows: Rows, chunks: list[np.ndarray], pad_value: int) -> Column:
    """Write ``chunks`` into ``rows`` as ``Accumulator`` does: the column policy decides each
    chunk's dtype and padded shape; the column, to read the result with."""
    column = Column(("x",), "tree['x']", axis=0, pad_value=pad_value)
    for i, chunk in enumerate(chunks):
        column.commit(column.check("array", chunk.dtype, chunk.shape, f"batch {i}"))
        assert column.dtype is not None
        assert column.trailing is not None
        fill = column.fill if column.fill is not None else column.pad_value()
        rows.append(chunk, column.dtype, column.trailing, fill)
    return column


def test_geometric_growth_is_trimmed(map_min: int) -> None:
    """Every batch longer than the last: widths grow by half (no slack), the result is exact."""
    chunks = [np.full((2, n, 3), n, dtype=np.int32) for n in range(1, 40)]
    rows = Rows(rewrite_slack=0, map_min=map_min)
    column = store(rows, chunks, pad_value=-1)
    assert rows.trailing[0] > 39
    out = rows.result(column, column.rows)
    np.testing.assert_array_equal(out, concat(chunks, pad_value=-1))


@pytest.mark.parametrize("slack", [0, 1 << 20], ids=["no-slack", "1MiB-slack"])
def test_relayouts_stay_linear(slack: int, map_min: int) -> None:
    """Every batch longer than the last: the bytes moved by re-layouts stay within a constant
    times the bytes appended (exact widths alone would move O(batches^2) bytes)."""
    rows = Rows(rewrite_slack=slack, map_min=map_min)
    column = store(rows, [np.ones((4, n, 8), np.int32) for n in range(1, 400)], pad_value=0)
    assert rows._rewritten <= 4 * rows._appended + slack
    assert rows.result(column, column.rows).shape == (4 * 399, 399, 8)


def test_promoted_dtypes_are_widened_in_place(map_min: int) -> None:
    """int8, then int16, then int32 rows (and a wider batch at the same time)."""
    batches = [
        {"x": np.full((2, 3), -5, np.int8)},
        {"x": np.full((1, 4), 300, np.int16)},
        {"x": np.full((3, 2), 70_000, np.int32)},
    ]
    out = accumulate(batches, map_min=map_min, pad_value=-1).result()
    want = concat(batches, pad_value=-1)
    assert out["x"].dtype == np.int32
    np.testing.assert_array_equal(out["x"], want["x"])


def test_ml_dtypes_rows(map_min: int) -> None:
    """bfloat16 rows (ml_dtypes=True) are written and handed out bit-exact."""
    batches = [{"h": torch.randn(2, n).bfloat16()} for n in (3, 5)]
    out = accumulate(batches, map_min=map_min, pad_value=0.0, ml_dtypes=True).result()
    assert out["h"].dtype == np.dtype(ml_dtypes.bfloat16)
    want = concat(batches, pad_value=0.0, ml_dtypes=True)["h"]
    np.testing.assert_array_equal(out["h"].view(np.uint16), want.view(np.uint16))


def test_mapped_result_holds_exactly_its_bytes() -> None:
    """A result handed out without a copy keeps exactly its own bytes alive (no spare
    capacity), is writable, and outlives the accumulator."""
    batches = ragged([3, 6, 4, 2])
    acc = accumulate(batches, map_min=0, pad_value=PAD)
    out = acc.result()
    for key in ("logits", "labels"):
        assert isinstance(owner(out[key]), mmap.mmap), key
        assert held_bytes(out[key]) == out[key].nbytes, key
    want = concat(batches, pad_value=PAD)
    ref = weakref.ref(acc)
    del acc
    gc.collect()
    assert ref() is None
    assert_equal_trees(out, want)
    out["logits"][:] = 1.0  # writable, and its own
    assert (out["logits"] == 1.0).all()


def test_map_min_decides_where_rows_live() -> None:
    """By default a leaf's rows stay a NumPy array below _MAP_MIN bytes and are a memory map of
    their own from there on; ``map_min`` moves that line."""
    small = [{"x": np.ones((4, 8), np.float32)}]
    large = [{"x": np.ones((512, 1024), np.float32)}]
    assert small[0]["x"].nbytes < _storage._MAP_MIN <= large[0]["x"].nbytes
    assert isinstance(owner(accumulate(small).result()["x"]), np.ndarray)
    assert isinstance(owner(accumulate(large).result()["x"]), mmap.mmap)
    assert isinstance(owner(accumulate(small, map_min=0).result()["x"]), mmap.mmap)
    assert isinstance(owner(accumulate(large, map_min=1 << 40).result()["x"]), np.ndarray)


def test_result_is_independent_of_later_appends(map_min: int) -> None:
    """Appending after result() (even a wider batch) leaves the returned arrays as they were;
    the next result() has every row; result() twice with nothing new is the same object."""
    first, later = ragged([3, 4], seed=1), ragged([7, 2], seed=2)
    acc = accumulate(first, map_min=map_min, pad_value=PAD)
    out1 = acc.result()
    assert acc.result()["logits"] is out1["logits"]
    kept = {k: v.copy() for k, v in out1.items()}
    for batch in later:
        acc.append(batch)
    out2 = acc.result()
    assert_equal_trees(out1, kept)
    assert_equal_trees(out2, concat(first + later, pad_value=PAD))
    assert not np.shares_memory(out1["logits"], out2["logits"])
    out2["logits"][:] = 0  # the accumulator's storage now: later results copy it
    assert acc.result()["logits"] is out2["logits"]


def test_num_items_then_everything(map_min: int) -> None:
    """result(num_items=N) hands out the first N rows; the rest stay for a full result()."""
    batches = ragged([3, 5, 2, 4])
    acc = accumulate(batches, map_min=map_min, pad_value=PAD)
    want = concat(batches, pad_value=PAD)
    part = acc.result(num_items=7)
    np.testing.assert_array_equal(part["logits"], want["logits"][:7])
    assert held_bytes(part["logits"]) == part["logits"].nbytes
    assert_equal_trees(acc.result(), want)
    np.testing.assert_array_equal(part["labels"], want["labels"][:7])  # untouched


def test_other_axis_and_object_leaves(map_min: int) -> None:
    """axis=1 (copied into the final layout) and object arrays (kept as arrays of their own)."""
    batches = [np.arange(6, dtype=np.int64).reshape(2, 3) + i for i in range(3)]
    acc = accumulate(batches, map_min=map_min, axis=1)
    np.testing.assert_array_equal(acc.result(), np.concatenate(batches, axis=1))
    objects = [np.array([{"a": i}, None], dtype=object) for i in range(3)]
    out = accumulate(objects, map_min=map_min).result()
    assert out.dtype == object
    assert list(out) == [x for batch in objects for x in batch]


def test_no_view_blocks_growth() -> None:
    """Many batches into a memory map that grows (mremap) while nothing is left viewing it."""
    batches = [{"x": np.full((5, 3 + i % 4), i, np.float32)} for i in range(200)]
    out = accumulate(batches, map_min=0, pad_value=-1.0).result()
    np.testing.assert_array_equal(out["x"], concat(batches, pad_value=-1.0)["x"])


# ------------------------------------------------------------------ directory= (pwritev)


@pytest.mark.parametrize("short", [False, True], ids=["whole", "short-writes"])
def test_directory_rows_padded_without_a_copy(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, short: bool
) -> None:
    """(B, L, V) batches shorter than the file along L are written row by row with their
    padding (pwritev); the file and the result equal the padded concatenation, also when the
    system writes fewer bytes than asked."""
    if not hasattr(os, "pwritev"):
        pytest.skip("no os.pwritev on this platform")
    calls: list[int] = []
    original = os.pwritev

    def pwritev(fd: int, buffers: list[Any], offset: int) -> int:
        calls.append(len(buffers))
        if short:  # at most 7 bytes of the first buffer, or the first two buffers whole
            first = len(buffers[0])
            if first > 7:
                return int(original(fd, [buffers[0][:7]], offset))
            return int(original(fd, buffers[:2], offset))
        return int(original(fd, buffers, offset))

    monkeypatch.setattr(os, "pwritev", pwritev)
    batches = ragged([6, 2, 5, 6, 1])
    acc = accumulate(batches, pad_value=PAD, directory=tmp_path)
    out = acc.result()
    want = concat(batches, pad_value=PAD)
    assert calls  # the rows went through pwritev
    for key in ("logits", "labels"):
        np.testing.assert_array_equal(out[key], want[key])
        np.testing.assert_array_equal(np.load(tmp_path / f"{key}.npy", mmap_mode="r"), want[key])


@pytest.mark.parametrize(
    ("trailing", "dtype"),
    [((4, 1001), np.float32), ((3, 1003), np.float32), ((3, 1001), np.float64), ((2, 999), None)],
    ids=["first-axis", "inner-axis", "promoted", "cropped"],
)
def test_directory_relayout_over_several_blocks(
    tmp_path: Any, trailing: tuple[int, ...], dtype: Any
) -> None:
    """A file larger than a re-layout block is re-laid out block by block (each read through a
    map of its own, at offsets that are not page-aligned): every row keeps its values, padded
    or cropped, and the file stays one ``np.load`` reads."""
    rows = np.arange(3000 * 3 * 1001, dtype=np.float32).reshape(3000, 3, 1001)
    assert rows.nbytes > 2 * _storage._BLOCK_BYTES
    grown = GrowingNpy(tmp_path / "x.npy", np.dtype(np.float32), (3, 1001))
    grown.append(rows, None)
    new_dtype = np.dtype(np.float32 if dtype is None else dtype)
    fill = np.array(-1, new_dtype)
    grown.relayout(trailing, fill, None if dtype is None else new_dtype)
    want = np.full((3000, *trailing), -1, new_dtype)
    kept = (slice(None), *(slice(0, min(a, b)) for a, b in zip((3, 1001), trailing, strict=True)))
    want[kept] = rows[kept]
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy", mmap_mode="r"), want)
    np.testing.assert_array_equal(grown.open(3000), want)
    assert not list(tmp_path.glob("*.tmp"))
