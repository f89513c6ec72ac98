"""Tests of dataset indices (``append(index=)``), rank shards merged on read, and ``resume=True``.

The gloo runs (1-4 ranks: ``gather(acc)`` with indices, shards written with no collective) are
in ``tests/test_shards_distributed.py``; these run in one process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils.data import DistributedSampler

import tonumpy
from _helpers import hostile as _hostile
from _helpers.engine import HostEngine, accumulating
from _helpers.trees import assert_same_tree
from tonumpy import Accumulator, ConversionError, FileFormatError, OptionError, gather
from tonumpy._combine._indices import _missing, resolve
from tonumpy._combine._storage import GrowingNpy
from tonumpy.cli import main

# ---------------------------------------------------------------------------- the padding rule


def _sampler_indices(n: int, world: int, shuffle: bool) -> list[np.ndarray]:
    return [
        np.array(list(DistributedSampler(range(n), world, r, shuffle=shuffle, seed=3)))
        for r in range(world)
    ]


def _placed(indices: list[np.ndarray], maps: list[np.ndarray]) -> np.ndarray:
    """The dataset index of each row of the result, as ``maps`` places the rows."""
    total = sum(int((m >= 0).sum()) for m in maps)
    out = np.full(total, -1)
    for idx, m in zip(indices, maps, strict=True):
        out[m[m >= 0]] = idx[m >= 0]
    return out


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("shuffle", [False, True], ids=["ordered", "shuffled"])
def test_distributed_sampler_padding_is_dropped(world: int, shuffle: bool) -> None:
    """DistributedSampler's repeats (every rank as long) are dropped; rows in dataset order."""
    indices = _sampler_indices(10, world, shuffle)
    assert sum(i.size for i in indices) > 10 or world == 2  # 10 items: padded for 3 and 4
    maps = resolve(indices, num_items=10, names=["a"] * world, caller="t")
    assert_same_tree(_placed(indices, maps), np.arange(10))


def test_accelerate_even_batches_padding_is_dropped() -> None:
    """Whole batches repeated from the start at the end of ranks (even_batches) are padding."""
    # 7 items, 2 ranks, batches of 2: rank 0 [0 1][4 5], rank 1 [2 3][6 | 0] (0 repeated)
    indices = [np.array([0, 1, 4, 5]), np.array([2, 3, 6, 0])]
    maps = resolve(indices, num_items=7, names=["r0", "r1"], caller="t")
    assert maps[1].tolist() == [2, 3, 6, -1]
    # a rank entirely made of padding (a dataset smaller than the ranks' batches)
    indices = [np.array([0, 1]), np.array([0, 1])]
    assert_same_tree(
        _placed(indices, resolve(indices, num_items=2, names="ab", caller="t")), np.arange(2)
    )


def test_duplicate_in_the_body_is_reported() -> None:
    """A repeat that is not at the end of its rank is a duplicate, with or without num_items."""
    indices = [np.array([0, 2, 4, 6]), np.array([1, 2, 5, 7])]
    with pytest.raises(ConversionError, match=r"1 duplicated \(2; index 2 is held by r0 and r1\)"):
        resolve(indices, num_items=None, names=["r0", "r1"], caller="t")


def test_repeat_with_uneven_ranks_is_a_duplicate() -> None:
    """Ranks of different lengths were not padded: a repeat at a rank's end is a duplicate."""
    indices = [np.array([0, 2, 4]), np.array([1, 3, 0, 5])]
    with pytest.raises(ConversionError, match="1 duplicated"):
        resolve(indices, num_items=None, names=["r0", "r1"], caller="t")


def test_one_process_is_never_padded() -> None:
    """In a world of one, a repeated last row is a duplicate."""
    with pytest.raises(ConversionError, match="1 duplicated"):
        resolve([np.array([0, 1, 2, 1])], num_items=None, names=["r0"], caller="t")


def test_gap_and_padding_are_listed() -> None:
    """num_items names the missing indices, and what was taken as padding."""
    indices = [np.array([0, 2, 4, 6, 8]), np.array([1, 3, 5, 7, 7])]
    with pytest.raises(ConversionError) as info:
        resolve(indices, num_items=10, names=["r0", "r1"], caller="t")
    message = str(info.value)
    assert "1 missing (9)" in message
    assert "1 repeated row at the end of ranks" in message
    assert "padding (of 7)" in message


def test_long_lists_are_cut() -> None:
    """The first few indices of each problem, and how many more."""
    with pytest.raises(
        ConversionError,
        match=r"30 missing \(0, 1, 2, 3, 4, 5, 6, 7, \.\.\. \(22 "
        r"more\)\); 2 outside range\(40\) \(40, 41\)",
    ):
        resolve([np.arange(30, 42)], num_items=40, names=["r0"], caller="t")


