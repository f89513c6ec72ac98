"""Tests for ``tonumpy.gather`` over real gloo process groups on 127.0.0.1.

Each world size (1, 2, 3) is one launch: that many worker processes (this file run as a script)
join one gloo group and run every check in ``CHECKS`` against the same group, writing each
check's outcome to a JSON file as they go. The pytest side launches each world once, with a hard
timeout, and kills every worker's process group in a ``finally``, so a failing or hanging check
never leaves processes behind. Each check knows every rank's input (it is a function of the
rank), so every rank checks the full result itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections import namedtuple
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import optree
import pytest
import torch

import tonumpy
from _helpers.trees import assert_same_tree
from tonumpy import ConversionError, gather
from tonumpy.distributed import _metadata
from tonumpy.distributed._packing import prepare
from tonumpy.distributed._sampler import SamplerInfo

WORLDS = (1, 2, 3)
RUN_TIMEOUT = 120.0  # seconds for a whole launch: startup plus every check
PG_TIMEOUT = 60.0  # the process group's own timeout (a hang fails well before the run's)
BOUND = 10.0  # an error that must be raised on every rank is raised within this many seconds


# ------------------------------------------------------------------------------ launching


def _launch(
    world: int, scenario: str, timeout: float, script: str = __file__
) -> tuple[dict[int, dict[str, str]], list]:
    """Run ``world`` workers of ``scenario``; return each rank's results and the Popen objects.

    ``script`` is the test file whose ``__main__`` runs a worker
    (``tests/test_shards_distributed.py`` launches its own). Raises TimeoutError if the workers
    have not all exited within ``timeout`` seconds. Every worker (started in its own session)
    has its whole process group killed in any case.
    """
    out = Path(tempfile.mkdtemp(prefix="tonumpy-gather-"))
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", PYTHONWARNINGS="error")
    tests = str(Path(__file__).resolve().parents[1])  # the workers import tests/_helpers
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [tests, env.get("PYTHONPATH")]))
    procs = []
    try:
        for rank in range(world):
            log = (out / f"rank{rank}.log").open("w")
            procs.append(
                subprocess.Popen(
                    [sys.executable, script, scenario, str(rank), str(world), str(out)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    env=env,
                )
            )
            log.close()
        deadline = time.monotonic() + timeout
        for proc in procs:
            remaining = deadline - time.monotonic()
            try:
                proc.wait(timeout=max(remaining, 0.01))
            except subprocess.TimeoutExpired:
                raise TimeoutError(f"{scenario} (world {world}) ran past {timeout} s") from None
        results = {}
        for rank in range(world):
            path = out / f"rank{rank}.json"
            results[rank] = json.loads(path.read_text()) if path.exists() else {}
            if procs[rank].returncode != 0:
                log_text = (out / f"rank{rank}.log").read_text()[-3000:]
                results[rank].setdefault("__exit__", f"exit {procs[rank].returncode}: {log_text}")
        return results, procs
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        shutil.rmtree(out, ignore_errors=True)


_RUNS: dict[int, dict[int, dict[str, str]]] = {}


def _results(world: int) -> dict[int, dict[str, str]]:
    if world not in _RUNS:
        _RUNS[world] = _launch(world, "checks", RUN_TIMEOUT)[0]
    return _RUNS[world]


# ------------------------------------------------------------------------------ worker side


def _init(rank: int, world: int, out: Path) -> None:
    """Join a gloo group on 127.0.0.1 through a TCPStore on a port the OS picked."""
    import datetime

    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=PG_TIMEOUT)
    port_file = out / "port"
    if rank == 0:
        store = dist.TCPStore(
            "127.0.0.1", 0, world, is_master=True, timeout=timeout, wait_for_workers=False
        )
        tmp = out / "port.tmp"
        tmp.write_text(str(store.port))
        tmp.rename(port_file)
    else:
        deadline = time.monotonic() + PG_TIMEOUT
        while not port_file.exists():
            if time.monotonic() > deadline:
                raise TimeoutError("rank 0 never published its port")
            time.sleep(0.01)
        store = dist.TCPStore("127.0.0.1", int(port_file.read_text()), world, False, timeout)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timeout)


def _rows(rank: int) -> int:
    """Rows of rank ``rank``: 0, 2, 1 (rank 0 has none; a world of 1 is all empty)."""
    return (2 * rank) % 3


def _check_uneven_rows(rank: int, world: int) -> None:
    mine = torch.arange(_rows(rank) * 4, dtype=torch.float32).reshape(-1, 4) + 100 * rank
    out = gather({"x": mine})
    expected = np.concatenate(
        [np.arange(_rows(r) * 4, dtype=np.float32).reshape(-1, 4) + 100 * r for r in range(world)]
    )
    assert_same_tree(out["x"], expected)


def _check_all_empty(rank: int, world: int) -> None:
    out = gather({"x": torch.zeros(0, 4, dtype=torch.int64), "y": [torch.zeros(0)]})
    assert_same_tree(out["x"], np.zeros((0, 4), dtype=np.int64))
    assert_same_tree(out["y"][0], np.zeros((0,), dtype=np.float32))


def _ragged_leaf(rank: int) -> torch.Tensor:
    n = _rows(rank)
    shape = (n, rank + 1, 3 - rank)
    return (torch.arange(math_prod(shape), dtype=torch.int16) + 10 * rank).reshape(shape)


def math_prod(shape: tuple[int, ...]) -> int:
    result = 1
    for s in shape:
        result *= s
    return result


def _expected_ragged(world: int, fill: int) -> np.ndarray:
    chunks = [_ragged_leaf(r).numpy() for r in range(world)]
    full = [c for c in chunks if c.shape[0]] or chunks
    target = tuple(max(c.shape[i] for c in full) for i in (1, 2))
    out = np.full((sum(c.shape[0] for c in chunks), *target), fill, dtype=np.int16)
    start = 0
    for c in full if full[0].shape[0] else []:
        out[start : start + c.shape[0], : c.shape[1], : c.shape[2]] = c
        start += c.shape[0]
    return out


def _check_ragged_later_dims(rank: int, world: int) -> None:
    tree = {"ids": _ragged_leaf(rank), "same": torch.ones(_rows(rank), 2)}
    out = gather(tree, pad_value={"ids": -7})
    assert_same_tree(out["ids"], _expected_ragged(world, -7))
    assert_same_tree(out["same"], np.ones((sum(map(_rows, range(world))), 2), dtype=np.float32))
    out = gather(tree, pad_value=lambda path, dtype: 5 if path == ("ids",) else None)
    assert_same_tree(out["ids"], _expected_ragged(world, 5))


def _check_ragged_without_pad_value(rank: int, world: int) -> None:
    tree = {"ids": _ragged_leaf(rank)}
    if world < 3:  # ranks with rows: at most one, so nothing is ragged
        assert_same_tree(gather(tree)["ids"], _expected_ragged(world, 0))
        return
    start = time.monotonic()
    with pytest.raises(ConversionError, match=r"tree\['ids'\].*pad_value="):
        gather(tree)
    with pytest.raises(ConversionError, match=r"-300000 cannot be represented in int16"):
        gather(tree, pad_value=-300_000)
    assert time.monotonic() - start < BOUND


def _check_zero_d(rank: int, world: int) -> None:
    out = gather({"loss": torch.tensor(rank + 0.5), "step": torch.tensor(rank)})
    assert_same_tree(out["loss"], np.arange(world, dtype=np.float32) + 0.5)
    assert_same_tree(out["step"], np.arange(world, dtype=np.int64))


def _dtype_tree(rank: int) -> dict[str, Any]:
    base = torch.arange(6, dtype=torch.float32).reshape(2, 3) + 10 * rank
    complex_ = torch.complex(base, -base - 1)
    return {
        "bool": base > 12,
        "int64": (base * 1e12).to(torch.int64),
        "bf16": (base / 3).to(torch.bfloat16),
        "f16": (base / 7).half(),
        "uint8": base.to(torch.uint8),
        "complex": complex_,
        "conj": complex_.conj(),  # a conjugate view (conj bit set)
        "neg": complex_.conj().imag,  # a negative view (neg bit set)
        "noncontig": torch.arange(12.0).reshape(3, 4).T[:2] + rank,
        "grad": (base + 0.25).requires_grad_(),
        "numpy": base.numpy().astype(np.float64),
        "np_scalar": np.int32(rank),
        "f64_0d": torch.tensor(rank / 3, dtype=torch.float64),
    }


def _expected_dtypes(world: int, *, ml: bool) -> dict[str, np.ndarray]:
    trees = [_dtype_tree(r) for r in range(world)]
    expected = {}
    for key in trees[0]:
        leaves = [t[key] for t in trees]
        arrays = []
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor):
                leaf = leaf.detach().resolve_conj().resolve_neg()  # noqa: PLW2901
                if leaf.dtype == torch.bfloat16:
                    bits = leaf.view(torch.int16).numpy()
                    leaf = bits.view(tonumpy._dtypes.ml_numpy_dtype(torch.bfloat16))  # noqa: PLW2901
                    arrays.append(leaf if ml else leaf.astype(np.float32))
                    continue
                leaf = leaf.numpy()  # noqa: PLW2901
            arrays.append(np.asarray(leaf))
        if arrays[0].ndim == 0:
            expected[key] = np.stack(arrays)
        else:
            expected[key] = np.concatenate(arrays)
    return expected


def _check_dtypes(rank: int, world: int) -> None:
    tree = _dtype_tree(rank)
    for ml in (False, True):
        out = gather(tree, ml_dtypes=ml)
        expected = _expected_dtypes(world, ml=ml)
        assert list(out) == list(expected)
        for key, value in expected.items():
            assert_same_tree(out[key], value)
    assert tree["conj"].is_conj()  # the input is left as it was
    assert tree["grad"].requires_grad


Point = namedtuple("Point", ["x", "y"])


@dataclasses.dataclass
class Output:
    logits: Any
    extra: Any = None


def _check_containers(rank: int, world: int) -> None:
    tree = {
        "list": [torch.full((1,), rank), torch.full((2, 2), float(rank))],
        "tuple": (torch.tensor([rank]), None),
        "point": Point(torch.tensor([[rank, -rank]]), "p"),
        "output": Output(torch.ones(rank, 3), extra={"name": f"rank{rank}", "n": rank}),
        "none": None,
    }
    out = gather(tree)
    assert set(out) == set(tree)
    assert list(out) == list(tree)
    assert_same_tree(out["list"][0], np.arange(world, dtype=np.int64))
    assert_same_tree(
        out["list"][1], np.repeat(np.arange(world, dtype=np.float32), 4).reshape(-1, 2)
    )
    assert isinstance(out["tuple"], tuple)
    assert out["tuple"][1] is None
    assert type(out["point"]) is Point
    assert_same_tree(out["point"].x, np.array([[r, -r] for r in range(world)]))
    assert out["point"].y == ["p"] * world
    assert type(out["output"]) is Output
    assert_same_tree(out["output"].logits, np.ones((sum(range(world)), 3), dtype=np.float32))
    assert out["output"].extra == {
        "name": [f"rank{r}" for r in range(world)],
        "n": list(range(world)),
    }
    assert out["none"] is None


def _check_dst(rank: int, world: int) -> None:
    for dst in {0, world - 1}:
        out = gather({"x": torch.full((rank + 1,), rank)}, dst=dst)
        if rank == dst:
            assert_same_tree(out["x"], np.concatenate([np.full(r + 1, r) for r in range(world)]))
        else:
            assert out is None


def _check_axis(rank: int, world: int) -> None:
    out = gather({"x": torch.full((2, rank + 1), rank)}, axis=-1)
    assert_same_tree(
        out["x"], np.concatenate([np.full((2, r + 1), r) for r in range(world)], axis=1)
    )


def _check_many_leaves_few_collectives(rank: int, world: int) -> None:
    import torch.distributed.distributed_c10d as c10d

    counts: dict[str, int] = {}
    originals = {name: getattr(c10d, name) for name in ("all_gather", "gather", "broadcast")}

    def counting(name: str) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            counts[name] = counts.get(name, 0) + 1
            return originals[name](*args, **kwargs)

        return call

    dtypes = [torch.float32, torch.int64, torch.bfloat16, torch.bool, torch.complex64]
    tree = {f"leaf{i}": torch.ones(rank + 1, 3).to(dtypes[i % len(dtypes)]) * i for i in range(300)}
    modules = (c10d, torch.distributed)  # patched in both: internal calls are counted too
    for name in originals:
        for module in modules:
            setattr(module, name, counting(name))
    try:
        out = gather(tree)
        gathered = gather(tree, dst=world - 1)
    finally:
        for name, fn in originals.items():
            for module in modules:
                setattr(module, name, fn)
    # per call: all_gather_object (two all_gathers) + one collective for the data
    if world > 1:
        assert counts == {"all_gather": 5, "gather": 1}, counts
    else:
        assert counts == {}, counts
    rows = sum(r + 1 for r in range(world))
    assert_same_tree(out["leaf6"], np.full((rows, 3), 6, dtype=np.int64))
    assert (gathered is None) == (rank != world - 1)


def _expect_raise_everywhere(match: str, call: Callable[[], Any]) -> None:
    start = time.monotonic()
    with pytest.raises(ConversionError, match=match):
        call()
    assert time.monotonic() - start < BOUND


def _check_mismatch_raises_everywhere(rank: int, world: int) -> None:
    last = rank == world - 1 and world > 1
    tree: dict[str, Any] = {"a": torch.ones(2), "b": torch.ones(2)}
    if last:
        tree["c"] = torch.ones(1)
    if world > 1:
        _expect_raise_everywhere(
            rf"rank {world - 1} does not have the structure.*tree\['c'\]", lambda: gather(tree)
        )
    if world > 1:
        pair: Any = (torch.ones(1), torch.ones(1))
        _expect_raise_everywhere(
            rf"rank {world - 1} does not have the structure of rank 0: at tree\['p'\], rank 0 "
            rf"has a tuple of 2 items but rank {world - 1} has a list of 2 items",
            lambda: gather({"p": list(pair) if last else pair}),
        )
    # one dtype rule for concat, Accumulator and gather: float32 and float64 join as float64...
    wide = torch.ones(2, dtype=torch.float64 if last else torch.float32)
    assert gather({"x": wide})["x"].dtype == (np.float64 if world > 1 else np.float32)
    # ... but int64 and float64 have no dtype that holds both exactly
    leaf = torch.ones(2, dtype=torch.float64 if last else torch.int64)
    if world > 1:
        _expect_raise_everywhere(
            rf"the ranks of tree\['x'\] have dtypes int64 and float64 \(rank 0 \.\.\. rank "
            rf"{world - 1}\)",
            lambda: gather({"x": leaf}),
        )
    bad = torch.empty(2, device="meta") if last else torch.ones(2)
    if world > 1:
        _expect_raise_everywhere(r"meta tensors", lambda: gather({"m": bad}))
        _expect_raise_everywhere(
            r"dst=", lambda: gather({"x": torch.ones(1)}, dst=rank if last else 0)
        )
        kind = torch.ones(2) if last else torch.tensor(1.0)
        _expect_raise_everywhere(r"0-d value in rank 0", lambda: gather({"k": kind}))
    # the group is still usable after every one of those errors
    out = gather({"x": torch.ones(1)})
    assert_same_tree(out["x"], np.ones(world, dtype=np.float32))


def _check_odd_leaves(rank: int, world: int) -> None:
    sparse = torch.sparse_coo_tensor([[0, 1]], [rank, 2], (3,), check_invariants=True)
    stamps = np.array(["2026-11-28"], dtype="datetime64[D]") + rank
    out = gather({"sparse": sparse, "stamps": stamps, "tag": np.str_("t")})
    assert_same_tree(out["sparse"], np.concatenate([[r, 2, 0] for r in range(world)]))
    assert_same_tree(
        out["stamps"], np.array(["2026-11-28"], dtype="datetime64[D]") + np.arange(world)
    )
    assert_same_tree(out["tag"], np.array(["t"] * world))
    if world > 1:
        value: Any = (lambda: None) if rank == 0 else 1
        _expect_raise_everywhere(r"pickling it failed|rank 0 raised", lambda: gather({"v": value}))


class _Holder:
    """An object tonumpy cannot rebuild, holding a tensor (the walker refuses it)."""

    def __init__(self) -> None:
        self.t = torch.ones(1)


def _check_namedtuple_paths(rank: int, world: int) -> None:
    """Messages name a namedtuple's entry by its field (tree['p'].y), as to_numpy's do."""
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(list(range(5)), shuffle=False)
    items = torch.tensor(list(sampler))
    _expect_raise_everywhere(
        r"tree\['p'\]\.y has .* rows .* sampler gives that rank",
        lambda: gather({"p": Point(items, items[:-1] if rank == 0 else items)}, sampler=sampler),
    )
    if world > 1:  # rank 0 cannot pickle its leaf; every other rank names the place it failed
        value: Any = (lambda: None) if rank == 0 else 1
        where = r"tree\['p'\]\.y" if rank == 0 else r"rank 0 raised .*\(at tree\['p'\]\.y\)"
        _expect_raise_everywhere(where, lambda: gather({"p": Point(1, value)}))
        with pytest.raises(tonumpy.TonumpyError) as caught:
            gather({"p": Point(1, _Holder() if rank == 0 else 1)})
        assert "tree['p'].y" in str(caught.value)
        assert "tree['p'][1]" not in str(caught.value)


def _features(indices: torch.Tensor) -> dict[str, torch.Tensor]:
    """What a model would output for dataset items ``indices``: a function of the item."""
    return {"item": indices.clone(), "emb": indices[:, None].float() * torch.tensor([1.0, -1.0])}


def _check_sampler(rank: int, world: int) -> None:
    from torch.utils.data import DataLoader, DistributedSampler

    for length in (10, 7):  # neither divisible by 3 nor (7) by 2
        dataset = list(range(length))
        for shuffle in (False, True):
            sampler = DistributedSampler(dataset, shuffle=shuffle, seed=3)
            sampler.set_epoch(2)
            loader = DataLoader(dataset, batch_size=3, sampler=sampler)
            acc = tonumpy.Accumulator()
            for batch in loader:
                acc.append(_features(torch.as_tensor(batch)))
            mine = acc.result()
            mine["name"] = np.array([f"item{i}" for i in mine["item"]])  # a str array: pickled
            out = gather(mine, sampler=sampler)
            assert_same_tree(out["item"], np.arange(length))
            assert_same_tree(out["name"], np.array([f"item{i}" for i in range(length)]))
            assert_same_tree(
                out["emb"], np.arange(length, dtype=np.float32)[:, None] * np.float32([1, -1])
            )
            gathered = gather(acc.result(), sampler=sampler, num_items=4, dst=0)
            if rank == 0:
                assert_same_tree(gathered["item"], np.arange(4))
            # concatenating by rank and truncating is what gives the wrong order (F36)
            naive = gather(acc.result())["item"][:length]
            if world > 1:
                assert not np.array_equal(naive, np.arange(length))
        dropped = DistributedSampler(dataset, shuffle=True, drop_last=True, seed=1)
        items = torch.tensor(list(dropped))
        out = gather({"item": items, "loss": torch.tensor(1.0)}, sampler=dropped)
        kept = np.sort(np.concatenate([np.asarray(list(_peer(dropped, r))) for r in range(world)]))
        assert_same_tree(out["item"], kept)
        assert out["loss"].shape == (world,)  # 0-d leaves stay one per rank


def _peer(sampler: Any, rank: int) -> Any:
    from torch.utils.data import DistributedSampler

    peer = DistributedSampler(
        sampler.dataset,
        num_replicas=sampler.num_replicas,
        rank=rank,
        shuffle=sampler.shuffle,
        seed=sampler.seed,
        drop_last=sampler.drop_last,
    )
    peer.set_epoch(sampler.epoch)
    return peer


def _check_sampler_errors(rank: int, world: int) -> None:
    from torch.utils.data import DistributedSampler

    dataset = list(range(5))
    sampler = DistributedSampler(dataset, shuffle=False)
    items = torch.tensor(list(sampler))
    _expect_raise_everywhere(
        r"tree\['item'\] has .* rows .* sampler gives that rank",
        lambda: gather({"item": items[:-1] if rank == 0 else items}, sampler=sampler),
    )
    if world > 1:
        sampler.set_epoch(rank)
        _expect_raise_everywhere(
            r"samplers differ", lambda: gather({"item": items}, sampler=sampler)
        )


def _check_num_items_contiguous(rank: int, world: int) -> None:
    length = 8
    per = -(-length // world)
    mine = torch.arange(rank * per, (rank + 1) * per) % length  # wraps round at the end
    out = gather({"x": mine, "loss": torch.tensor(float(rank))}, num_items=length)
    assert_same_tree(out["x"], np.arange(length))
    assert_same_tree(out["loss"], np.arange(world, dtype=np.float32))


def _check_subgroup(rank: int, world: int) -> None:
    import torch.distributed as dist

    members = [world - 1] if world < 3 else [1, 2]
    group = dist.new_group(members)
    if rank in members:
        if world == 3:
            with pytest.raises(ValueError, match="not a member"):
                gather({"x": torch.tensor([rank])}, group=group, dst=0)
        out = gather({"x": torch.tensor([rank])}, group=group, dst=members[-1])
        if rank == members[-1]:
            assert_same_tree(out["x"], np.array(members))
        else:
            assert out is None
    dist.barrier()


def _check_dtensor(rank: int, world: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    full = torch.arange(world * 2 * 3, dtype=torch.float32).reshape(world * 2, 3)
    dtensor = distribute_tensor(full, mesh, [Shard(0)])
    out = gather({"d": dtensor, "local": torch.tensor([rank])})
    # every rank materialises the whole tensor, then it is concatenated over the ranks
    assert_same_tree(out["d"], np.concatenate([full.numpy()] * world))
    assert_same_tree(out["local"], np.arange(world))


# ------------------------------------------------------------------------------ issue 15


def _counting(names: tuple[str, ...]) -> Any:
    """A context manager counting calls of torch.distributed collectives (and their buffers)."""
    import torch.distributed.distributed_c10d as c10d

    calls: list[tuple[str, int]] = []
    originals = {name: getattr(c10d, name) for name in names}

    def counting(name: str) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            sent = args[0] if name == "gather" else args[1]  # the buffer this rank sends
            size = sent.numel() if isinstance(sent, torch.Tensor) else -1
            calls.append((name, size))
            return originals[name](*args, **kwargs)

        return call

    @contextlib.contextmanager
    def manager() -> Any:
        for name in names:
            for module in (c10d, torch.distributed):
                setattr(module, name, counting(name))
        try:
            yield calls
        finally:
            for name, fn in originals.items():
                for module in (c10d, torch.distributed):
                    setattr(module, name, fn)

    return manager()


def _round_tree(rank: int) -> dict[str, Any]:
    """Leaves of every kind, several rows per rank, one of them ragged: many rounds if small."""
    tree: dict[str, Any] = dict(_dtype_tree(rank))
    tree["ragged"] = _ragged_leaf(rank)
    tree["names"] = np.array([f"r{rank}i{i}" for i in range(rank + 1)])  # pickled: str array
    tree["tag"] = f"rank{rank}"
    tree["long"] = torch.arange(40 * (rank + 1), dtype=torch.int64).reshape(-1, 4) * (rank + 1)
    return tree


def _check_rounds(rank: int, world: int) -> None:
    """Small chunk_bytes: many rounds, one collective each, every buffer within the chunk;
    the result is the one-round result, and equals the expected arrays."""
    tree = _round_tree(rank)
    whole = gather(tree, pad_value={"ragged": -7})
    expected = _expected_dtypes(world, ml=False)
    for key, value in expected.items():
        assert_same_tree(whole[key], value)
    assert_same_tree(whole["ragged"], _expected_ragged(world, -7))
    assert_same_tree(
        whole["long"], np.concatenate([_round_tree(r)["long"].numpy() for r in range(world)])
    )
    assert whole["tag"] == [f"rank{r}" for r in range(world)]
    assert_same_tree(
        whole["names"], np.concatenate([_round_tree(r)["names"] for r in range(world)])
    )
    for chunk in (1, 24, 200):
        with _counting(("all_gather", "gather")) as calls:
            out = gather(tree, pad_value={"ragged": -7}, chunk_bytes=chunk, dst=world - 1)
        if rank == world - 1:
            assert list(out) == list(whole)
            for key, value in whole.items():
                if isinstance(value, np.ndarray):
                    assert_same_tree(out[key], value)
                else:
                    assert out[key] == value
        else:
            assert out is None
        if world > 1:
            data = [size for name, size in calls if name == "gather"]
            assert len(data) > 3, data  # several rounds
            largest_row = 4 * 8  # a row of "long": 4 int64
            assert max(data) <= -(-max(chunk, largest_row) // 16) * 16, (chunk, data)


def _check_rounds_with_sampler_and_axis(rank: int, world: int) -> None:
    from torch.utils.data import DistributedSampler

    dataset = list(range(11))
    sampler = DistributedSampler(dataset, shuffle=True, seed=5)
    items = torch.tensor(list(sampler))
    tree = {"item": items, "emb": items[:, None].float().repeat(1, 3), "loss": torch.tensor(1.0)}
    out = gather(tree, sampler=sampler, chunk_bytes=8)
    assert_same_tree(out["item"], np.arange(11))
    assert_same_tree(out["emb"], np.repeat(np.arange(11, dtype=np.float32)[:, None], 3, 1))
    assert_same_tree(out["loss"], np.ones(world, dtype=np.float32))
    cols = torch.full((2, rank + 1), rank, dtype=torch.int16)
    out = gather({"c": cols}, axis=-1, chunk_bytes=2)
    assert_same_tree(
        out["c"], np.concatenate([np.full((2, r + 1), r, np.int16) for r in range(world)], 1)
    )


def _eval_outputs(items: torch.Tensor) -> dict[str, Any]:
    """A model's output for a batch of dataset items: ragged logits, a loss, a tag."""
    length = 2 + int(items.max()) % 4  # the batch's padded length depends on its items
    logits = items[:, None, None].float() + torch.arange(length)[None, :, None] / 10
    return {
        "item": items.clone(),
        "logits": logits.repeat(1, 1, 3),
        "loss": items.float().mean(),
        "tag": f"batch{int(items[0])}",
    }


