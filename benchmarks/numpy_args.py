"""``numpy_args``: the logging guide's recipe against the same function calling ``float()``.

The logging guide decorates ``log_scalars(writer, step, metrics)`` with
``@tonumpy.numpy_args(scalars=True)``; the plain version converts each value with ``float()``
itself. Both log the same metrics (0-d tensors) through the same logger, so the ratio is what
the decorator costs per call. Two loggers:

* ``SummaryWriter``: torch's TensorBoard writer (the guide's own; skipped if tensorboard is not
  installed);
* ``history logger``: a logger object that keeps every value it was given in a list, grown to
  10,000 ... 200,000 entries first: the decorator must not look into it, so its cost must not
  grow with the history. Its ``add_scalar`` costs next to nothing, so its ratio is large: the
  decorator's own cost (a few microseconds) shows there, and must stay the same at every size.

Methods are interleaved over repeats and the fastest run of each is kept (the least disturbed
by other load on a shared machine). The ratio should stay below 1.5 (issue 20); it is reported,
not asserted.

    python benchmarks/numpy_args.py --quick    # seconds; what CI runs
    python benchmarks/numpy_args.py            # more calls per run
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

import tonumpy


class HistoryLogger:
    """A logger that keeps every scalar it was given (as many training scripts do)."""

    def __init__(self, entries: int) -> None:
        self.history: list[dict[str, Any]] = [
            {"tag": "loss", "value": 0.1, "step": i} for i in range(entries)
        ]

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.history.append({"tag": tag, "value": value, "step": step})
        self.history.pop()  # keep the size the case names


@tonumpy.numpy_args(scalars=True)
def log_scalars(writer: Any, step: int, metrics: dict[str, Any]) -> None:
    """The logging guide's recipe: tensors arrive as Python floats."""
    for tag, value in metrics.items():
        writer.add_scalar(tag, value, step)


def log_scalars_float(writer: Any, step: int, metrics: dict[str, Any]) -> None:
    """The same, by hand: ``float()`` on each value."""
    for tag, value in metrics.items():
        writer.add_scalar(tag, float(value), step)


def best_per_call(fn: Callable[[], None], calls: int, repeats: int) -> list[float]:
    """Seconds per call of ``fn``, one value per repeat."""
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        out.append((time.perf_counter() - start) / calls)
    return out


def measure(writer: Any, calls: int, repeats: int) -> tuple[float, float]:
    """(plain, recipe) best seconds per call, interleaved."""
    metrics = {"loss": torch.tensor(0.5), "accuracy": torch.tensor(0.75), "lr": 1e-4}
    plain: list[float] = []
    recipe: list[float] = []
    best_per_call(lambda: log_scalars_float(writer, 3, metrics), calls, 1)  # warm-up
    best_per_call(lambda: log_scalars(writer, 3, metrics), calls, 1)
    for _ in range(repeats):
        plain += best_per_call(lambda: log_scalars_float(writer, 3, metrics), calls, 1)
        recipe += best_per_call(lambda: log_scalars(writer, 3, metrics), calls, 1)
    return min(plain), min(recipe)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls and repeats")
    args = parser.parse_args()
    calls, repeats = (200, 5) if args.quick else (2_000, 15)
    writers: list[tuple[str, Any]] = []
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("tensorboard is not installed: the SummaryWriter case is skipped")
    else:
        writers.append(("SummaryWriter", SummaryWriter(tempfile.mkdtemp(prefix="tonumpy-bench"))))
    sizes = (10_000, 200_000) if args.quick else (10_000, 60_000, 200_000)
    writers += [(f"history logger, {n:,} entries", HistoryLogger(n)) for n in sizes]
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, CPU")
    print(
        f"{calls} calls per run, best of {repeats} (3 metrics per call: two 0-d tensors, a float)"
    )
    print()
    print("| logger | `float()` by hand | `@numpy_args(scalars=True)` | ratio |")
    print("|---|---:|---:|---:|")
    for name, writer in writers:
        plain, recipe = measure(writer, calls, repeats)
        print(f"| {name} | {plain * 1e6:.1f} µs | {recipe * 1e6:.1f} µs | {recipe / plain:.2f} |")
        if hasattr(writer, "close"):
            writer.close()


if __name__ == "__main__":
    main()
