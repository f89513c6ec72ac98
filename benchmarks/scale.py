"""Predictions at scale: the four routes of the guide, measured on one workload in one run.

The workload is an evaluation's predictions, ``{"logits": (N, L, V) float32, "hidden": (N, H)
float32, "labels": (N, L) int64}``, arriving in batches of 64 rows. Every route writes the same
predictions to a fresh temporary directory; the time is the best of ``--repeat`` runs (the
routes take turns, so that a change in the machine's load hits every route):

* ``np.save``: one ``np.save`` per leaf of the whole result, already in memory (the baseline:
  the same bytes, written with nothing around them);
* ``tonumpy.save(.parquet)``: that result as one Parquet file (fixed-size lists, no compression);
* one process, ``Accumulator(directory=)``: each batch appended to ``.npy`` files that grow,
  then ``close()``;
* one process, ``Accumulator(directory=, format="parquet")``: a row group per batch, then
  ``close()``;
* ``gather``, 2 gloo ranks: each rank (a process of its own, started before the clock) appends
  its half of the batches to an in-memory ``Accumulator`` with ``index=``, then
  ``tonumpy.gather(acc, dst=0)`` and ``np.save`` of the result on rank 0 (time on rank 0, from
  a barrier to the last file written);
* rank shards, 2 ranks, ``.npy`` and Parquet: each rank's half appended to its own shard with
  ``index=`` (``shard=(rank, 2)``), then ``close()``; the two ranks run one after the other in
  this process, so the time is their total work (with a process per rank, the wall time is
  about half of it);
* HF datasets: ``Dataset.map(batched=True)`` whose function returns ``to_columns`` of the
  batch (the Ray Data / datasets route; Ray itself is not timed: starting it takes longer than
  the whole workload here), then ``to_parquet``.

Reported: MB/s of array bytes and the ratio to ``np.save`` (higher is faster). Timings include
the page cache, not the disk (nothing is synced, for any route). Then the peak memory of each
route in a fresh process whose batches are made one at a time and dropped once handed over: the
growth of the peak resident size (VmHWM) over the route, against the size of one batch and of
the whole result (Linux only); for ``gather``, rank 0's. The resident size also counts memory
the C allocator keeps for reuse after a batch is freed (glibc returns it on
``malloc_trim(0)``). ``--quick`` leaves out the memory of ``gather``.

    python benchmarks/scale.py --quick    # small sizes, one run: about a minute, for CI
    python benchmarks/scale.py            # 256 MiB of predictions, best of 3
"""

from __future__ import annotations

import argparse
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

import tonumpy  # noqa: E402
from tonumpy._rowfiles._parquet import require_pyarrow  # noqa: E402

BATCH = 64
SIZES = {False: (4096, 128, 112, 64), True: (256, 16, 32, 16)}  # rows, L, V, H