def _check_accumulate_then_gather_with_loss(rank: int, world: int) -> None:
    """gather(acc, sampler=): per-sample rows in dataset order, per-batch values one per batch
    of every rank in rank order; the same with directory= and in small rounds."""
    from torch.utils.data import DataLoader, DistributedSampler

    dataset = list(range(11))  # 11 items: DistributedSampler repeats some on 2 and 3 ranks
    sampler = DistributedSampler(dataset, shuffle=True, seed=1)
    loader = DataLoader(dataset, batch_size=2, sampler=sampler)
    acc = tonumpy.Accumulator(pad_value={"logits": -1.0})
    for batch in loader:
        acc.append(_eval_outputs(torch.as_tensor(batch)))
    with pytest.raises(ConversionError, match="sampler gives that rank"):
        gather(acc.result(), sampler=sampler, pad_value={"logits": -1.0})
    if world > 1:  # a rank holds its share only
        with pytest.raises(ConversionError, match=r"gather\(acc, sampler"):
            acc.result(num_items=len(dataset))
    per_rank = [
        [torch.as_tensor(b) for b in DataLoader(dataset, 2, sampler=_peer(sampler, r))]
        for r in range(world)
    ]
    losses = np.array([b.float().mean() for batches in per_rank for b in batches], np.float32)
    tags = [f"batch{int(b[0])}" for batches in per_rank for b in batches]
    folder = Path(tempfile.mkdtemp(prefix=f"gathered{rank}-"))
    on_disk = tonumpy.Accumulator(pad_value={"logits": -1.0}, directory=folder / "acc")
    for batch in loader:
        on_disk.append(_eval_outputs(torch.as_tensor(batch)))
    try:
        runs = {
            "memory": gather(acc, dst=0, sampler=sampler, pad_value={"logits": -1.0}),
            "rounds": gather(acc, dst=0, sampler=sampler, pad_value=-1.0, chunk_bytes=40),
            "directory": gather(
                acc, dst=0, sampler=sampler, pad_value=-1.0, directory=folder / "p", chunk_bytes=40
            ),
            "from disk": gather(on_disk, dst=0, sampler=sampler, pad_value=-1.0, chunk_bytes=64),
        }
        if rank:
            assert all(out is None for out in runs.values())
            assert not (folder / "p").exists()
            return
        for name, out in runs.items():  # np.asarray: directory= gives np.memmap arrays
            assert_same_tree(np.asarray(out["item"]), np.arange(len(dataset)))
            assert_same_tree(np.asarray(out["loss"]), losses)
            assert out["tag"] == tags, name
            width = out["logits"].shape[1]
            for i in range(len(dataset)):
                row = np.asarray(out["logits"][i])
                length = int((row[:, 0] != -1).sum())
                assert width >= length >= 2
                expected = i + np.arange(length, dtype=np.float32)[:, None] / 10
                assert_same_tree(row[:length], np.repeat(expected.astype(np.float32), 3, 1))
        loaded = tonumpy.load(folder / "p")
        assert_same_tree(np.asarray(loaded["logits"]), runs["memory"]["logits"])
        assert isinstance(runs["directory"]["logits"], np.memmap)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _check_reduce_and_exclude(rank: int, world: int) -> None:
    """reduce= and exclude= act on each rank's tree before anything is sent."""
    logits = torch.arange(2 * 3 * 5, dtype=torch.float32).reshape(2, 3, 5) * (rank + 1)
    tree = {"logits": logits, "cache": [torch.ones(1, rank + 1)], "n": torch.tensor([rank] * 2)}
    out = gather(tree, reduce={"logits": lambda t: t.argmax(-1)}, exclude="cache", chunk_bytes=8)
    assert out["cache"] is None  # ragged across ranks, but left out: no pad value needed
    assert_same_tree(out["logits"], np.full((2 * world, 3), 4, dtype=np.int64))
    assert_same_tree(out["n"], np.repeat(np.arange(world), 2))


