"""``gather(sampler=...)``: rows back in dataset order, as ``DistributedSampler`` dealt them.

``DistributedSampler`` gives rank ``r`` the items ``indices[r::world]`` of a (seeded, maybe
shuffled) permutation, padded by repeating its start so every rank gets as many. The
sampler's attributes, sent with every rank's metadata, are enough to rebuild that index list
and find, for each row of the by-rank concatenation, the dataset item it holds (or that it is a
repeat, dropped).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from ..errors import ConversionError

__all__ = ["SamplerInfo", "check_samplers", "dataset_order", "sample_positions", "sampler_info"]


class SamplerInfo(NamedTuple):
    """What gather needs of one rank's ``DistributedSampler``: its attributes, as plain values."""

    num_replicas: int
    rank: int
    total_size: int
    shuffle: bool
    seed: int
    epoch: int
    length: int  #: ``len(sampler.dataset)``
    num_samples: int

    def shared(self) -> tuple[Any, ...]:
        """Every attribute but ``rank``: what every rank's sampler must agree on."""
        return (
            self.num_replicas,
            self.total_size,
            self.shuffle,
            self.seed,
            self.epoch,
            self.length,
            self.num_samples,
        )


def sampler_info(sampler: Any) -> SamplerInfo:
    """What gather needs of a ``DistributedSampler`` (or anything with its attributes)."""
    missing = [
        name
        for name in ("num_replicas", "rank", "total_size", "shuffle", "seed", "epoch", "dataset")
        if not hasattr(sampler, name)
    ]
    if missing:
        raise ConversionError(
            f"sampler= must be a torch.utils.data.DistributedSampler or have its attributes; "
            f"{type(sampler).__name__} lacks {', '.join(missing)}"
        )
    num_replicas = int(sampler.num_replicas)
    total_size = int(sampler.total_size)
    num_samples = int(getattr(sampler, "num_samples", total_size // max(num_replicas, 1)))
    return SamplerInfo(
        num_replicas=num_replicas,
        rank=int(sampler.rank),
        total_size=total_size,
        shuffle=bool(sampler.shuffle),
        seed=int(sampler.seed),
        epoch=int(sampler.epoch),
        length=len(sampler.dataset),
        num_samples=num_samples,
    )


def check_samplers(samplers: Sequence[SamplerInfo], *, world: int) -> None:
    """Raise, on every rank, unless the ranks' samplers split one dataset over this group.

    ``samplers[r]`` is rank ``r``'s sampler.
    """
    first = samplers[0]
    for rank, other in enumerate(samplers):
        if other.shared() != first.shared():
            raise ConversionError(
                "gather(): the samplers differ across ranks (num_replicas, total_size, shuffle, "
                f"seed, epoch, dataset length, num_samples: {first.shared()} on rank 0, "
                f"{other.shared()} on rank {rank}); call sampler.set_epoch(epoch) on every "
                "rank and build every rank's sampler from the same dataset"
            )
    if first.num_replicas != world:
        raise ConversionError(
            f"gather(): the sampler splits the dataset over num_replicas={first.num_replicas} "
            f"ranks but the process group has {world}; pass the sampler of this group"
        )
    ranks = sorted(other.rank for other in samplers)
    if ranks != list(range(world)):
        raise ConversionError(
            f"gather(): the samplers' ranks are {[other.rank for other in samplers]} (by process "
            "group rank); each sampler rank must appear exactly once"
        )


def dataset_order(samplers: Sequence[SamplerInfo]) -> np.ndarray:
    """Positions, in the by-rank concatenation, of dataset items 0, 1, ... (each once).

    Rebuilds the index list ``DistributedSampler.__iter__`` makes: the (seeded) permutation,
    padded by repeating its start or cut to ``total_size``; rank ``r`` gets every
    ``num_replicas``-th index from position ``r``.
    """
    first = samplers[0]
    length, total_size, num_replicas = first.length, first.total_size, first.num_replicas
    if first.shuffle:
        generator = torch.Generator()
        generator.manual_seed(first.seed + first.epoch)
        indices = torch.randperm(length, generator=generator).numpy()
    else:
        indices = np.arange(length)
    if total_size > length and length:
        indices = np.resize(indices, total_size)  # repeats from the start, like the sampler
    indices = indices[:total_size]
    dataset_index = np.concatenate(
        [indices[other.rank : total_size : num_replicas] for other in samplers]
    )
    assert dataset_index.size == first.num_samples * len(samplers)  # noqa: S101
    _, order = np.unique(dataset_index, return_index=True)
    return order


def sample_positions(samplers: Sequence[SamplerInfo]) -> list[np.ndarray]:
    """For each rank, for each of its rows: the row's place in dataset order, or -1 (a repeat)."""
    order = dataset_order(samplers)
    num_samples = samplers[0].num_samples
    positions = np.full(num_samples * len(samplers), -1, dtype=np.int64)
    positions[order] = np.arange(order.size)
    return [positions[r * num_samples : (r + 1) * num_samples] for r in range(len(samplers))]