def _stream(quick: bool) -> Iterator[dict[str, torch.Tensor]]:
    rows, length, vocab, hidden = SIZES[quick]
    gen = torch.Generator().manual_seed(0)
    for _ in range(rows // BATCH):
        yield {
            "logits": torch.randn(BATCH, length, vocab, generator=gen),
            "hidden": torch.randn(BATCH, hidden, generator=gen),
            "labels": torch.randint(0, vocab, (BATCH, length), generator=gen),
        }


def _batches(quick: bool) -> list[dict[str, torch.Tensor]]:
    return list(_stream(quick))


def _memory_child(route: str, quick: bool) -> None:
    """One route, batches made one at a time: print the peak's growth in bytes."""
    from _memory import reset_peak, status

    folder = Path(tempfile.mkdtemp(prefix="tonumpy-scale-"))
    try:
        if route == GATHER:
            print(_gather(folder, quick, repeat=1, memory=True))
            return
        rows, _ROWS[0] = _ROWS[0], BATCH
        ROUTES[route](None, folder / "warm", _batches(True)[:1])  # code loaded, not measured
        _ROWS[0] = rows
        stream = _stream(quick)
        reset_peak()
        base = status("VmRSS")
        ROUTES[route](None, folder / "out", stream)
        print(status("VmHWM") - base)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _memory_report(quick: bool, nbytes: int, batch_bytes: int) -> None:
    print(f"\n# Peak memory of each route (one batch: {batch_bytes / 2**20:.1f} MiB)")
    print(f"{'route':44} {'peak RSS growth MiB':>20} {'vs one batch':>13} {'vs result':>10}")
    for route in STREAMING if quick else [*STREAMING, GATHER]:  # --quick: 2 fewer processes
        argv = [sys.executable, __file__, "--memory-child", route] + (["--quick"] * quick)
        out = subprocess.run(argv, capture_output=True, text=True, check=True)
        grown = int(float(out.stdout.strip().splitlines()[-1]))
        print(
            f"{route:44} {grown / 2**20:20.1f} {grown / batch_bytes:12.1f}x {grown / nbytes:9.2f}x"
        )


def _np_save(result: dict[str, np.ndarray], folder: Path, _: Any) -> None:
    folder.mkdir()
    for name, array in result.items():
        np.save(folder / f"{name}.npy", array)


def _parquet_whole(result: dict[str, np.ndarray], folder: Path, _: Any) -> None:
    folder.mkdir()
    tonumpy.save(folder / "preds.parquet", result)


def _one_process(format: str) -> Callable[[Any, Path, Any], None]:
    def route(_: Any, folder: Path, batches: Iterable[dict[str, torch.Tensor]]) -> None:
        acc = tonumpy.Accumulator(directory=folder, format=format)
        for batch in batches:
            acc.append(batch)
        acc.close()

    return route


def _shards(format: str, world: int = 2) -> Callable[[Any, Path, Any], None]:
    def route(_: Any, folder: Path, batches: Iterable[dict[str, torch.Tensor]]) -> None:
        accs = [
            tonumpy.Accumulator(directory=folder, shard=(rank, world), format=format)
            for rank in range(world)
        ]
        rows = 0
        for i, batch in enumerate(batches):  # batch i goes to rank i % world, as dealt
            accs[i % world].append(batch, index=np.arange(rows, rows + BATCH))
            rows += BATCH
        for acc in accs:
            acc.close(num_items=rows)

    return route


def _datasets(_: Any, folder: Path, batches: Iterable[dict[str, torch.Tensor]]) -> None:
    import datasets

    datasets.disable_progress_bars()

    source = iter(batches)

    def predict(batch: dict[str, list[int]]) -> dict[str, np.ndarray]:
        return tonumpy.to_columns(next(source))  # the model's output for these rows

    count = _ROWS[0]
    dataset = datasets.Dataset.from_dict({"idx": list(range(count))})
    mapped = dataset.map(
        predict,
        batched=True,
        batch_size=BATCH,
        remove_columns=["idx"],
        cache_file_name=str(folder / "cache" / "map.arrow"),
    )
    mapped.to_parquet(str(folder / "preds.parquet"))


def _gather_rank(  # noqa: PLR0917 - the arguments torch.multiprocessing passes
    rank: int, store: str, quick: bool, repeat: int, out: str, memory: bool
) -> None:
    import torch.distributed as dist

    from _memory import reset_peak, status

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        times = []
        for r in range(repeat):
            folder = Path(out) / f"run{r}"
            stream = (b for i, b in enumerate(_stream(quick)) if i % 2 == rank)
            dist.barrier()
            if memory:
                reset_peak()
                base = status("VmRSS")
            start = time.perf_counter()
            acc = tonumpy.Accumulator()
            for i, batch in enumerate(stream):
                first = (2 * i + rank) * BATCH
                acc.append(batch, index=np.arange(first, first + BATCH))
            result = tonumpy.gather(acc, dst=0)
            if rank == 0:
                _np_save(result, folder, None)
            del acc, result
            dist.barrier()
            times.append(time.perf_counter() - start)
            if rank == 0:
                shutil.rmtree(folder, ignore_errors=True)
        if rank == 0:
            value = status("VmHWM") - base if memory else min(times)
            Path(out, "measured").write_text(str(value))
    finally:
        dist.destroy_process_group()


def _gather(folder: Path, quick: bool, repeat: int, memory: bool = False) -> float:
    """Run the gather route on 2 gloo ranks; rank 0's best time (or peak growth)."""
    import torch.multiprocessing as mp

    folder.mkdir(parents=True, exist_ok=True)
    store = folder / "store"
    mp.start_processes(
        _gather_rank,
        args=(str(store), quick, repeat, str(folder), memory),
        nprocs=2,
        start_method="spawn",
    )
    return float((folder / "measured").read_text())


GATHER = "gather, 2 gloo ranks, then np.save"
ROUTES: dict[str, Callable[[Any, Path, Any], None]] = {
    "np.save (baseline)": _np_save,
    "tonumpy.save(.parquet)": _parquet_whole,
    "one process, Accumulator(directory=) .npy": _one_process("npy"),
    "one process, Accumulator(format='parquet')": _one_process("parquet"),
    "rank shards, 2 ranks, .npy": _shards("npy"),
    "rank shards, 2 ranks, Parquet": _shards("parquet"),
    "HF datasets map(to_columns), to_parquet": _datasets,
}
STREAMING = [
    name for name in ROUTES if name not in ("np.save (baseline)", "tonumpy.save(.parquet)")
]
_ROWS = [0]  # the workload's rows (the datasets route makes a dataset of that length)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one run")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--memory-child", metavar="ROUTE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    _ROWS[0] = SIZES[args.quick][0] // BATCH * BATCH
    if args.memory_child:
        _memory_child(args.memory_child, args.quick)
        return
    repeat = 1 if args.quick else args.repeat
    batches = _batches(args.quick)
    require_pyarrow()  # imported once, before any timing (about a second, cold)
    import datasets  # imported before any timing, as pyarrow

    datasets.disable_progress_bars()

    result = tonumpy.concat(batches)
    _ROWS[0] = len(batches) * BATCH
    for route in ROUTES.values():  # first uses load code (pyarrow's writer, ...): not timed
        folder = Path(tempfile.mkdtemp(prefix="tonumpy-scale-"))
        _ROWS[0] = BATCH
        route(tonumpy.concat(batches[:1]), folder / "out", batches[:1])
        _ROWS[0] = len(batches) * BATCH
        shutil.rmtree(folder, ignore_errors=True)
    nbytes = sum(a.nbytes for a in result.values())
    print(f"# Write throughput, {nbytes / 2**20:.0f} MiB of predictions in batches of {BATCH}")
    print(f"torch {torch.__version__}, numpy {np.__version__}, {platform.platform()}")
    print(f"{'route':44} {'MB/s':>8} {'vs np.save':>11}")
    best = dict.fromkeys([*ROUTES, GATHER], float("inf"))
    for _ in range(repeat):  # routes interleaved: a change in the machine's load hits them all
        for name, route in ROUTES.items():
            folder = Path(tempfile.mkdtemp(prefix="tonumpy-scale-"))
            try:
                start = time.perf_counter()
                route(result, folder / "out", batches)
                best[name] = min(best[name], time.perf_counter() - start)
            finally:
                shutil.rmtree(folder, ignore_errors=True)
    folder = Path(tempfile.mkdtemp(prefix="tonumpy-scale-"))
    try:  # two processes, started once: each repetition starts at a barrier
        best[GATHER] = _gather(folder, args.quick, repeat)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    baseline = nbytes / best["np.save (baseline)"] / 1e6
    for name, seconds in best.items():
        rate = nbytes / seconds / 1e6
        print(f"{name:44} {rate:8.0f} {rate / baseline:10.2f}x")
    del result
    _memory_report(args.quick, nbytes, sum(t.nbytes for t in batches[0].values()))


if __name__ == "__main__":
    main()