def _check_accumulator_and_plain_tree_disagree(rank: int, world: int) -> None:
    acc = tonumpy.Accumulator()
    acc.append({"x": torch.ones(2), "loss": torch.tensor(0.5)})
    if world > 1:
        mine: Any = acc if rank == 0 else acc.result()
        _expect_raise_everywhere(
            r"tree\['loss'\] holds one value per batch on rank 0", lambda: gather(mine)
        )
    with pytest.raises(tonumpy.OptionError, match="an Accumulator applies its own"):
        gather(acc, exclude="loss")


def _check_directory_destination_errors(rank: int, world: int) -> None:
    """A receiver that cannot write its directory raises after the exchange; nobody hangs."""
    folder = Path(tempfile.mkdtemp(prefix=f"taken{rank}-"))
    try:
        (folder / "__tonumpy__.json").write_text("{}")  # another run's structure
        tree = {"x": torch.full((3, 2), rank)}
        start = time.monotonic()
        if rank == 0:
            with pytest.raises(FileExistsError, match="never overwrites"):
                gather(tree, dst=0, directory=folder, chunk_bytes=16)
        else:
            assert gather(tree, dst=0, directory=folder, chunk_bytes=16) is None
        assert time.monotonic() - start < BOUND
        assert (folder / "__tonumpy__.json").read_text() == "{}"
        with pytest.raises(tonumpy.OptionError, match="needs axis=0"):
            gather(tree, directory=folder / "new", axis=1)
        with pytest.raises(tonumpy.OptionError, match="chunk_bytes="):
            gather(tree, chunk_bytes=0)
        out = gather(tree)  # the group is still usable
        assert_same_tree(out["x"], np.concatenate([np.full((3, 2), r) for r in range(world)]))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _assert_mean_loss(namespace: dict[str, Any], losses: list[float], world: int) -> None:
    """The guide's gathered batch sizes line up with its per-batch losses, weighting them."""
    from _helpers import docs_fixtures as _docs_fixtures

    batch_sizes = [
        len(batch["input_ids"])
        for r in range(world)
        for batch in torch.utils.data.DataLoader(
            namespace["dataset"],
            _docs_fixtures.BATCH_SIZE,
            sampler=_peer(namespace["sampler"], r),
            collate_fn=_docs_fixtures.collate,
        )
    ]
    sizes = namespace["sizes"]
    assert sizes.tolist() == batch_sizes  # beside the losses, in their order
    assert sizes.sum() == world * len(namespace["sampler"])  # every sample of every rank
    expected_mean = float((np.asarray(losses) * batch_sizes).sum() / sum(batch_sizes))
    assert namespace["mean_loss"] == pytest.approx(expected_mean)