@given(st.integers(0, 60), st.sets(st.integers(0, 59)))
def test_missing_indices_are_listed_as_setdiff_would(num_items: int, present: set[int]) -> None:
    """The first missing indices and their count, computed without range(num_items)."""
    held = np.array(sorted(i for i in present if i < num_items), dtype=np.int64)
    expected = np.setdiff1d(np.arange(num_items), held)
    first, count = _missing(held, num_items)
    assert count == expected.size
    assert_same_tree(first, expected[:8].astype(np.int64))


def test_a_huge_recorded_num_items_is_not_allocated(tmp_path: Path) -> None:
    """A shard recording num_items=10**15 is refused in one line, in bounded memory."""
    acc = Accumulator(directory=tmp_path / "set", shard=(0, 1))
    acc.append(_out(np.array([0, 1])), index=[0, 1])
    acc.close(num_items=10**15)
    (case,) = _hostile.run_corpus([["load", str(tmp_path / "set")]], tmp_path / "run")
    assert case["rc"] == 2, case
    assert (
        "999999999999998 missing (2, 3, 4, 5, 6, 7, 8, 9, ... (999999999999990 more))"
        in (case["stderr"])
    )
    assert case["grew_mib"] < 200, case


# ---------------------------------------------------------------------------- append(index=)


def _out(items: np.ndarray) -> dict[str, Any]:
    """A model's outputs for dataset items ``items``: a per-sample leaf and a per-batch loss."""
    x = torch.as_tensor(items, dtype=torch.float32)
    return {"logits": torch.stack([x, -x], 1), "loss": x.sum()}


def test_index_kept_per_row() -> None:
    """acc.indices() lists each row's index in append order; result() keeps that order."""
    acc = Accumulator()
    acc.append(_out(np.array([3, 1])), index=torch.tensor([3, 1]))
    acc.append(_out(np.array([0, 2])), index=np.array([0, 2], dtype=np.uint8))
    assert_same_tree(acc.indices(), np.array([3, 1, 0, 2]))
    assert_same_tree(acc.result()["logits"][:, 0], np.array([3.0, 1, 0, 2], dtype=np.float32))
    assert_same_tree(gather(acc, num_items=4)["logits"][:, 0], np.arange(4, dtype=np.float32))
    assert Accumulator().indices() is None


@pytest.mark.parametrize(
    ("index", "match"),
    [
        ([0, 1, 2], "3 indices for a batch of 2 rows"),
        ([[0, 1]], "expected a 1-d sequence of ints"),
        ([0.0, 1.0], "expected a 1-d sequence of ints"),
        ([0, -1], "ints >= 0"),
        ("ab", "expected a 1-d sequence of ints"),
    ],
)
def test_bad_index(index: Any, match: str) -> None:
    """A malformed index is refused, and the batch is not added."""
    acc = Accumulator()
    with pytest.raises(ConversionError, match=match):
        acc.append(_out(np.array([0, 1])), index=index)
    assert len(acc) == 0


def test_index_with_every_batch_or_none() -> None:
    """Mixing batches with and without index= is refused, naming the batch."""
    acc = Accumulator()
    acc.append(_out(np.array([0])), index=[0])
    with pytest.raises(ConversionError, match="batch 1 comes without index="):
        acc.append(_out(np.array([1])))
    acc = Accumulator()
    acc.append(_out(np.array([0])))
    with pytest.raises(ConversionError, match="batch 1 comes with index="):
        acc.append(_out(np.array([1])), index=[1])


def test_index_needs_one_row_per_item() -> None:
    """Leaves with other numbers of rows cannot be indexed (they are not per-sample)."""
    acc = Accumulator()
    with pytest.raises(ConversionError, match=r"tree\['a'\] has 2 rows but tree\['b'\] has 3"):
        acc.append({"a": torch.ones(2), "b": torch.ones(3)}, index=[0, 1])


def test_index_travels_with_a_batch_in_flight(tmp_path: Path, host_engine: HostEngine) -> None:
    """A batch whose copies are in flight (the device engine) keeps its indices with it."""
    acc = accumulating(Accumulator(directory=tmp_path, shard=(0, 1)), host_engine)
    for items in ([2, 0], [1, 3]):
        acc.append(_out(np.array(items)), index=torch.tensor(items))
    assert_same_tree(np.asarray(acc.indices()), np.array([2, 0, 1, 3]))
    acc.close(num_items=4)
    assert_same_tree(tonumpy.load(tmp_path)["logits"][:, 0], np.arange(4, dtype=np.float32))


