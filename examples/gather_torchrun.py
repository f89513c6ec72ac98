"""Distributed evaluation on CPU: predictions from every rank, in dataset order, as NumPy.

Run with::

    torchrun --nproc-per-node 2 examples/gather_torchrun.py

Each rank evaluates its shard of a dataset of 10 items (not divisible by the number of ranks, so
``DistributedSampler`` repeats some items to even the ranks out), accumulates its outputs with
``tonumpy.Accumulator``, and ``tonumpy.gather`` puts the shards back together on rank 0: row ``i``
is dataset item ``i``, with the repeated items dropped.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import tonumpy


def main() -> None:
    dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR/PORT
    rank = dist.get_rank()
    torch.manual_seed(0)  # the same model on every rank
    model = torch.nn.Linear(4, 3)

    features = torch.arange(40, dtype=torch.float32).reshape(10, 4)
    dataset = TensorDataset(torch.arange(10), features)
    sampler = DistributedSampler(dataset, shuffle=True, seed=0)
    sampler.set_epoch(1)
    loader = DataLoader(dataset, batch_size=3, sampler=sampler)

    acc = tonumpy.Accumulator()
    with torch.no_grad():
        for ids, x in loader:
            logits = model(x)
            acc.append({"id": ids, "logits": logits, "pred": logits.argmax(-1)})
    mine = acc.result()
    print(f"rank {rank}: ids {mine['id'].tolist()}")

    out = tonumpy.gather(mine, dst=0, sampler=sampler)
    if rank == 0:
        assert out is not None
        assert (out["id"] == np.arange(len(dataset))).all()  # dataset order, no duplicates
        with torch.no_grad():
            expected = model(features).numpy()
        np.testing.assert_allclose(out["logits"], expected, rtol=1e-6)
        print(f"rank 0: gathered ids {out['id'].tolist()}, logits {out['logits'].shape}")
    else:
        assert out is None
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