def _check_guide_recipe(rank: int, world: int) -> None:
    """The distributed guide's code blocks, as written, on a tiny BERT in every rank."""
    from _helpers import docs_fixtures as _docs_fixtures
    from _helpers import docs_runner

    page = docs_runner.ROOT / "docs" / "guides" / "distributed.md"

    def process_group(ctx: Any) -> dict[str, Any]:  # the real group of this test, not a new one
        from torch.utils.data import DataLoader, DistributedSampler

        dataset = ctx.namespace["dataset"]
        sampler = DistributedSampler(dataset, shuffle=False)
        loader = DataLoader(
            dataset,
            batch_size=_docs_fixtures.BATCH_SIZE,
            sampler=sampler,
            collate_fn=_docs_fixtures.collate,
        )
        return {"sampler": sampler, "loader": loader}

    original = _docs_fixtures.FIXTURES["process_group"]
    _docs_fixtures.FIXTURES["process_group"] = process_group
    root = Path(tempfile.mkdtemp(prefix=f"guide{rank}-"))
    runs = docs_runner.Runs(root)
    cwd = os.getcwd()
    try:
        run = runs.get(page)
        os.chdir(run.directory)  # as the docs runner does: relative paths land in a temp dir
        ran = []
        for index, step in enumerate(run.steps):
            block = step.block
            if block is not None and block.runs and not block.skip and block.language == "python":
                run.run_through(index)
                ran.append(step.line)
        namespace = run.module.__dict__
        assert len(ran) >= 2, ran
        preds = namespace["preds"]
        if rank:
            assert preds is None
            return
        model, dataset = namespace["model"], namespace["dataset"]
        assert preds["logits"].shape[0] == len(dataset)
        losses: list[float] = []
        for r in range(world):
            peer = _peer(namespace["sampler"], r)
            loader = torch.utils.data.DataLoader(
                dataset, _docs_fixtures.BATCH_SIZE, sampler=peer, collate_fn=_docs_fixtures.collate
            )
            with torch.no_grad():
                losses += [float(model(**batch).loss) for batch in loader]
        np.testing.assert_allclose(preds["loss"], losses, rtol=1e-5)
        _assert_mean_loss(namespace, losses, world)
        with torch.no_grad():
            for i in range(len(dataset)):
                one = _docs_fixtures.collate([dataset[i]])
                logits = model(**one).logits[0].numpy()
                np.testing.assert_allclose(preds["logits"][i, : len(logits)], logits, atol=1e-4)
                labels = preds["labels"][i]
                assert_same_tree(np.asarray(labels[: len(logits)]), one["labels"][0].numpy())
                assert (labels[len(logits) :] == -100).all()
    finally:
        os.chdir(cwd)
        _docs_fixtures.FIXTURES["process_group"] = original
        runs.close()
        shutil.rmtree(root, ignore_errors=True)