@pytest.mark.cuda
def test_cuda_outputs_and_index(tmp_path: Path) -> None:
    """CUDA outputs with a CUDA index tensor: rows land in dataset order."""
    acc = Accumulator(directory=tmp_path, shard=(0, 1))
    for items in ([2, 0], [1, 3]):
        out = {k: v.cuda() for k, v in _out(np.array(items)).items()}
        acc.append(out, index=torch.tensor(items, device="cuda"))
    acc.close(num_items=4)
    assert_same_tree(tonumpy.load(tmp_path)["logits"][:, 0], np.arange(4, dtype=np.float32))
    assert_same_tree(gather(acc, num_items=4)["logits"][:, 0], np.arange(4, dtype=np.float32))


def test_gather_duplicate_and_gap_in_one_process() -> None:
    """gather(acc, num_items=) reports the missing and the duplicated indices."""
    acc = Accumulator()
    for items in ([0, 1, 1], [2, 4]):
        acc.append(_out(np.array(items)), index=items)
    with pytest.raises(ConversionError) as info:
        gather(acc, num_items=5)
    assert "1 duplicated (1; index 1 is held by rank 0)" in str(info.value)
    assert "1 missing (3)" in str(info.value)


def test_gather_refuses_indices_and_sampler() -> None:
    """The indices place every row: a sampler as well is refused."""
    acc = Accumulator()
    acc.append(_out(np.array([0, 1])), index=[0, 1])
    sampler = DistributedSampler(range(2), 1, 0, shuffle=False)
    with pytest.raises(ConversionError, match="drop sampler="):
        gather(acc, sampler=sampler)


# ---------------------------------------------------------------------------- shards


def _write_shards(
    parent: Path, world: int, n: int, *, shuffle: bool, batch: int = 3, close: bool = True
) -> None:
    """Each rank's shard, as a DistributedSampler deals the items (no collective)."""
    for rank, items in enumerate(_sampler_indices(n, world, shuffle)):
        acc = Accumulator(directory=parent, shard=(rank, world), pad_value=-1.0)
        for start in range(0, items.size, batch):
            chunk = items[start : start + batch]
            out = _out(chunk)
            out["tokens"] = torch.ones(chunk.size, 1 + rank)  # ragged across shards
            acc.append(out, index=torch.as_tensor(chunk))
        if close:
            acc.close(num_items=n)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("shuffle", [False, True], ids=["ordered", "shuffled"])
