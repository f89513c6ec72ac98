"""Predictions at scale: write throughput of Parquet and .npy directories against np.save.

The workload is an evaluation's predictions, ``{"logits": (N, L, V) float32, "hidden": (N, H)
float32, "labels": (N, L) int64}``, arriving in batches of 64 rows. Every route writes the same
bytes to a fresh temporary directory, and the time is the best of ``--repeat`` runs (the routes
take turns, so that a change in the machine's load hits every route):

* ``np.save``: one ``np.save`` per leaf of the whole result (the baseline: the same bytes,
  written with nothing around them);
* ``tonumpy.save(x.parquet)``: the whole result as a Parquet file (fixed-size lists, no
  compression), row groups of about 64 MiB;
* Parquet row groups as batches arrive: ``to_columns`` of each batch, one row group each
  (``tonumpy._parquet.RowGroupWriter``, what ``Accumulator(format="parquet")`` builds on);
* ``Accumulator(directory=)``: each batch appended to ``.npy`` files that grow, then
  ``result()``.

Reported: MB/s of array bytes and the ratio to ``np.save`` (higher is faster). Timings include
the page cache, not the disk (nothing is synced, for any route). Then the peak memory of the
two routes that write as batches arrive, each in a fresh process whose batches are made one at
a time and dropped once written: the growth of the peak resident size (VmHWM) over the loop,
against the size of one batch and of the whole result (Linux only), and pyarrow's own peak of
live allocations. The resident size also counts memory the C allocator keeps for reuse after
a batch is freed (glibc returns it on ``malloc_trim(0)``): it levels off, where pyarrow's live
allocations stay within a few batches.

    python benchmarks/scale.py --quick    # small sizes, one run: seconds, for CI
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
from tonumpy._parquet import RowGroupWriter, require_pyarrow  # noqa: E402

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
    """One streaming route, batches made one at a time: print the peak's growth in bytes."""
    from _memory import reset_peak, status

    folder = Path(tempfile.mkdtemp(prefix="tonumpy-scale-"))
    try:
        ROUTES[route](None, folder / "warm", _batches(True)[:1])  # code loaded, not measured
        reset_peak()
        base = status("VmRSS")
        pool = require_pyarrow()[0].default_memory_pool()
        before = pool.max_memory()
        ROUTES[route](None, folder / "out", _stream(quick))
        # pyarrow's own peak of live allocations (its pool), beside the process's peak RSS
        print(status("VmHWM") - base, max(pool.max_memory() - before, 0))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _memory_report(quick: bool, nbytes: int, batch_bytes: int) -> None:
    print(
        f"\n# Peak memory while writing batch by batch (one batch: {batch_bytes / 2**20:.1f} MiB)"
    )
    print(
        f"{'route':32} {'peak RSS growth MiB':>20} {'vs one batch':>13} {'vs result':>10} "
        f"{'pyarrow peak MiB':>17}"
    )
    for route in ("Parquet row groups per batch", "Accumulator(directory=)"):
        argv = [sys.executable, __file__, "--memory-child", route] + (["--quick"] * quick)
        out = subprocess.run(argv, capture_output=True, text=True, check=True)
        grown, arrow = map(int, out.stdout.strip().splitlines()[-1].split())
        print(
            f"{route:32} {grown / 2**20:20.1f} {grown / batch_bytes:12.1f}x "
            f"{grown / nbytes:9.2f}x {arrow / 2**20:17.1f}"
        )


def _np_save(result: dict[str, np.ndarray], folder: Path, _: Any) -> None:
    folder.mkdir()
    for name, array in result.items():
        np.save(folder / f"{name}.npy", array)


def _parquet_whole(result: dict[str, np.ndarray], folder: Path, _: Any) -> None:
    folder.mkdir()
    tonumpy.save(folder / "preds.parquet", result)


def _parquet_batches(_: Any, folder: Path, batches: Iterable[dict[str, torch.Tensor]]) -> None:
    folder.mkdir()
    with RowGroupWriter(folder / "preds.parquet") as writer:
        for batch in batches:
            writer.write(tonumpy.to_columns(batch))


def _npy_directory(_: Any, folder: Path, batches: Iterable[dict[str, torch.Tensor]]) -> None:
    acc = tonumpy.Accumulator(directory=folder)
    for batch in batches:
        acc.append(batch)
    acc.result()


ROUTES: dict[str, Callable[[Any, Path, Any], None]] = {
    "np.save (baseline)": _np_save,
    "tonumpy.save(.parquet)": _parquet_whole,
    "Parquet row groups per batch": _parquet_batches,
    "Accumulator(directory=)": _npy_directory,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one run")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--memory-child", metavar="ROUTE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        _memory_child(args.memory_child, args.quick)
        return
    repeat = 1 if args.quick else args.repeat
    batches = _batches(args.quick)
    require_pyarrow()  # imported once, before any timing (about a second, cold)
    warm = tonumpy.concat(batches[:1])
    for route in ROUTES.values():  # first uses load code (pyarrow's writer, ...): not timed
        folder = Path(tempfile.mkdtemp(prefix="tonumpy-scale-"))
        route(warm, folder / "out", batches[:1])
        shutil.rmtree(folder, ignore_errors=True)
    result = tonumpy.concat(batches)
    nbytes = sum(a.nbytes for a in result.values())
    print(f"# Write throughput, {nbytes / 2**20:.0f} MiB of predictions in batches of {BATCH}")
    print(f"torch {torch.__version__}, numpy {np.__version__}, {platform.platform()}")
    print(f"{'route':32} {'MB/s':>8} {'vs np.save':>11}")
    best = dict.fromkeys(ROUTES, float("inf"))
    for _ in range(repeat):  # routes interleaved: a change in the machine's load hits them all
        for name, route in ROUTES.items():
            folder = Path(tempfile.mkdtemp(prefix="tonumpy-scale-"))
            try:
                start = time.perf_counter()
                route(result, folder / "out", batches)
                best[name] = min(best[name], time.perf_counter() - start)
            finally:
                shutil.rmtree(folder, ignore_errors=True)
    baseline = nbytes / best["np.save (baseline)"] / 1e6
    for name, seconds in best.items():
        rate = nbytes / seconds / 1e6
        print(f"{name:32} {rate:8.0f} {rate / baseline:10.2f}x")
    del result
    _memory_report(args.quick, nbytes, sum(t.nbytes for t in batches[0].values()))


if __name__ == "__main__":
    main()