def _check_gather_uses_the_accumulators_options(rank: int, world: int) -> None:
    """gather(acc) pads with the Accumulator's pad_value (and uses its axis and ml_dtypes)
    unless the call passes its own."""
    from torch.utils.data import DataLoader, DistributedSampler

    dataset = list(range(11))
    sampler = DistributedSampler(dataset, shuffle=True, seed=3)
    acc = tonumpy.Accumulator(pad_value={"logits": -1.0})
    for batch in DataLoader(dataset, batch_size=2, sampler=sampler):
        acc.append(_eval_outputs(torch.as_tensor(batch)))
    inherited = gather(acc, sampler=sampler)  # raised on every rank before: no pad value
    given = gather(acc, sampler=sampler, pad_value={"logits": -1.0})
    assert_same_tree(inherited, given)
    assert (inherited["logits"] == -1.0).any()  # the batches differ in length: padded
    overridden = gather(acc, sampler=sampler, pad_value=-5.0)["logits"]
    differ = overridden != inherited["logits"]  # padding between ranks only: -5, not -1
    assert (overridden[differ] == -5.0).all()
    columns = tonumpy.Accumulator(axis=1, ml_dtypes=True)
    columns.append({"x": torch.full((2, rank + 1), rank, dtype=torch.bfloat16)})
    out = gather(columns)["x"]
    assert out.shape == (2, sum(r + 1 for r in range(world)))
    assert out.dtype.name == "bfloat16"  # kept bit-exact, as the Accumulator was asked


