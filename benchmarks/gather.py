"""Gathering a 1,000-leaf tree over 2 CPU ranks: tonumpy.gather vs accelerate's per-leaf pattern.

Run::

    python benchmarks/gather.py            # 1,000 leaves, 20 repetitions
    python benchmarks/gather.py --quick    # 200 leaves, 3 repetitions: seconds, for CI

Two worker processes (this file, run with ``--worker``) join a gloo group on 127.0.0.1. Each
holds a tree of ``--leaves`` tensors (float32 ``(n, 8)`` logits, int64 ``(n,)`` labels and
float16 ``(n, 4)`` scores, in turn) with a different number of rows per rank (rank 0: 33, rank 1:
29), so that every leaf needs padding before a plain ``all_gather`` will take it. Measured:

* **tonumpy**: ``tonumpy.gather(tree)``: exact rows, NumPy out;
* **accelerate**: ``accelerate.utils.pad_across_processes(tree)`` then
  ``accelerate.utils.gather(tree)``, then ``tonumpy.to_numpy`` of the result (accelerate keeps
  the padding rows and returns tensors). When accelerate is not importable, a faithful
  reimplementation of those two functions' per-leaf pattern (all_gather of the shape, pad,
  all_gather of the tensor) is timed instead, and labelled so.

Collectives are counted by wrapping ``torch.distributed``'s ``all_gather``,
``all_gather_into_tensor``, ``gather`` and ``broadcast`` (calls made inside
``all_gather_object`` included). Times are the median over the repetitions, each started after a
barrier, on rank 0. The result is a Markdown table on standard output.

Then the destination's memory (issue 15): each rank holds predictions of an evaluation
(``(rows, 128, 1000)`` float32 logits, int64 labels, a loss; rank 0 a few more rows than rank 1;
``--quick``: ``(rows, 64, 500)``) and ``tonumpy.gather(tree, dst=0)`` runs once per pair of fresh
processes, with all the data in one round (``chunk_bytes`` larger than the data: how ``gather``
worked before rounds), in rounds of the default ``chunk_bytes`` (64 MiB per round, 32 MiB per
rank; ``--quick``: 1 MiB per rank), and in rounds into ``directory=``. Reported: rank 0's peak
resident memory during the call (VmHWM, reset just before it) above its resident memory before
it, next to the result's size.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

WORLD = 2
ROWS = (33, 29)
#: the memory test's rows per rank, sequence length and width of the logits: full, --quick
MEMORY_SIZES = {False: ((600, 580), 128, 1000), True: ((40, 38), 64, 500)}
MEMORY_MODES = {
    "one round": "all at once (one round: as before rounds)",
    "rounds": "in rounds of `chunk_bytes`",
    "directory": "in rounds, into `directory=`",
}
_COUNTED = ("all_gather", "all_gather_into_tensor", "gather", "broadcast")


def _tree(rank: int, leaves: int) -> dict[str, Any]:
    import torch

    n = ROWS[rank]
    generator = torch.Generator().manual_seed(rank)
    tree: dict[str, Any] = {}
    for i in range(leaves):
        kind = i % 3
        if kind == 0:
            tree[f"logits{i}"] = torch.randn(n, 8, generator=generator)
        elif kind == 1:
            tree[f"labels{i}"] = torch.randint(0, 10, (n,), generator=generator)
        else:
            tree[f"scores{i}"] = torch.randn(n, 4, generator=generator).half()
    return tree


class _Counter:
    """Counts calls of the collectives in torch.distributed (and its c10d module)."""

    def __init__(self) -> None:
        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d

        self.modules = (dist, c10d)
        self.originals = {name: getattr(c10d, name) for name in _COUNTED}
        self.calls = 0

    def _wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return fn(*args, **kwargs)

        return call

    def __enter__(self) -> _Counter:
        for name, fn in self.originals.items():
            for module in self.modules:
                setattr(module, name, self._wrap(fn))
        return self

    def __exit__(self, *exc: object) -> None:
        for name, fn in self.originals.items():
            for module in self.modules:
                setattr(module, name, fn)


def _per_leaf_reimplementation() -> Callable[[Any], Any]:
    """accelerate's pad_across_processes + gather, one leaf at a time (gloo path)."""
    import torch
    import torch.distributed as dist

    import tonumpy

    def pad_then_gather(tensor: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size()
        size = torch.tensor(tensor.shape)[None]
        sizes = [torch.empty_like(size) for _ in range(world)]
        dist.all_gather(sizes, size)
        max_size = max(int(s[0, 0]) for s in sizes)
        if max_size != tensor.shape[0]:
            padded = tensor.new_zeros((max_size, *tensor.shape[1:]))
            padded[: tensor.shape[0]] = tensor
            tensor = padded
        out = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(out, tensor.contiguous())
        return torch.cat(out, dim=0)

    def run(tree: Any) -> Any:
        return tonumpy.to_numpy({k: pad_then_gather(v) for k, v in tree.items()})

    return run


def _accelerate_pattern() -> tuple[str, Callable[[Any], Any]]:
    import tonumpy

    try:
        from accelerate import PartialState
        from accelerate.utils import gather, pad_across_processes
    except ImportError:
        return "per-leaf pattern (accelerate not installed: reimplemented)", (
            _per_leaf_reimplementation()
        )
    import accelerate

    PartialState(cpu=True)  # picks up the process group that is already initialised

    def run(tree: Any) -> Any:
        return tonumpy.to_numpy(gather(pad_across_processes(tree, dim=0)))

    return f"accelerate {accelerate.__version__} pad_across_processes + gather", run


def _measure(fn: Callable[[], Any], repeats: int) -> tuple[float, int]:
    import torch.distributed as dist

    fn()  # warm up
    with _Counter() as counter:
        fn()
    calls = counter.calls
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), calls


