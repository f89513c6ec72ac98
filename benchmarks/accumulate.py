"""Batched predictions: tonumpy.Accumulator against the ways evaluation loops do it today.

The workload is the issue's evaluation loop: batches of
``{"logits": (32, L, 64) float32, "labels": (32, L) int64, "loss": 0-d}`` with L drawn
between 20 and 40, padded with -100 (what transformers does) to the longest L. Compared:

* ``tonumpy.Accumulator``: ``append`` every batch, ``result()`` at the end;
* a list of ``.numpy()`` views, then one pad-and-``np.concatenate`` per leaf at the end;
* transformers' ``nested_concat`` loop (what ``Trainer`` did before ``EvalLoopContainer``):
  concatenate onto the growing result at every step;
* transformers' ``EvalLoopContainer`` (``do_nested_concat=True``, the ``Trainer`` default):
  ``add`` every batch, ``get_arrays()`` at the end.

transformers is imported if installed; otherwise an equivalent reimplementation of those
functions (below, labelled as such) is used, and the output says so.

A second workload is a language model's evaluation (issue 15): a GPT-2 with a 32,000-token
vocabulary (2 layers, width 64, built from a config: nothing is downloaded) run on batches of
token ids of varying length, its outputs (``loss``, ``(batch, L, 32000)`` logits, the KV cache)
appended to an ``Accumulator``; once keeping everything, once with ``exclude=`` (the cache),
once with ``exclude=`` and ``reduce={"logits": argmax}``. Reported: the bytes of the tensors
handed to the conversion (what a GPU would copy to the host), the result's size, and the peak
host memory (VmHWM) over the loop, above the memory before it.

Every measurement runs in a fresh subprocess (so peak-memory readings are its own). Only the
time spent inside the accumulating calls is counted, not the making of the batches (a pool of
64 batches is generated once; each step clones one, as a model would hand out fresh tensors).
Memory is read from ``/proc/self/status`` (VmRSS, and VmHWM after resetting it through
``/proc/self/clear_refs``), so it is Linux-only.

    python benchmarks/accumulate.py --quick          # seconds; what CI runs
    python benchmarks/accumulate.py                  # the issue's sizes (minutes, ~6 GB RAM)
    python benchmarks/accumulate.py --device cuda    # the language model on a GPU
    python benchmarks/accumulate.py --write          # also update docs/performance.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from _memory import reset_peak, status

ROOT = Path(__file__).resolve().parent.parent
PAD = -100
BATCH, HIDDEN, L_MIN, L_MAX = 32, 64, 20, 40
SECTION = "## Batched predictions"

# --------------------------------------------------------------------- transformers (or copy)

HF_SOURCE = "transformers"
try:  # pragma: no cover - depends on the environment
    import transformers
    from transformers.trainer_pt_utils import EvalLoopContainer, nested_concat, nested_numpify

    HF_SOURCE = f"transformers {transformers.__version__}"
except Exception:  # not installed, or an old version without EvalLoopContainer
    import torch

    HF_SOURCE = (
        "REIMPLEMENTATION of transformers' trainer_pt_utils (transformers not installed): "
        "same algorithm, not the library"
    )

    # -- Equivalent reimplementation of transformers.trainer_pt_utils (4.4x), for comparison
    # -- only: concatenate along dim 0 at every step, padding only dim 1 with padding_index.

    def _atleast_1d(x: Any) -> Any:
        return torch.atleast_1d(x) if isinstance(x, torch.Tensor) else np.atleast_1d(x)

    def _pad_and_concatenate(a: Any, b: Any, padding_index: int) -> Any:
        a, b = _atleast_1d(a), _atleast_1d(b)
        is_torch = isinstance(a, torch.Tensor)
        if a.ndim == 1 or a.shape[1] == b.shape[1]:
            return torch.cat((a, b), dim=0) if is_torch else np.concatenate((a, b), axis=0)
        shape = (a.shape[0] + b.shape[0], max(a.shape[1], b.shape[1]), *a.shape[2:])
        out = (
            a.new_full(shape, padding_index)
            if is_torch
            else np.full_like(a, padding_index, shape=shape)
        )
        out[: a.shape[0], : a.shape[1]] = a
        out[a.shape[0] :, : b.shape[1]] = b
        return out

    def nested_concat(tensors: Any, new_tensors: Any, padding_index: int = -100) -> Any:
        if isinstance(tensors, list | tuple):
            return type(tensors)(
                nested_concat(t, n, padding_index)
                for t, n in zip(tensors, new_tensors, strict=True)
            )
        if isinstance(tensors, Mapping):
            return type(tensors)(
                {k: nested_concat(t, new_tensors[k], padding_index) for k, t in tensors.items()}
            )
        return _pad_and_concatenate(tensors, new_tensors, padding_index)

    def nested_numpify(tensors: Any) -> Any:
        if isinstance(tensors, list | tuple):
            return type(tensors)(nested_numpify(t) for t in tensors)
        if isinstance(tensors, Mapping):
            return type(tensors)({k: nested_numpify(t) for k, t in tensors.items()})
        t = tensors.cpu()
        return (t.float() if t.dtype == torch.bfloat16 else t).numpy()

    class EvalLoopContainer:  # type: ignore[no-redef]
        def __init__(self, do_nested_concat: bool = True, padding_index: int = -100) -> None:
            self.do_nested_concat = do_nested_concat
            self.padding_index = padding_index
            self.tensors: Any = None
            self.arrays: Any = None

        def add(self, tensors: Any) -> None:
            if self.tensors is None:
                self.tensors = tensors if self.do_nested_concat else [tensors]
            elif self.do_nested_concat:
                self.tensors = nested_concat(
                    self.tensors, tensors, padding_index=self.padding_index
                )
            else:
                self.tensors.append(tensors)

        def to_cpu_and_numpy(self) -> None:
            if self.tensors is None:
                return
            new = nested_numpify(self.tensors)
            if self.arrays is None:
                self.arrays = new
            elif self.do_nested_concat:
                self.arrays = nested_concat(self.arrays, new, padding_index=self.padding_index)
            else:
                self.arrays.extend(new)
            self.tensors = None

        def get_arrays(self) -> Any:
            self.to_cpu_and_numpy()
            return self.arrays


# --------------------------------------------------------------------------------- workload


def make_pool(size: int = 64, seed: int = 0) -> list[dict[str, Any]]:
    import torch

    gen = torch.Generator().manual_seed(seed)
    pool = []
    for _ in range(size):
        length = int(torch.randint(L_MIN, L_MAX + 1, (), generator=gen))
        pool.append(
            {
                "logits": torch.randn(BATCH, length, HIDDEN, generator=gen),
                "labels": torch.randint(0, 1000, (BATCH, length), generator=gen),
                "loss": torch.rand((), generator=gen),
            }
        )
    return pool


def batches(pool: list[dict[str, Any]], n: int, hf: bool = False) -> Any:
    """Fresh tensors per step (as a model hands out); HF gets the loss as shape (1,)."""
    for i in range(n):
        b = pool[i % len(pool)]
        yield {k: (v[None] if hf and v.ndim == 0 else v).clone() for k, v in b.items()}


def nbytes(tree: Any) -> int:
    return sum(v.nbytes for v in tree.values())


def checksum(tree: Any) -> list[float]:
    return [
        float(np.asarray(tree[k], dtype=np.float64).sum()) for k in ("logits", "labels", "loss")
    ]


# ------------------------------------------------------------------------------- methods


class Clock:
    """Wall and CPU (user + system, this process) time spent inside ``with clock:`` blocks."""

    def __init__(self) -> None:
        self.wall = 0.0
        self.cpu = 0.0

    def __enter__(self) -> None:
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def __exit__(self, *exc: object) -> None:
        self.wall += time.perf_counter() - self._wall
        self.cpu += time.process_time() - self._cpu


def run_tonumpy(pool: Any, n: int, directory: str | None = None) -> tuple[Clock, Any]:
    import tonumpy

    clock = Clock()
    acc = tonumpy.Accumulator(pad_value=PAD, directory=directory)
    for batch in batches(pool, n):
        with clock:
            acc.append(batch)
    with clock:
        out = acc.result()
    return clock, out


def run_list(pool: Any, n: int) -> tuple[Clock, Any]:
    clock = Clock()
    lists: dict[str, list[np.ndarray]] = {"logits": [], "labels": [], "loss": []}
    for batch in batches(pool, n):
        with clock:
            for key, value in batch.items():
                lists[key].append(value.numpy())
    with clock:
        out = {}
        for key, arrays in lists.items():
            if arrays[0].ndim == 0:
                out[key] = np.stack(arrays)
                continue
            width = max(a.shape[1] for a in arrays)
            pads = [[(0, 0), (0, width - a.shape[1])] + [(0, 0)] * (a.ndim - 2) for a in arrays]
            padded = [np.pad(a, p, constant_values=PAD) for a, p in zip(arrays, pads, strict=True)]
            out[key] = np.concatenate(padded)
    return clock, out


def run_nested_concat(pool: Any, n: int) -> tuple[Clock, Any]:
    clock = Clock()
    preds = None
    for batch in batches(pool, n, hf=True):
        with clock:
            preds = batch if preds is None else nested_concat(preds, batch, padding_index=PAD)
    with clock:
        out = nested_numpify(preds)
    return clock, out


def run_container(pool: Any, n: int) -> tuple[Clock, Any]:
    clock = Clock()
    container = EvalLoopContainer(do_nested_concat=True, padding_index=PAD)
    for batch in batches(pool, n, hf=True):
        with clock:
            container.add(batch)
    with clock:
        out = container.get_arrays()
    return clock, out


# ---------------------------------------------------------------- language-model evaluation

LM_VOCAB = 32_000
#: (batches, batch size, shortest L, longest L): full and --quick
LM_SIZES = {False: (16, 8, 96, 128), True: (3, 2, 8, 16)}
LM_MODES = {
    "everything": "everything (logits and the KV cache)",
    "exclude": '`exclude=["cache", "past_key_values"]`',
    "reduce": '`exclude=` and `reduce={"logits": lambda t: t.argmax(-1)}`',
}


def run_lm(mode: str, quick: bool, device: str) -> dict[str, Any]:
    """One evaluation loop of the language model, accumulating in ``mode``."""
    import torch
    import transformers

    import tonumpy
    from tonumpy import _tree, accumulate

    transformers.logging.set_verbosity_error()  # a config from scratch: no token ids, no notes
    n, batch, shortest, longest = LM_SIZES[quick]
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_embd=64, n_layer=2, n_head=2, vocab_size=LM_VOCAB, n_positions=256, use_cache=True
    )
    model = transformers.GPT2LMHeadModel(config).to(device).eval()
    gen = torch.Generator().manual_seed(1)
    inputs = []
    for _ in range(n):
        length = int(torch.randint(shortest, longest + 1, (), generator=gen))
        inputs.append(torch.randint(0, LM_VOCAB, (batch, length), generator=gen).to(device))
    options: dict[str, Any] = {"pad_value": -100}
    if mode != "everything":
        # one list for transformers 5 and 4: the key the installed version lacks matches nothing
        warnings.filterwarnings("ignore", category=tonumpy.UnmatchedPatternWarning)
        options["exclude"] = ["cache", "past_key_values"]
    if mode == "reduce":
        options["reduce"] = {"logits": lambda t: t.argmax(-1)}
    handed = [0]
    original = accumulate.start

    def counting(leaves: list[Any], *args: Any, **kwargs: Any) -> Any:
        handed[0] += sum(x.nbytes for x in leaves if isinstance(x, torch.Tensor))
        return original(leaves, *args, **kwargs)

    accumulate.start = counting  # type: ignore[assignment]
    acc = tonumpy.Accumulator(**options)
    clock = Clock()
    base = status("VmRSS")
    reset_peak()
    with torch.inference_mode():
        for ids in inputs:
            with clock:
                out = model(input_ids=ids, labels=ids)
                acc.append(out)
            del out
        with clock:
            preds = acc.result()
    peak = status("VmHWM")
    accumulate.start = original  # type: ignore[assignment]
    leaves, _ = _tree.flatten(preds)
    size = sum(x.nbytes for x in leaves if isinstance(x, np.ndarray))
    return {"handed": handed[0], "result": size, "peak": peak - base, "seconds": clock.wall}


METHODS: dict[str, Callable[[Any, int], tuple[Clock, Any]]] = {
    "tonumpy": run_tonumpy,
    "list": run_list,
    "nested_concat": run_nested_concat,
    "container": run_container,
}


# ------------------------------------------------------------------------------- children


def child(task: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    kind, n = task["kind"], task.get("n", 0)
    if kind == "lm":  # several modes, one after the other (quick: one process for all)
        return {mode: run_lm(mode, task["quick"], task["device"]) for mode in task["modes"]}
    pool = make_pool()
    if kind == "time":
        clock, out = METHODS[task["method"]](pool, n)
        return {
            "seconds": clock.wall,
            "cpu": clock.cpu,
            "bytes": nbytes(out),
            "checksum": checksum(out),
        }
    if kind == "floor":  # what merely writing a fresh array of that many bytes costs here
        clock = Clock()
        with clock:
            np.ones(task["bytes"], dtype=np.uint8)
        return {"seconds": clock.wall, "cpu": clock.cpu}
    if kind == "memory":  # in-memory accumulator: peak RSS while result() runs
        import tonumpy

        base = status("VmRSS")
        acc = tonumpy.Accumulator(pad_value=PAD)
        for batch in batches(pool, n):
            acc.append(batch)
        del batch
        before = status("VmRSS")
        reset_peak()
        out = acc.result()
        peak = status("VmHWM")
        return {
            "base": base,
            "before": before,
            "peak": peak,
            "after": status("VmRSS"),
            "bytes": nbytes(out),
        }
    if kind == "directory":  # disk-backed accumulator: peak RSS over the whole loop
        with tempfile.TemporaryDirectory(dir=task.get("tmp")) as tmp:
            reset_peak()
            base = status("VmRSS")
            clock, out = run_tonumpy(pool, n, directory=tmp)
            seconds = clock.wall
            peak = status("VmHWM")
            disk = sum(f.stat().st_size for f in Path(tmp).iterdir())
            result = {
                "seconds": seconds,
                "base": base,
                "peak": peak,
                "bytes": nbytes(out),
                "disk": disk,
            }
            if task.get("check"):
                _, ref = run_tonumpy(pool, n)
                result["equal"] = all(np.array_equal(out[k], ref[k]) for k in ref)
            del out
        return result
    raise ValueError(kind)


def spawn(task: dict[str, Any], timeout: float, repeat: int = 1) -> dict[str, Any]:
    """Run ``task`` in ``repeat`` fresh subprocesses; keep the fastest run."""
    runs = [_spawn_once(task, timeout) for _ in range(repeat)]
    return min(runs, key=lambda r: r.get("seconds", 0.0))


def _spawn_once(task: dict[str, Any], timeout: float) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(task)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{task}: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------- report


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def size_text(n: float) -> str:
    """Bytes in the unit that shows them best (B, KiB, MiB)."""
    for unit, scale in (("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n:,.0f} B"


NAMES = {
    "tonumpy": "`tonumpy.Accumulator` (append + result)",
    "list": "list of `.numpy()` + pad + one `np.concatenate`",
    "nested_concat": "`nested_concat` onto the result every step",
    "container": "`EvalLoopContainer` (add + get_arrays)",
}


class Report:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.quick = args.quick
        self.timeout = 120 if args.quick else 3600
        self.lines: list[str] = []

    def say(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)

    def header(self) -> None:
        self.say(
            f"Workload: batches of logits (32, L, 64) float32, labels (32, L) int64, a 0-d "
            f"loss; L in [{L_MIN}, {L_MAX}], padded with {PAD}."
        )
        self.say(
            f"Baselines: {HF_SOURCE}. Python {platform.python_version()}, "
            f"{platform.machine()}, torch threads 1."
        )
        self.say(
            f"Timings: the fastest of {self.args.repeat} run(s), each in a fresh process "
            "(transformers loops: one run)."
        )
        self.say()

    def compare(self) -> None:
        n_cmp = 100 if self.quick else 2000
        n_hf = self.args.hf_batches or n_cmp
        self.say(f"### Time for {n_cmp:,} batches (transformers loops: {n_hf:,})")
        self.say()
        self.say("| method | seconds | vs tonumpy |")
        self.say("|---|---:|---:|")
        times: dict[str, float] = {}
        sums: dict[str, list[float]] = {}
        for method in METHODS:
            hf = method in ("nested_concat", "container")
            n = n_hf if hf else n_cmp
            task = {"kind": "time", "method": method, "n": n}
            r = spawn(task, self.timeout, 1 if hf else self.args.repeat)
            times[method] = r["seconds"]
            if n == n_cmp:
                sums[method] = r["checksum"]
        for method, seconds in times.items():
            ratio = seconds / times["tonumpy"]
            self.say(f"| {NAMES[method]} | {seconds:.3f} | {ratio:.1f}x |")
        agree = all(np.allclose(s, sums["tonumpy"]) for s in sums.values())
        self.say()
        self.say(f"All results identical (checksums): {agree}.")
        self.say()

    def linearity(self) -> None:
        lin = (50, 500) if self.quick else (1000, 10000)
        repeat = self.args.repeat
        runs = [
            spawn({"kind": "time", "method": "tonumpy", "n": n}, self.timeout, repeat) for n in lin
        ]
        floors = [spawn({"kind": "floor", "bytes": r["bytes"]}, self.timeout, repeat) for r in runs]
        self.say(f"### Linearity: {lin[0]:,} vs {lin[1]:,} batches")
        self.say()
        self.say(
            "| batches | result size | seconds | CPU seconds | writing a fresh array of that size |"
        )
        self.say("|---:|---:|---:|---:|---:|")
        for n, r, f in zip(lin, runs, floors, strict=True):
            self.say(
                f"| {n:,} | {mib(r['bytes'])} | {r['seconds']:.3f} | {r['cpu']:.3f} | "
                f"{f['seconds']:.3f} |"
            )
        self.say()
        wall = runs[1]["seconds"] / runs[0]["seconds"]
        cpu = runs[1]["cpu"] / runs[0]["cpu"]
        floor = floors[1]["seconds"] / floors[0]["seconds"]
        self.say(
            f"{lin[1] // lin[0]}x the batches took {wall:.1f}x the time ({cpu:.1f}x the CPU "
            f"time; target: at most 12x). For comparison, merely writing a fresh array of the "
            f"result's size took {floor:.1f}x as long at the larger size on this machine."
        )
        self.say()

    def memory(self) -> None:
        n = 100 if self.quick else 2000
        m = spawn({"kind": "memory", "n": n}, self.timeout)
        size = m["bytes"]
        self.say(f"### Memory of `result()` ({n:,} batches, in memory)")
        self.say()
        self.say("| | RSS | / result size |")
        self.say("|---|---:|---:|")
        rows = [
            ("result size", size),
            ("growth over the loop: the accumulated chunks", m["before"] - m["base"]),
            ("peak during `result()`, over the start of the loop", m["peak"] - m["base"]),
            ("peak during `result()`, over the RSS just before it", m["peak"] - m["before"]),
            ("after `result()`, over the start of the loop", m["after"] - m["base"]),
        ]
        for label, value in rows:
            self.say(f"| {label} | {mib(value)} | {value / size:.2f} |")
        self.say()

    def directory(self) -> None:
        sizes = (50, 500) if self.quick else (1000, 10000)
        self.say("### `directory=`: peak RSS as the number of batches grows")
        self.say()
        self.say("| batches | on disk | peak RSS growth | seconds |")
        self.say("|---:|---:|---:|---:|")
        check = None
        for i, n in enumerate(sizes):
            d = spawn({"kind": "directory", "n": n, "check": i == 0}, self.timeout)
            growth = mib(d["peak"] - d["base"])
            self.say(f"| {n:,} | {mib(d['disk'])} | {growth} | {d['seconds']:.2f} |")
            check = d.get("equal", check)
        self.say()
        self.say(
            f"Memory-mapped result equal to the in-memory one ({sizes[0]:,} batches): {check}."
        )
        self.say()

    def language_model(self) -> None:
        n, batch, shortest, longest = LM_SIZES[self.quick]
        device = self.args.device
        self.say(
            f"### A language model's evaluation: `reduce=` and `exclude=` ({device}, vocabulary "
            f"{LM_VOCAB:,})"
        )
        self.say()
        self.say(
            f"GPT-2 (2 layers, width 64) from a config, {n} batches of {batch} sequences of "
            f"{shortest} to {longest} tokens, outputs appended as the model returns them."
        )
        self.say()
        self.say(
            "| `Accumulator` options | bytes handed to the conversion | result size | "
            "peak host memory over the loop | seconds |"
        )
        self.say("|---|---:|---:|---:|---:|")
        rows: dict[str, Any] = {}
        task = {"kind": "lm", "quick": self.quick, "device": device}
        if self.quick:  # one process (importing transformers takes seconds): smallest first
            rows = spawn({**task, "modes": list(reversed(LM_MODES))}, self.timeout)
        else:  # a process per mode: each peak its own
            for mode in LM_MODES:
                rows.update(spawn({**task, "modes": [mode]}, self.timeout))
        for mode, label in LM_MODES.items():
            r = rows[mode]
            peak = "(one process)" if self.quick else size_text(r["peak"])
            self.say(
                f"| {label} | {size_text(r['handed'])} | {size_text(r['result'])} | {peak} | "
                f"{r['seconds']:.2f} |"
            )
        self.say()
        moved = rows["exclude"]["handed"] / max(rows["reduce"]["handed"], 1)
        text = (
            f"`reduce=` handed {moved:,.0f}x fewer bytes to the conversion than keeping the logits"
        )
        if self.quick:
            text += (
                " (--quick runs the three loops in one process, so their peaks are not "
                "comparable and are not shown)."
            )
        else:
            peak = rows["exclude"]["peak"] / max(rows["reduce"]["peak"], 1)
            text += (
                f", and the loop's peak host memory was {peak:.1f}x lower (what remains is the "
                "model's own work: one batch's logits and loss, which a GPU run keeps on the "
                "device)."
            )
        self.say(text)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, a few seconds (CI)")
    parser.add_argument("--write", action="store_true", help="update docs/performance.md")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--hf-batches", type=int, help="batches for the transformers loops")
    parser.add_argument("--repeat", type=int, help="runs per timing, fastest kept (3; quick: 1)")
    parser.add_argument("--device", default="cpu", help="device of the language model (cpu)")
    args = parser.parse_args()
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    report = Report(args)
    report.header()
    report.compare()
    report.linearity()
    report.memory()
    report.directory()
    report.language_model()
    if args.write:
        write_section(report.lines, args.quick)


def write_section(lines: list[str], quick: bool) -> None:
    path = ROOT / "docs" / "performance.md"
    text = path.read_text() if path.exists() else "# Performance\n"
    when = time.strftime("%Y-%m-%d")
    body = "\n".join(
        [
            SECTION,
            "",
            f"Measured with `python benchmarks/accumulate.py{' --quick' if quick else ''}` "
            f"on {when}, "
            f"on a shared {os.cpu_count()}-core machine (timings are noisy: compare ratios within "
            "one run). Each row is a fresh subprocess.",
            "",
            *lines,
            "",
        ]
    )
    if SECTION in text:
        start = text.index(SECTION)
        end = text.find("\n## ", start + len(SECTION))
        text = text[:start] + body + (text[end + 1 :] if end != -1 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + body
    path.write_text(text)


if __name__ == "__main__":
    main()