def _jagged(items: torch.Tensor) -> torch.Tensor:
    """A nested tensor with one row per dataset item: item i has i % 3 + 1 values, all i."""
    rows = [torch.full((int(i) % 3 + 1,), float(i)) for i in items]
    return torch.nested.nested_tensor(rows, layout=torch.jagged)


def _check_nested_tensor_rows_join_across_ranks(rank: int, world: int) -> None:
    """A nested tensor's rows join across batches and ranks into one list: in rank order, or
    in dataset order with sampler=, repeats dropped; from a tree or an Accumulator (20.3)."""
    import warnings

    from torch.utils.data import DataLoader, DistributedSampler

    warnings.filterwarnings("ignore", "The PyTorch API of nested tensors", UserWarning)
    mine = torch.arange(rank * 10, rank * 10 + rank + 1)
    out = gather({"nt": _jagged(mine)})
    order = [i for r in range(world) for i in range(r * 10, r * 10 + r + 1)]
    assert_same_tree(out["nt"], [np.full(i % 3 + 1, i, np.float32) for i in order])
    dataset = list(range(11))
    sampler = DistributedSampler(dataset, shuffle=True, seed=2)
    acc = tonumpy.Accumulator()
    for batch in DataLoader(dataset, batch_size=2, sampler=sampler):
        items = torch.as_tensor(batch)
        acc.append({"nt": _jagged(items), "item": items, "loss": items.float().mean()})
    expected = [np.full(i % 3 + 1, i, np.float32) for i in dataset]
    result = gather(acc, sampler=sampler)
    assert type(result["nt"]) is list
    assert_same_tree(result["nt"], expected)
    assert_same_tree(result["item"], np.arange(len(dataset)))
    plain = gather({"nt": _jagged(torch.tensor(list(sampler)))}, sampler=sampler)
    assert_same_tree(plain["nt"], expected)
    cut = gather({"nt": _jagged(torch.tensor(list(sampler)))}, sampler=sampler, num_items=4)
    assert_same_tree(cut["nt"], expected[:4])