def test_shards_read_as_one_tree(tmp_path: Path, world: int, shuffle: bool) -> None:
    """tonumpy.load(parent) gives every item once, in dataset order, padding dropped."""
    _write_shards(tmp_path, world, 10, shuffle=shuffle)
    out = tonumpy.load(tmp_path)
    expected = np.stack([np.arange(10.0), -np.arange(10.0)], 1).astype(np.float32)
    assert_same_tree(out["logits"], expected)
    assert out["tokens"].shape == (10, world)
    assert out["loss"].shape == (
        sum(-(-s.size // 3) for s in _sampler_indices(10, world, shuffle)),
    )


def test_shards_show_and_convert(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The command line reads a set of shards too: show lists it, convert writes one file."""
    _write_shards(tmp_path / "preds", 3, 8, shuffle=True)
    assert main(["show", str(tmp_path / "preds")]) == 0
    shown = capsys.readouterr().out
    assert "tonumpy shards" in shown
    assert "logits" in shown
    assert main(["convert", str(tmp_path / "preds"), str(tmp_path / "preds.npz")]) == 0
    assert_same_tree(tonumpy.load(tmp_path / "preds.npz"), tonumpy.load(tmp_path / "preds"))


def test_missing_rank_is_named(tmp_path: Path) -> None:
    """A rank without a shard is refused, naming the directory that should be there."""
    _write_shards(tmp_path, 3, 9, shuffle=False)
    (tmp_path / "rank-00001-of-00003").rename(tmp_path / "elsewhere")
    with pytest.raises(FileFormatError, match=r"rank 1 of 3 is missing \(.*rank-00001-of-00003"):
        tonumpy.load(tmp_path)


def test_incomplete_shard_is_named(tmp_path: Path) -> None:
    """A shard never closed (its rank crashed, or still runs) is refused, naming it."""
    _write_shards(tmp_path, 2, 6, shuffle=False)
    acc = Accumulator(directory=tmp_path, shard=(1, 2), resume=True)
    acc.append(_out(np.array([1])) | {"tokens": torch.ones(1, 2)}, index=[1])  # not closed
    with pytest.raises(FileFormatError, match=r"rank-00001-of-00002 is incomplete \(2 batches"):
        tonumpy.load(tmp_path)


def test_shards_of_two_runs_are_refused(tmp_path: Path) -> None:
    """Shards of different world sizes in one directory are refused."""
    _write_shards(tmp_path, 2, 6, shuffle=False)
    _write_shards(tmp_path / "b", 3, 6, shuffle=False)
    (tmp_path / "b" / "rank-00002-of-00003").rename(tmp_path / "rank-00002-of-00003")
    with pytest.raises(FileFormatError, match=r"different world sizes \(2, 3\)"):
        tonumpy.load(tmp_path)


def test_symlinked_shard_is_refused(tmp_path: Path) -> None:
    """A shard that is a symbolic link (it may lead anywhere) is refused."""
    _write_shards(tmp_path / "real", 2, 4, shuffle=False)
    (tmp_path / "set").mkdir()
    (tmp_path / "real" / "rank-00000-of-00002").rename(tmp_path / "set" / "rank-00000-of-00002")
    (tmp_path / "set" / "rank-00001-of-00002").symlink_to(tmp_path / "real" / "rank-00001-of-00002")
    with pytest.raises(FileFormatError, match="a symbolic link"):
        tonumpy.load(tmp_path / "set")


def test_empty_rank_and_recorded_num_items(tmp_path: Path) -> None:
    """A rank that appended nothing closes an empty shard; num_items= proves the rest."""
    for rank, items in enumerate([[0, 2], [1], []]):
        acc = Accumulator(directory=tmp_path, shard=(rank, 3))
        if items:
            acc.append(_out(np.array(items)), index=items)
        acc.close(num_items=4)
    with pytest.raises(FileFormatError, match=r"1 missing \(3\)"):
        tonumpy.load(tmp_path)


def test_shards_without_indices_are_in_rank_order(tmp_path: Path) -> None:
    """Without index=, the set is the shards' rows in rank order; bfloat16 stays exact."""
    for rank in range(2):
        acc = Accumulator(directory=tmp_path, shard=(rank, 2), ml_dtypes=True)
        acc.append({"h": torch.full((2, 2), 1.5 + rank, dtype=torch.bfloat16)})
        acc.result()
    out = tonumpy.load(tmp_path)
    assert_same_tree(out["h"], np.repeat([1.5, 2.5], 2)[:, None].repeat(2, 1).astype(np.float32))
    assert tonumpy.load(tmp_path, ml_dtypes=True)["h"].dtype.name == "bfloat16"


def test_convert_force_replaces_an_accumulator_directory(tmp_path: Path) -> None:
    """An Accumulator directory (its log and shard files included) is an export --force replaces."""
    acc = Accumulator(directory=tmp_path / "d")
    acc.append(_out(np.array([0, 1])), index=[0, 1])
    acc.close()
    tonumpy.save(tmp_path / "x.npz", {"a": np.arange(3)})
    assert main(["convert", str(tmp_path / "x.npz"), str(tmp_path / "d"), "--force"]) == 0
    assert_same_tree(tonumpy.load(tmp_path / "d"), {"a": np.arange(3)})


def test_option_errors(tmp_path: Path) -> None:
    """shard=, resume= and format= are checked when the Accumulator is made."""
    with pytest.raises(OptionError, match=r"shard=\(2, 2\)"):
        Accumulator(directory=tmp_path, shard=(2, 2))
    with pytest.raises(OptionError, match="pass directory= too"):
        Accumulator(shard=(0, 1))
    with pytest.raises(OptionError, match="format='csv'"):
        Accumulator(directory=tmp_path, format="csv")
    with pytest.raises(OptionError, match="resume"):
        Accumulator(directory=tmp_path, resume=1)  # type: ignore[arg-type]
    with pytest.raises(OptionError, match="close"):
        Accumulator().close()


# ---------------------------------------------------------------------------- resume

_CRASH = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    from tonumpy import Accumulator
    from tonumpy._combine import _storage
    parent, crash_at = sys.argv[1], int(sys.argv[2])
    acc = Accumulator(directory=parent, shard=(0, 1), pad_value=-100)
    for i in range(10):
        if i == crash_at:  # die once the batch's bytes are in the first file, before its header
            _storage.GrowingNpy._write_header = lambda self, fd: os.kill(os.getpid(), 9)
        items = torch.tensor([2 * i, 2 * i + 1])
        acc.append({"ids": items[:, None].repeat(1, 1 + i % 3), "loss": torch.tensor(i * 1.0)},
                   index=items)
    acc.close(num_items=20)
    """
)


def _batch(i: int) -> tuple[dict[str, Any], torch.Tensor]:
    items = torch.tensor([2 * i, 2 * i + 1])
    return {"ids": items[:, None].repeat(1, 1 + i % 3), "loss": torch.tensor(i * 1.0)}, items


@pytest.mark.parametrize("crash_at", [0, 4])
def test_resume_after_a_crash_mid_append(tmp_path: Path, crash_at: int) -> None:
    """A killed run is refused as incomplete; resume=True keeps whole batches and continues."""
    proc = subprocess.run(
        [sys.executable, "-c", _CRASH, str(tmp_path), str(crash_at)],
        capture_output=True,
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    shard = tmp_path / "rank-00000-of-00001"
    with pytest.raises(FileFormatError, match="rank-00000-of-00001 is incomplete"):
        tonumpy.load(tmp_path)
    acc = Accumulator(directory=tmp_path, shard=(0, 1), pad_value=-100, resume=True)
    assert acc.batches == crash_at
    assert len(acc) == 2 * crash_at
    if crash_at:  # the indices of the whole batches, before anything is appended
        assert_same_tree(np.asarray(acc.indices()), np.arange(2 * crash_at))
    for i in range(acc.batches, 10):
        out, items = _batch(i)
        acc.append(out, index=items)
    acc.close(num_items=20)
    merged = tonumpy.load(tmp_path)
    expected = np.full((20, 3), -100)
    for i in range(20):
        expected[i, : 1 + (i // 2) % 3] = i
    assert_same_tree(merged["ids"], expected)
    assert_same_tree(merged["loss"], np.arange(10, dtype=np.float32))
    assert json.loads((shard / "__shard__.json").read_text())["complete"] is True
    assert os.path.getsize(shard / "__progress__.npy") > 0


def test_resume_trims_the_room_a_file_grew_with(tmp_path: Path) -> None:
    """A file with room to spare (rows wider than the column's, as growing by half again past
    the rewrite slack leaves it) resumes to the exact shape."""

    def batch(i: int) -> dict[str, torch.Tensor]:  # longer rows up to 16, then short ones
        return {"ids": torch.full((2, 1 + 3 * i if i < 6 else 2), i)}

    acc = Accumulator(directory=tmp_path, shard=(0, 1), pad_value=-1)
    for i in range(6):
        acc.append(batch(i), index=[2 * i, 2 * i + 1])
    del acc  # not closed: as after a crash between appends
    path = tmp_path / "rank-00000-of-00001" / "ids.npy"
    grown = GrowingNpy.adopt(path, 12)
    grown.relayout((24,), np.array(-1, np.int64))  # the room a geometric growth leaves
    del grown
    assert np.load(path, mmap_mode="r").shape == (12, 24)
    acc = Accumulator(directory=tmp_path, shard=(0, 1), pad_value=-1, resume=True)
    for i in range(6, 8):
        acc.append(batch(i), index=[2 * i, 2 * i + 1])
    acc.close(num_items=16)
    fresh = Accumulator(pad_value=-1)
    for i in range(8):
        fresh.append(batch(i))
    assert_same_tree(tonumpy.load(tmp_path)["ids"], fresh.result()["ids"])


def test_resume_of_a_new_directory_starts_it(tmp_path: Path) -> None:
    """resume=True on a directory with nothing in it starts one (so every run may pass it)."""
    acc = Accumulator(directory=tmp_path / "d", resume=True)
    acc.append(_out(np.array([0, 1])), index=[0, 1])
    acc.result()
    assert_same_tree(tonumpy.load(tmp_path / "d")["logits"][:, 0], np.array([0.0, 1], np.float32))


def test_resume_refuses_other_outputs(tmp_path: Path) -> None:
    """The batches after resume=True must be the run's: other leaves, or no index=, refused."""
    acc = Accumulator(directory=tmp_path)
    acc.append(_out(np.array([0, 1])), index=[0, 1])
    del acc
    with pytest.raises(ConversionError, match="resume=True continues a run with the same"):
        Accumulator(directory=tmp_path, resume=True).append({"other": torch.ones(2)}, index=[2, 3])
    with pytest.raises(ConversionError, match="batch 1 comes without index="):
        Accumulator(directory=tmp_path, resume=True).append(_out(np.array([2])))
    acc = Accumulator(directory=tmp_path / "s")
    acc.append({"name": "a", "x": torch.ones(1)})
    with pytest.raises(FileFormatError, match="non-array leaves"):
        Accumulator(directory=tmp_path / "s", resume=True)
