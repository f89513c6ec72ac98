"""Write throughput of ``.npy`` directories (``Accumulator(directory=)``) against ``np.save``.

Run::

    python benchmarks/shards.py            # 256 MiB of predictions, 5 repetitions
    python benchmarks/shards.py --quick    # 8 MiB, 2 repetitions: seconds, for CI

The workload is an evaluation's predictions: ``--batches`` batches of 32 rows, each row float32
logits ``(seq, width)``, int64 labels ``(seq,)`` and a 0-d loss per batch. Measured, each into a
fresh directory, median over the repetitions (after one untimed run):

* **np.save**: the final arrays, already in memory, each written once with ``np.save`` (the
  fastest way to put those bytes in files; it needs them all in memory first);
* **Accumulator(directory=)**: the batches appended one by one (each batch's rows written to its
  leaf's file, the header and the progress log updated), then ``close()``;
* **shards, index=**: the same batches dealt to 4 ranks' shards
  (``Accumulator(directory=, shard=(rank, 4))``, appended with ``index=``), then each closed;
* **read the set**: ``tonumpy.load`` of those 4 shards, merged in dataset order, against
  ``np.load`` of the ``np.save`` files (memory-mapped: the read time of the bytes is compared by
  summing every array).

Times are wall-clock seconds on the page cache (no ``fsync``: the same for every writer). The
result is a Markdown table on standard output: MiB/s and the ratio to ``np.save``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import tonumpy

ROWS = 32
WORLD = 4


def _batches(n: int, seq: int, width: int) -> list[tuple[dict[str, torch.Tensor], np.ndarray]]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for b in range(n):
        index = np.arange(b * ROWS, (b + 1) * ROWS)
        out.append(
            (
                {
                    "logits": torch.randn(ROWS, seq, width, generator=gen),
                    "labels": torch.randint(0, width, (ROWS, seq), generator=gen),
                    "loss": torch.rand((), generator=gen),
                },
                index,
            )
        )
    return out


def _median(fn: Callable[[Path], None], repeat: int) -> float:
    """The median time of ``fn`` into a fresh directory, after one untimed run (imports)."""
    times = []
    for i in range(repeat + 1):
        folder = Path(tempfile.mkdtemp(prefix="tonumpy-shards-"))
        try:
            start = time.perf_counter()
            fn(folder)
            if i:
                times.append(time.perf_counter() - start)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 MiB, 2 repetitions (CI)")
    parser.add_argument("--batches", type=int, default=None)
    args = parser.parse_args()
    seq, width = (16, 128) if args.quick else (64, 256)
    n = args.batches or (16 if args.quick else 128)
    repeat = 2 if args.quick else 5
    batches = _batches(n, seq, width)
    final = {
        "logits": np.concatenate([b["logits"].numpy() for b, _ in batches]),
        "labels": np.concatenate([b["labels"].numpy() for b, _ in batches]),
        "loss": np.array([b["loss"].item() for b, _ in batches], dtype=np.float32),
    }
    nbytes = sum(a.nbytes for a in final.values())

    def np_save(folder: Path) -> None:
        for name, array in final.items():
            np.save(folder / f"{name}.npy", array)

    def directory(folder: Path) -> None:
        acc = tonumpy.Accumulator(directory=folder / "d")
        for batch, _ in batches:
            acc.append(batch)
        acc.close()

    def shards(folder: Path) -> None:
        accs = [tonumpy.Accumulator(directory=folder / "s", shard=(r, WORLD)) for r in range(WORLD)]
        for b, (batch, index) in enumerate(batches):
            accs[b % WORLD].append(batch, index=index)
        for acc in accs:
            acc.close(num_items=n * ROWS)

    rows = [("np.save (arrays in memory)", _median(np_save, repeat))]
    rows.append(("Accumulator(directory=), batch by batch", _median(directory, repeat)))
    rows.append((f"{WORLD} shards, index=, batch by batch", _median(shards, repeat)))

    # reading: one set of shards and one np.save directory, written once
    folder = Path(tempfile.mkdtemp(prefix="tonumpy-shards-read-"))
    try:
        shards(folder)
        np_save(folder)
        loaded = tonumpy.load(folder / "s")
        assert np.array_equal(loaded["logits"], final["logits"])  # the set is the data
        assert np.array_equal(loaded["labels"], final["labels"])

        def read_set(_: Path) -> None:
            tree = tonumpy.load(folder / "s")
            float(tree["logits"].sum())

        def read_np(_: Path) -> None:
            float(np.load(folder / "logits.npy", mmap_mode="r").sum())
            np.load(folder / "labels.npy", mmap_mode="r")
            np.load(folder / "loss.npy")

        read_rows = [
            ("np.load + sum", _median(read_np, repeat)),
            (f"tonumpy.load of {WORLD} shards + sum", _median(read_set, repeat)),
        ]
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    mib = nbytes / 2**20
    print(
        f"\n{n} batches of {ROWS} rows: {mib:.1f} MiB ({seq}x{width} float32 logits, int64 labels)"
    )
    print("\n| write | seconds | MiB/s | time / np.save |")
    print("| --- | --- | --- | --- |")
    base = rows[0][1]
    for name, seconds in rows:
        print(f"| {name} | {seconds:.3f} | {mib / seconds:,.0f} | {seconds / base:.2f} |")
    print("\n| read | seconds | time / np.load |")
    print("| --- | --- | --- |")
    for name, seconds in read_rows:
        print(f"| {name} | {seconds:.3f} | {seconds / read_rows[0][1]:.2f} |")


if __name__ == "__main__":
    main()