def _check_batch_sizes_line_up_with_per_batch_values(rank: int, world: int) -> None:
    """gather(acc.batch_sizes) gives each batch's size in the order gather(acc, sampler=) gives
    the per-batch losses: their weighted mean is the per-sample mean loss (20.4)."""
    from torch.utils.data import DataLoader, DistributedSampler

    dataset = list(range(11))
    sampler = DistributedSampler(dataset, shuffle=False)
    acc = tonumpy.Accumulator(pad_value={"logits": -1.0})
    for batch in DataLoader(dataset, batch_size=3, sampler=sampler):  # the last batch is smaller
        acc.append(_eval_outputs(torch.as_tensor(batch)))
    out = gather(acc, sampler=sampler)
    sizes = gather(acc.batch_sizes)
    per_rank = [
        [torch.as_tensor(b) for b in DataLoader(dataset, 3, sampler=_peer(sampler, r))]
        for r in range(world)
    ]
    assert sizes.tolist() == [len(b) for batches in per_rank for b in batches]
    assert out["loss"].shape == sizes.shape
    seen = np.concatenate([b.numpy() for batches in per_rank for b in batches])  # repeats too
    mean = float((out["loss"] * sizes).sum() / sizes.sum())
    assert mean == pytest.approx(seen.mean())


CHECKS: dict[str, Callable[[int, int], None]] = {
    name.removeprefix("_check_"): fn
    for name, fn in sorted(globals().items())
    if name.startswith("_check_") and callable(fn)
}


def _cuda_leaves(rank: int, world: int) -> None:
    """CUDA leaves over gloo: each rank's tensors come to the host once, in the packed buffer."""
    device = torch.device("cuda", 0)
    base = torch.arange(6.0, device=device).reshape(2, 3) + rank
    tree = {
        "f": base,
        "bf16": base.to(torch.bfloat16),
        "conj": torch.complex(base, base).conj(),
        "t": base.T,
    }
    out = gather(tree, dst=0)
    if rank:
        assert out is None
        return
    host = [torch.arange(6.0).reshape(2, 3) + r for r in range(world)]
    assert_same_tree(out["f"], np.concatenate([h.numpy() for h in host]))
    assert_same_tree(out["bf16"], np.concatenate([h.numpy() for h in host]))
    assert_same_tree(
        out["conj"], np.concatenate([(h - 1j * h).numpy().astype(np.complex64) for h in host])
    )
    assert_same_tree(out["t"], np.concatenate([h.T.numpy() for h in host]))


def _worker(scenario: str, rank: int, world: int, out: Path) -> None:
    import torch.distributed as dist

    _init(rank, world, out)
    results: dict[str, str] = {}
    path = out / f"rank{rank}.json"
    if scenario == "hang":  # rank 0 waits in gather() for a rank that never calls it
        if rank == 0:
            gather({"x": torch.ones(1)})
        time.sleep(3600)
    checks = {"cuda_leaves": _cuda_leaves} if scenario == "cuda" else CHECKS
    for name, check in checks.items():
        try:
            check(rank, world)
            results[name] = "ok"
        except Exception:  # noqa: BLE001 - reported to the pytest side
            results[name] = traceback.format_exc()
        path.write_text(json.dumps(results))
    dist.destroy_process_group()


# ------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("check", sorted(CHECKS))
@pytest.mark.parametrize("world", WORLDS, ids=lambda w: f"world{w}")
def test_gather_across_ranks(world: int, check: str) -> None:
    """The check passes on every rank of a gloo group of this size."""
    results = _results(world)
    for rank in range(world):
        outcome = results[rank].get(check, "did not run: " + results[rank].get("__exit__", ""))
        assert outcome == "ok", f"rank {rank}:\n{outcome}"


