"""``gather(sampler=...)``: rows back in dataset order, as ``DistributedSampler`` dealt them.

``DistributedSampler`` gives rank ``r`` the items ``indices[r::world]`` of a (seeded, maybe
shuffled) permutation, padded by repeating its start so every rank gets as many. The
sampler's attributes, sent with every rank's metadata, are enough to rebuild that index list
and find, for each row of the by-rank concatenation, the dataset item it holds (or that it is a
repeat, dropped).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from . import _tree
from ._packing import info_kind
from .errors import ConversionError

__all__ = ["check_sampler", "dataset_order", "sample_positions", "sampler_info"]


def sampler_info(sampler: Any) -> tuple[Any, ...]:
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
    return (
        num_replicas,
        int(sampler.rank),
        total_size,
        bool(sampler.shuffle),
        int(sampler.seed),
        int(sampler.epoch),
        len(sampler.dataset),
        num_samples,
    )


def check_sampler(
    metas: Sequence[tuple[Any, ...]],
    paths: list[tuple[Any, ...]],
    axes: list[int],
    world: int,
    per_batch: Sequence[bool],
) -> None:
    """Raise, on every rank, unless the samplers agree and every per-sample leaf fits them.

    Per-sample leaves are the array leaves not in ``per_batch``: each must hold one row per
    sample its rank's sampler gave it.
    """
    infos = [meta[6] for meta in metas]
    first = infos[0]
    for rank, info in enumerate(infos):
        if info[:1] + info[2:] != first[:1] + first[2:]:
            raise ConversionError(
                "gather(): the samplers differ across ranks (num_replicas, total_size, shuffle, "
                f"seed, epoch, dataset length, num_samples: {first[:1] + first[2:]} on rank 0, "
                f"{info[:1] + info[2:]} on rank {rank}); call sampler.set_epoch(epoch) on every "
                "rank and build every rank's sampler from the same dataset"
            )
    if first[0] != world:
        raise ConversionError(
            f"gather(): the sampler splits the dataset over num_replicas={first[0]} ranks but "
            f"the process group has {world}; pass the sampler of this group"
        )
    ranks = sorted(info[1] for info in infos)
    if ranks != list(range(world)):
        raise ConversionError(
            f"gather(): the samplers' ranks are {[info[1] for info in infos]} (by process "
            "group rank); each sampler rank must appear exactly once"
        )
    num_samples = first[7]
    for i, path in enumerate(paths):
        for rank, meta in enumerate(metas):
            info = meta[4][i]
            kind = info_kind(info)
            if kind not in ("array", "jagged") or per_batch[i]:
                continue
            rows = info[2][axes[i] if kind == "array" else 0]
            if rows != num_samples:
                raise ConversionError(
                    f"gather(sampler=...): {_tree.format_path(path)} has {rows} rows along axis "
                    f"{axes[i]} on rank {rank}, but the sampler gives that rank {num_samples} "
                    "samples; every array leaf must hold one row per sample (do not drop the "
                    "DataLoader's last batch). Values with one row per batch (a loss) are told "
                    "apart when you pass the Accumulator itself: gather(acc, sampler=...); or "
                    "gather them in a separate call without sampler=",
                    path=path,
                )


def dataset_order(metas: Sequence[tuple[Any, ...]]) -> np.ndarray:
    """Positions, in the by-rank concatenation, of dataset items 0, 1, ... (each once).

    Rebuilds the index list ``DistributedSampler.__iter__`` makes: the (seeded) permutation,
    padded by repeating its start or cut to ``total_size``; rank ``r`` gets every
    ``num_replicas``-th index from position ``r``.
    """
    num_replicas, _, total_size, shuffle, seed, epoch, length, num_samples = metas[0][6]
    if shuffle:
        generator = torch.Generator()
        generator.manual_seed(seed + epoch)
        indices = torch.randperm(length, generator=generator).numpy()
    else:
        indices = np.arange(length)
    if total_size > length and length:
        indices = np.resize(indices, total_size)  # repeats from the start, like the sampler
    indices = indices[:total_size]
    dataset_index = np.concatenate(
        [indices[meta[6][1] : total_size : num_replicas] for meta in metas]
    )
    assert dataset_index.size == num_samples * len(metas)  # noqa: S101
    _, first = np.unique(dataset_index, return_index=True)
    order: np.ndarray = first
    return order


def sample_positions(metas: Sequence[tuple[Any, ...]]) -> np.ndarray:
    """For each row of the by-rank concatenation: its row in dataset order, or -1 (a repeat).

    Rank ``r``'s row ``j`` is row ``r * num_samples + j`` of the concatenation.
    """
    order = dataset_order(metas)
    num_samples = metas[0][6][7]
    positions = np.full(num_samples * len(metas), -1, dtype=np.int64)
    positions[order] = np.arange(order.size)
    return positions