def _worker(rank: int, port: int, leaves: int, repeats: int, out: Path) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        LOCAL_WORLD_SIZE=str(WORLD),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    import numpy as np
    import torch
    import torch.distributed as dist

    import tonumpy

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    tree = _tree(rank, leaves)
    label, peer = _accelerate_pattern()

    ours = tonumpy.gather(tree)
    theirs = peer(tree)
    key = "logits0"
    expected = np.concatenate([_tree(r, 1)[key].numpy() for r in range(WORLD)])
    np.testing.assert_array_equal(ours[key], expected)
    assert theirs[key].shape[0] == WORLD * max(ROWS)  # padding rows kept

    t_ours, c_ours = _measure(lambda: tonumpy.gather(tree), repeats)
    t_peer, c_peer = _measure(lambda: peer(tree), repeats)
    if rank == 0:
        result = {
            "leaves": leaves,
            "repeats": repeats,
            "peer": label,
            "tonumpy": {"seconds": t_ours, "collectives": c_ours},
            "other": {"seconds": t_peer, "collectives": c_peer},
            "torch": torch.__version__,
        }
        (out / "result.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def _memory_worker(rank: int, port: int, mode: str, quick: bool, out: Path) -> None:
    """Gather one evaluation's predictions to rank 0 in ``mode``; rank 0 reports its peak."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import numpy as np
    import torch
    import torch.distributed as dist

    import tonumpy
    from _memory import reset_peak, status
    from tonumpy import distributed

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    rows, length, width = MEMORY_SIZES[quick]
    generator = torch.Generator().manual_seed(rank)
    tree = {
        "logits": torch.randn(rows[rank], length, width, generator=generator),
        "labels": torch.randint(0, width, (rows[rank], length), generator=generator),
        "loss": torch.tensor(float(rank)),
    }
    chunk = (1 << 20) if quick else max(distributed.ROUND_BYTES // WORLD, distributed.MIN_CHUNK)
    options: dict[str, Any] = {"chunk_bytes": chunk if quick else None}
    if mode == "one round":
        options["chunk_bytes"] = 1 << 62
    folder = Path(tempfile.mkdtemp(prefix="gathered-", dir=out))
    if mode == "directory":
        options["directory"] = folder / "preds"
    tonumpy.gather({"warm": torch.ones(1)}, dst=0)  # first-call imports and set-up, not counted
    dist.barrier()
    base = status("VmRSS")
    reset_peak()
    start = time.perf_counter()
    result = tonumpy.gather(tree, dst=0, **options)
    seconds = time.perf_counter() - start
    peak = status("VmHWM") - base
    if rank == 0:
        assert result is not None
        np.testing.assert_array_equal(result["logits"][: rows[0]], tree["logits"].numpy())
        size = sum(result[key].nbytes for key in ("logits", "labels", "loss"))
        report = {"peak": peak, "size": size, "seconds": seconds, "chunk": chunk}
        (out / "result.json").write_text(json.dumps(report))
    del result
    dist.barrier()
    shutil.rmtree(folder, ignore_errors=True)
    dist.destroy_process_group()


def _run(extra: list[str], timeout: float) -> dict[str, Any]:
    """Run the two workers of this file with ``extra`` arguments; rank 0's result."""
    out = Path(tempfile.mkdtemp(prefix="tonumpy-gather-bench-"))
    port = _free_port()
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, *extra, str(rank), str(port), str(out)],
            start_new_session=True,
            env=env,
        )
        for rank in range(WORLD)
    ]
    try:
        deadline = time.monotonic() + timeout
        for proc in procs:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.01))
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    try:
        if any(proc.returncode for proc in procs):
            sys.exit("a worker failed")
        result: dict[str, Any] = json.loads((out / "result.json").read_text())
        return result
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _memory_report(quick: bool, timeout: float) -> None:
    rows, length, width = MEMORY_SIZES[quick]
    results = {}
    for mode in MEMORY_MODES:
        flag = ["--quick"] if quick else []
        results[mode] = _run([*flag, "--memory-worker", mode], timeout)
    chunk = results["rounds"]["chunk"]
    size = results["rounds"]["size"]
    print(
        f"\nDestination memory: 2 CPU ranks, logits ({rows[0]} and {rows[1]}, {length}, {width}) "
        f"float32, labels, a loss; result {_mib(size)}; chunk_bytes {_mib(chunk)}\n"
    )
    print("| `gather(tree, dst=0)` | peak memory on rank 0 during the call | / result | seconds |")
    print("|---|---:|---:|---:|")
    for mode, label in MEMORY_MODES.items():
        r = results[mode]
        print(f"| {label} | {_mib(r['peak'])} | {r['peak'] / size:.2f} | {r['seconds']:.2f} |")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200 leaves, 3 repetitions")
    parser.add_argument("--leaves", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument(
        "--worker", nargs=3, metavar=("RANK", "PORT", "OUT"), help=argparse.SUPPRESS
    )
    parser.add_argument(
        "--memory-worker", nargs=4, metavar=("MODE", "RANK", "PORT", "OUT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    leaves = args.leaves or (200 if args.quick else 1000)
    repeats = args.repeats or (3 if args.quick else 20)
    if args.worker:
        rank, port, out = args.worker
        _worker(int(rank), int(port), leaves, repeats, Path(out))
        return
    if args.memory_worker:
        mode, rank, port, out = args.memory_worker
        _memory_worker(int(rank), int(port), mode, args.quick, Path(out))
        return

    extra = ["--leaves", str(leaves), "--repeats", str(repeats), "--worker"]
    result = _run(extra, args.timeout)
    ours, other = result["tonumpy"], result["other"]
    print(
        f"{result['leaves']} leaves, 2 CPU ranks (gloo), rows {ROWS[0]} and {ROWS[1]}, "
        f"median of {result['repeats']}, torch {result['torch']}\n"
    )
    print("| | collectives per call | time per call | time vs tonumpy |")
    print("|---|---:|---:|---:|")
    print(f"| `tonumpy.gather` | {ours['collectives']} | {ours['seconds'] * 1e3:.1f} ms | 1.0x |")
    print(
        f"| {result['peer']} | {other['collectives']} | {other['seconds'] * 1e3:.1f} ms | "
        f"{other['seconds'] / ours['seconds']:.1f}x |"
    )
    print(
        f"\nCollectives ratio: {other['collectives'] / ours['collectives']:.0f}x; "
        f"time ratio: {other['seconds'] / ours['seconds']:.1f}x"
    )
    _memory_report(args.quick, args.timeout)


if __name__ == "__main__":
    main()