def test_hanging_run_leaves_no_process_behind() -> None:
    """A run where one rank never calls gather() times out, and every worker is killed."""
    holder: list[Any] = []
    original = subprocess.Popen

    def recording(*args: Any, **kwargs: Any) -> Any:
        proc = original(*args, **kwargs)
        holder.append(proc)
        return proc

    subprocess.Popen = recording  # type: ignore[misc]
    try:
        with pytest.raises(TimeoutError):
            _launch(2, "hang", timeout=6.0)
    finally:
        subprocess.Popen = original  # type: ignore[misc]
    assert len(holder) == 2
    for proc in holder:
        assert proc.returncode is not None
        with pytest.raises(ProcessLookupError):
            os.killpg(proc.pid, 0)


@pytest.mark.cuda
def test_cuda_leaves_over_gloo() -> None:
    """Two ranks sharing one GPU gather CUDA leaves (bf16, conj, transposed) over gloo."""
    results, _ = _launch(2, "cuda", RUN_TIMEOUT)
    for rank in range(2):
        assert results[rank].get("cuda_leaves") == "ok", results[rank]


@pytest.mark.cuda
def test_cuda_without_process_group() -> None:
    """Without a process group, CUDA leaves are converted as by concat([tree])."""
    x = torch.arange(4.0, device="cuda").reshape(2, 2)
    out = gather({"x": x, "h": x.half().T})
    assert_same_tree(out["x"], np.arange(4.0, dtype=np.float32).reshape(2, 2))
    assert_same_tree(out["h"], np.arange(4.0, dtype=np.float16).reshape(2, 2).T)


def test_without_process_group() -> None:
    """Without init_process_group, gather is concat([tree]) and needs no torch.distributed."""
    import torch.distributed as dist

    assert not dist.is_initialized()
    tree = {"x": torch.ones(2, 3, requires_grad=True), "loss": torch.tensor(0.5), "tag": "a"}
    out = gather(tree)
    assert_same_tree(out["x"], np.ones((2, 3), dtype=np.float32))
    assert_same_tree(out["loss"], np.array([0.5], dtype=np.float32))
    assert out["tag"] == ["a"]
    assert gather(tree, dst=0) is not None
    with pytest.raises(ValueError, match="only rank is 0"):
        gather(tree, dst=1)


def test_without_process_group_sampler() -> None:
    """A one-replica sampler with shuffle puts rows back in dataset order."""
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(list(range(9)), num_replicas=1, rank=0, shuffle=True)
    items = torch.tensor(list(sampler))
    assert not torch.equal(items, torch.arange(9))
    assert_same_tree(gather({"i": items}, sampler=sampler)["i"], np.arange(9))
    assert_same_tree(gather({"i": items}, sampler=sampler, num_items=3)["i"], np.arange(3))
    with pytest.raises(ConversionError, match="sampler gives that rank 9"):
        gather({"i": items[:4]}, sampler=sampler)
    with pytest.raises(ConversionError, match=r"tree\['p'\]\.y has 4 rows along axis 0"):
        gather({"p": Point(items, items[:4])}, sampler=sampler)


@pytest.mark.parametrize("ml_dtypes", [False, True])
def test_without_process_group_odd_tensors_as_to_numpy(ml_dtypes: bool) -> None:
    """Tensors not sent as raw bytes (sparse, complex32, nested, grad) convert as to_numpy's."""
    sparse = torch.sparse_coo_tensor([[0, 2]], [1.5, -2.0], (4,), check_invariants=True)
    sparse = sparse.to(torch.bfloat16)
    nested = torch.nested.nested_tensor([torch.ones(2), torch.arange(3.0)])
    tree = {
        "sparse": sparse,
        "half_complex": torch.complex(torch.ones(2), -torch.ones(2)).to(torch.complex32),
        "grad": torch.ones(2, 2, dtype=torch.bfloat16, requires_grad=True),
        "nested": nested,
    }
    out = gather(tree, ml_dtypes=ml_dtypes)
    expected = tonumpy.to_numpy(tree, ml_dtypes=ml_dtypes)
    assert_same_tree(out["sparse"], expected["sparse"])
    assert_same_tree(out["half_complex"], expected["half_complex"])
    assert_same_tree(out["grad"], expected["grad"])
    assert len(out["nested"]) == 2
    for got, want in zip(out["nested"], expected["nested"], strict=True):
        assert_same_tree(got, want)


if __name__ == "__main__":
    _worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))


def test_rank_metadata_is_a_named_record_that_pickles() -> None:
    """A rank's metadata survives pickling (all_gather_object) with every field read by name."""
    leaves, spec = optree.tree_flatten({"a": torch.ones(2, 3), "b": 1.5})
    prep = prepare(leaves, spec, remote=True, ml_dtypes=False)
    sampler = SimpleNamespace(
        num_replicas=2, rank=1, total_size=10, shuffle=True, seed=0, epoch=3, dataset=range(9)
    )
    signature = _metadata.Signature(None, 0, None, True, False, None)
    meta = _metadata.payload(spec, prep.infos, signature, sampler, [False, True])
    back = pickle.loads(pickle.dumps(meta))
    assert isinstance(back, _metadata.RankMeta)
    assert back.protocol == _metadata.PROTOCOL
    assert back.error is None
    assert back.signature == signature
    assert back.signature.axis == 0
    assert back.sampler == SamplerInfo(2, 1, 10, True, 0, 3, 9, 5)
    assert back.sampler.num_samples == 5
    assert back.per_batch == (False, True)
    assert back.indices is None
    assert len(back.infos) == 2
    assert isinstance(back.infos[0], _metadata.LeafInfo)
    assert back.infos[0].shape == (2, 3)
    assert back.infos[0].form == "array"
    assert back.infos[0].rows(1) == 3
    assert back.infos[1].form == "object"
    _metadata.check_all([meta, back], None, 0)  # the same on both ranks: no error


def test_rank_metadata_of_another_protocol_names_it() -> None:
    """A rank running an older tonumpy (a plain tuple, protocol 3) gets the version error."""

    _, spec = optree.tree_flatten({"a": 1})
    signature = _metadata.Signature(None, 0, None, False, False, None)
    mine = _metadata.payload(spec, [], signature, None, [])
    old = (3, None, b"", 0, [], (None, 0, None, False, False, None), None, (), None)
    with pytest.raises(tonumpy.ConversionError, match="rank 1 speaks metadata protocol 3"):
        _metadata.check_all([mine, old], None, 0)  # type: ignore[list-item]
