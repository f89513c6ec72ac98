"""Distributed evaluation on CPU: predictions from every rank, in dataset order, as NumPy.

Run with::

    torchrun --nproc-per-node 2 examples/gather_torchrun.py

Each rank evaluates its shard of a dataset of 11 items (not divisible by the 2 ranks, so
``DistributedSampler`` repeats one item to give both ranks 6), accumulates its outputs and a
per-batch loss with ``tonumpy.Accumulator``, and ``tonumpy.gather`` puts the shards back
together on rank 0: row ``i`` is dataset item ``i``, with the repeated item dropped, and the
losses come one per batch of every rank.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import tonumpy

ITEMS = 11


def main() -> None:
    dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR/PORT
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same model on every rank
    model = torch.nn.Linear(4, 3)

    features = torch.arange(4 * ITEMS, dtype=torch.float32).reshape(ITEMS, 4)
    dataset = TensorDataset(torch.arange(ITEMS), features)
    sampler = DistributedSampler(dataset, shuffle=True, seed=0)
    sampler.set_epoch(1)
    loader = DataLoader(dataset, batch_size=4, sampler=sampler)

    acc = tonumpy.Accumulator()
    with torch.no_grad():
        for ids, x in loader:
            logits = model(x)
            loss = logits.square().mean()  # one value per batch
            acc.append({"id": ids, "logits": logits, "pred": logits.argmax(-1), "loss": loss})
    print(f"rank {rank}: ids {acc.result()['id'].tolist()}")
    if ITEMS % world:  # the sampler repeated items to even the ranks out
        assert len(acc) * world > ITEMS

    out = tonumpy.gather(acc, dst=0, sampler=sampler)
    if rank == 0:
        assert out is not None
        assert (out["id"] == np.arange(ITEMS)).all()  # dataset order, no duplicates
        with torch.no_grad():
            expected = model(features).numpy()
        np.testing.assert_allclose(out["logits"], expected, rtol=1e-6)
        batches = -(-len(sampler) // loader.batch_size)
        assert out["loss"].shape == (world * batches,)  # one per batch of every rank
        print(f"rank 0: gathered ids {out['id'].tolist()}, logits {out['logits'].shape}")
    else:
        assert out is None
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
