"""Convert a torch.save checkpoint to .npz and to a .npy directory: time vs cp, memory vs size.

Writes a checkpoint of a few hundred tensors (1 GiB by default; 32 MiB with --quick) under a
temporary directory (never in the repository), then times, each in a fresh process:

* ``cp`` of the checkpoint (the floor: the same bytes read and written once);
* ``tonumpy.io.convert`` to ``.npz`` and to a directory of ``.npy`` files.

Each conversion runs in its own child process, which reports its wall time, its peak resident
set (VmHWM: everything resident, the memory-mapped checkpoint pages included) and its peak
*anonymous* resident memory (sampled every 5 ms: what the conversion itself allocated, page
cache excluded), both above the child's footprint right after ``import tonumpy``.

Run: python benchmarks/convert_checkpoint.py [--quick] [--size-mib N] [--tensors N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, sys, threading, time
def status():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon"):
                out[key] = int(value.split()[0]) * 1024
    return out
import tonumpy.io as tio
base = status()
peak = [base["RssAnon"]]
done = threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], status()["RssAnon"])
        time.sleep(0.005)
thread = threading.Thread(target=sample, daemon=True)
thread.start()
start = time.perf_counter()
tio.convert(sys.argv[1], sys.argv[2], overwrite=True, ml_dtypes=sys.argv[3] == "1")
wall = time.perf_counter() - start
done.set(); thread.join()
end = status()
print(json.dumps({"wall": wall, "base_rss": base["VmRSS"], "hwm": end["VmHWM"],
                  "base_anon": base["RssAnon"], "peak_anon": max(peak[0], end["RssAnon"])}))
"""


def make_checkpoint(path: Path, size: int, n_tensors: int) -> tuple[int, int]:
    """A state_dict-like checkpoint: mostly float32 matrices, some bfloat16, a few small ones.

    Returns the number of tensors and the largest tensor's size in bytes.
    """
    import torch

    torch.manual_seed(0)
    state: dict[str, torch.Tensor] = {}
    big = n_tensors * 2 // 3
    per = size // big
    cols = 1024
    largest = 0
    for i in range(n_tensors):
        if i < big:
            dtype = torch.bfloat16 if i % 8 == 0 else torch.float32
            rows = max(per // (cols * 4), 1)
            if dtype == torch.bfloat16:
                rows *= 2  # the same bytes as the float32 ones
            t = torch.empty(rows, cols, dtype=dtype).uniform_(-1, 1)
            state[f"model.layers.{i // 4}.block{i % 4}.weight"] = t
        else:
            t = torch.randn(cols)
            state[f"model.layers.{i % big // 4}.norm{i}.bias"] = t
        largest = max(largest, t.numel() * t.element_size())
    torch.save(state, path)
    return len(state), largest


def timed(command: list[str]) -> float:
    os.sync()  # no earlier run's dirty pages to flush while this one is timed
    start = time.perf_counter()
    subprocess.run(command, check=True)
    return time.perf_counter() - start


def convert_in_child(src: Path, dst: Path, *, ml_dtypes: bool) -> dict[str, float]:
    os.sync()
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(src), str(dst), "1" if ml_dtypes else "0"],
        check=True,
        capture_output=True,
        text=True,
    )
    data: dict[str, float] = json.loads(result.stdout)
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="32 MiB, 60 tensors: seconds")
    parser.add_argument("--size-mib", type=int, default=None)
    parser.add_argument("--tensors", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=None, help="runs of each (best is kept)")
    args = parser.parse_args()
    size = (args.size_mib or (32 if args.quick else 1024)) << 20
    n_tensors = args.tensors or (60 if args.quick else 300)
    repeat = args.repeat or (1 if args.quick else 2)

    folder = Path(tempfile.mkdtemp(prefix="tonumpy-bench-"))
    try:
        src = folder / "checkpoint.pt"
        n, largest = make_checkpoint(src, size, n_tensors)
        file_size = src.stat().st_size
        subprocess.run(["cat", str(src)], check=True, stdout=subprocess.DEVNULL)  # warm cache
        cp_time = min(timed(["cp", str(src), str(folder / "copy.pt")]) for _ in range(repeat))
        (folder / "copy.pt").unlink()
        rows = []
        for label, dst, ml in [
            (".npz", folder / "out.npz", False),
            (".npz --ml-dtypes", folder / "exact.npz", True),
            (".npy directory", folder / "out", False),
        ]:
            runs = [convert_in_child(src, dst, ml_dtypes=ml) for _ in range(repeat)]
            best = min(runs, key=lambda r: r["wall"])
            out_size = (
                sum(p.stat().st_size for p in dst.iterdir()) if dst.is_dir() else dst.stat().st_size
            )
            rows.append((label, best, out_size))
            if dst.is_dir():
                shutil.rmtree(dst)
            else:
                dst.unlink()
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    mib = 1 << 20
    print(
        f"checkpoint: {n} tensors, {file_size / mib:.0f} MiB, largest tensor "
        f"{largest / mib:.1f} MiB (12% bfloat16); cp: {cp_time:.2f} s; "
        f"{os.cpu_count()} CPUs\n"
    )
    print(
        "| to | wall time | vs `cp` | output | peak RSS above import | / file size "
        "| peak anonymous memory above import | / largest tensor |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, r, out_size in rows:
        rss = r["hwm"] - r["base_rss"]
        anon = r["peak_anon"] - r["base_anon"]
        print(
            f"| {label} | {r['wall']:.2f} s | {r['wall'] / cp_time:.1f}x "
            f"| {out_size / mib:.0f} MiB | {rss / mib:.0f} MiB | {rss / file_size:.2f} "
            f"| {anon / mib:.0f} MiB | {anon / largest:.1f} |"
        )


if __name__ == "__main__":
    main()
