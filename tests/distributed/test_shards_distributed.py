"""Dataset indices and rank shards over real gloo process groups of 1 to 4 ranks.

As in ``tests/distributed/test_distributed.py`` (whose launcher this file uses): each world size is
one launch of that many workers (this file run as a script) that run every check in ``CHECKS``.
Every rank evaluates a tiny "model" on its share of an 11-item dataset (an uneven last batch)
and appends each batch with its dataset indices: from an iterable dataset split by rank (no
sampler), or from a ``DistributedSampler`` (padded to even ranks), shuffled and not.
``gather(acc, num_items=11)`` and a set of shards read with ``tonumpy.load`` must give every
item once, in dataset order; an injected duplicate and gap must be reported on every rank.
"""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_distributed import RUN_TIMEOUT, _init, _launch
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset

import tonumpy
from _helpers.trees import assert_same_tree
from tonumpy import Accumulator, ConversionError, gather

WORLDS = (1, 2, 3, 4)
N = 11  # items: batches of 3 leave an uneven last batch on every split


def _model(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    x = batch["x"]
    return {"y": torch.stack([x, x * x], 1), "loss": x.mean()}


def _expected() -> np.ndarray:
    x = np.arange(N, dtype=np.float32) / 2
    return np.stack([x, x * x], 1)


def _item(i: int) -> dict[str, Any]:
    return {"idx": i, "x": torch.tensor(i / 2)}


class _Stream(IterableDataset):  # type: ignore[type-arg]
    """An iterable dataset split by rank (every world-th item), maybe shuffled within the rank."""

    def __init__(self, rank: int, world: int, shuffle: bool) -> None:
        self.items = list(range(rank, N, world))
        if shuffle:
            self.items = [
                self.items[i] for i in np.random.default_rng(rank).permutation(len(self.items))
            ]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(_item(i) for i in self.items)


def _loader(rank: int, world: int, *, sampler: bool, shuffle: bool) -> DataLoader:  # type: ignore[type-arg]
    if sampler:
        data = [_item(i) for i in range(N)]
        return DataLoader(
            data, batch_size=3, sampler=DistributedSampler(data, world, rank, shuffle=shuffle)
        )
    return DataLoader(_Stream(rank, world, shuffle), batch_size=3)


def _accumulate(loader: Any, acc: Accumulator) -> Accumulator:
    for batch in loader:
        acc.append(_model(batch), index=batch["idx"])
    return acc


def _check_gather(rank: int, world: int, out: Path) -> None:
    for sampler in (False, True):
        for shuffle in (False, True):
            acc = _accumulate(_loader(rank, world, sampler=sampler, shuffle=shuffle), Accumulator())
            result = gather(acc, num_items=N)
            assert_same_tree(result["y"], _expected())
            per_rank = [-(-len(range(r, N, world)) // 3) for r in range(world)]
            if sampler:
                per_rank = [-(-(N // world + (N % world > 0)) // 3)] * world
            assert result["loss"].shape == (sum(per_rank),)


def _check_gather_to_directory(rank: int, world: int, out: Path) -> None:
    acc = _accumulate(_loader(rank, world, sampler=True, shuffle=True), Accumulator())
    result = gather(acc, num_items=N, dst=0, directory=out / f"gathered-{rank}")
    if rank == 0:
        assert_same_tree(np.asarray(result["y"]), _expected())
        assert_same_tree(tonumpy.load(out / "gathered-0")["y"], _expected())


def _check_duplicate_and_gap(rank: int, world: int, out: Path) -> None:
    acc = Accumulator()
    batches = list(_loader(rank, world, sampler=False, shuffle=True))
    for n, whole in enumerate(batches):
        batch = whole
        if rank == world - 1 and n == len(batches) - 1:  # a gap: the last rank's last item lost
            batch = {k: v[:-1] for k, v in whole.items()}
        acc.append(_model(batch), index=batch["idx"])
        if rank == 0 and n == 0:  # a duplicate: rank 0 predicts its first batch twice
            acc.append(_model(batch), index=batch["idx"])
    with pytest.raises(ConversionError) as info:
        gather(acc, num_items=N)
    # every rank knows what was injected: the splits are functions of the rank
    duplicated = sorted(next(iter(_loader(0, world, sampler=False, shuffle=True)))["idx"].tolist())
    lost = list(_loader(world - 1, world, sampler=False, shuffle=True))[-1]["idx"][-1].item()
    shown = ", ".join(map(str, duplicated))
    message = str(info.value)
    assert f"{len(duplicated)} duplicated ({shown}; index {duplicated[0]} is held by rank 0)" in (
        message
    ), message
    assert f"1 missing ({lost})" in message, message


def _check_shards(rank: int, world: int, out: Path) -> None:
    import torch.distributed as dist

    for sampler in (False, True):
        parent = out / f"shards-{sampler}"
        acc = Accumulator(directory=parent, shard=(rank, world))
        _accumulate(_loader(rank, world, sampler=sampler, shuffle=True), acc).close(num_items=N)
        dist.barrier()  # only for the test: the reader needs every rank's shard
        assert_same_tree(tonumpy.load(parent)["y"], _expected())


CHECKS: dict[str, Callable[[int, int, Path], None]] = {
    "gather": _check_gather,
    "gather_to_directory": _check_gather_to_directory,
    "duplicate_and_gap": _check_duplicate_and_gap,
    "shards": _check_shards,
}


def _worker(rank: int, world: int, out: Path) -> None:
    import torch.distributed as dist

    _init(rank, world, out)
    results: dict[str, str] = {}
    for name, check in CHECKS.items():
        try:
            check(rank, world, out)
            results[name] = "ok"
        except Exception:  # noqa: BLE001 - reported to the pytest side
            results[name] = traceback.format_exc()
        (out / f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


_RUNS: dict[int, dict[int, dict[str, str]]] = {}


@pytest.mark.parametrize("check", sorted(CHECKS))
@pytest.mark.parametrize("world", WORLDS, ids=lambda w: f"world{w}")
def test_indices_across_ranks(world: int, check: str) -> None:
    """The check passes on every rank of a gloo group of this size."""
    if world not in _RUNS:
        _RUNS[world] = _launch(world, "indices", RUN_TIMEOUT, script=__file__)[0]
    for rank in range(world):
        results = _RUNS[world][rank]
        outcome = results.get(check, "did not run: " + results.get("__exit__", ""))
        assert outcome == "ok", f"rank {rank}:\n{outcome}"


if __name__ == "__main__":
    _worker(int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
