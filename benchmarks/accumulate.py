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

The first section is issue 22's workload: a tiny GPT-2's full logits (2,000 sequences of 8 to
64 tokens, batches of 16, vocabulary 1,024, ``pad_value=-100``) accumulated by the plain idiom
(``.detach().cpu()``, pad per batch, ``torch.cat``, ``.numpy()``), transformers'
``EvalLoopContainer`` and ``nested_concat``, and ``tonumpy.Accumulator`` in memory and with
``directory=``, with and without ``reduce=`` (argmax on the device): time, peak RSS and the
bytes handed to the conversion, each method in its own process, every method once per round
(``--repeat`` rounds, medians and ranges). ``--baseline-src OTHER/src`` adds tonumpy's rows
with tonumpy imported from another checkout (before/after in one run). Then W1-W7 of
``benchmarks/run.py`` (its own processes; ``--no-peers`` skips them), and the asked ratios
against their limits: the exit status is 1 when one is missed, 2 when the methods' results
differ. ``--quick`` (CI: small sizes, noisy machines) reports the ratios without enforcing
them; its exit status is 2 on wrong results only. ``--device cuda`` runs the model, the
batches and ``reduce=`` on the GPU (``benchmarks/gpu_check.sh`` does).
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import statistics
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


def count_handed() -> tuple[list[int], Any]:
    """Count the tensor bytes the Accumulator hands to the conversion.

    Wraps ``tonumpy.accumulate.start`` in this (child) process: ``([bytes so far], the
    original)``, to put back when done.
    """
    import torch

    from tonumpy import accumulate

    handed = [0]
    original = accumulate.start

    def counting(leaves: list[Any], *args: Any, **kwargs: Any) -> Any:
        handed[0] += sum(x.nbytes for x in leaves if isinstance(x, torch.Tensor))
        return original(leaves, *args, **kwargs)

    accumulate.start = counting  # type: ignore[assignment]
    return handed, original


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
    handed, original = count_handed()
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


# --------------------------------------------------------- the workload (issue 22)

#: (sequences, shortest, longest, batch size, vocabulary, distinct batches computed by the model)
GPT2_SIZES = {False: (2000, 8, 64, 16, 1024, 16), True: (160, 8, 32, 16, 1024, 4)}
#: Methods of the GPT-2 workload: (label, transformers loop?)
GPT2_METHODS = {
    "plain": ("plain idiom: `.detach().cpu()`, pad per batch, `torch.cat`, `.numpy()`", False),
    "container": ("transformers `EvalLoopContainer` (add + get_arrays)", True),
    "nested_concat": ("transformers `nested_concat` every step + `nested_numpify`", True),
    "tonumpy": ("`tonumpy.Accumulator` in memory", False),
    "directory": ("`tonumpy.Accumulator(directory=)`", False),
    "reduce": ('`tonumpy.Accumulator(reduce={"logits": argmax})` in memory', False),
    "directory_reduce": ("`tonumpy.Accumulator(directory=, reduce=)`", False),
    "write": ("floor of `directory=`: the same padded rows, bare `os.pwritev`, no tonumpy", False),
    "write_direct": ("the same, `O_DIRECT` (no page cache; aligned blocks), no tonumpy", False),
}
#: Methods that are not tonumpy (never run with --baseline-src)
NOT_TONUMPY = ("plain", "write", "write_direct")
#: The asked ratios: (what, limit); checked by ``Report.checks``.
ASKED = {
    "time tonumpy / plain": 1.0,
    "peak tonumpy / plain": 0.45,
    "time directory / tonumpy": 1.3,
    "peak directory at 2x the batches / at 1x (flat: <= 1.25x + 16 MiB)": 1.0,
    "W1 / baseline": 0.65,
    "W2 / baseline": 0.65,
    "W3 / baseline": 0.85,
    "W4 / baseline": 0.65,
    "W6 ml_dtypes / bare bit-view map": 1.10,
}


def make_gpt2_pool(path: Path, quick: bool, device: str) -> dict[str, Any]:
    """Run a tiny GPT-2 (from a config) on the distinct batches; save logits and labels."""
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    n_seq, shortest, longest, batch, vocab, distinct = GPT2_SIZES[quick]
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_embd=64, n_layer=2, n_head=2, vocab_size=vocab, n_positions=longest
    )
    model = transformers.GPT2LMHeadModel(config).to(device).eval()
    gen = torch.Generator().manual_seed(2)
    pool = []
    with torch.inference_mode():
        for _ in range(distinct):
            lengths = torch.randint(shortest, longest + 1, (batch,), generator=gen)
            width = int(lengths.max())
            ids = torch.randint(0, vocab, (batch, width), generator=gen)
            mask = torch.arange(width)[None] < lengths[:, None]
            labels = torch.where(mask, ids, torch.full_like(ids, PAD))
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            pool.append({"logits": logits.float().cpu().clone(), "labels": labels})
    torch.save(pool, path)
    widths = [b["labels"].shape[1] for b in pool]
    return {"widths": widths, "n_batches": n_seq // batch, "vocab": vocab}


def _fresh(pool: list[dict[str, Any]], i: int) -> dict[str, Any]:
    """Batch ``i``: a clone of a pool batch, as a model hands out new tensors every step."""
    return {k: v.clone() for k, v in pool[i % len(pool)].items()}


def _gpt2_plain(pool: list[Any], n: int, clock: Clock, handed: list[int]) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F  # noqa: N812

    kept = []
    for i in range(n):
        batch = _fresh(pool, i)
        with clock:
            kept.append({k: v.detach().cpu() for k, v in batch.items()})
            handed[0] += sum(v.nbytes for v in batch.values())
        del batch
    with clock:
        width = max(b["labels"].shape[1] for b in kept)
        out = {}
        for key in ("logits", "labels"):
            pads = [(0, 0) * (b[key].ndim - 2) + (0, width - b[key].shape[1]) for b in kept]
            padded = [F.pad(b[key], pad, value=PAD) for b, pad in zip(kept, pads, strict=True)]
            out[key] = torch.cat(padded).numpy()
            del padded
    return out


def _gpt2_hf(
    method: str, pool: list[Any], n: int, clock: Clock, handed: list[int]
) -> dict[str, Any]:
    container = EvalLoopContainer(do_nested_concat=True, padding_index=PAD)
    preds = None
    for i in range(n):
        batch = _fresh(pool, i)
        with clock:
            handed[0] += sum(v.nbytes for v in batch.values())
            if method == "container":
                container.add(batch)
            else:
                preds = batch if preds is None else nested_concat(preds, batch, PAD)
        del batch
    with clock:
        out: dict[str, Any] = (
            container.get_arrays() if method == "container" else nested_numpify(preds)
        )
    return out


def _gpt2_tonumpy(
    method: str, pool: list[Any], n: int, clock: Clock, directory: str
) -> dict[str, Any]:
    import tonumpy

    options: dict[str, Any] = {"pad_value": PAD}
    if "directory" in method:
        options["directory"] = directory
    if "reduce" in method:
        options["reduce"] = {"logits": lambda t: t.argmax(-1)}
    acc = tonumpy.Accumulator(**options)
    for i in range(n):
        batch = _fresh(pool, i)
        with clock:
            acc.append(batch)
        del batch
    with clock:
        out: dict[str, Any] = acc.result()
    return out


def _padded_rows(arr: np.ndarray, width: int) -> list[memoryview]:
    """The buffers of ``arr``'s rows, each followed by the pad values that widen it to ``width``."""
    pad = np.full((width - arr.shape[1], *arr.shape[2:]), PAD, dtype=arr.dtype).view(np.uint8)
    rows = np.ascontiguousarray(arr).reshape(arr.shape[0], -1).view(np.uint8)
    padding = pad.reshape(-1).data
    return [part for row in rows for part in (row.data, padding)]


def _gpt2_write(
    pool: list[Any], n: int, clock: Clock, directory: str, *, direct: bool
) -> dict[str, Any]:
    """The host's floor for ``directory=``: the result's bytes written, nothing else.

    Each batch's rows and their padding go into one file per leaf, laid out as the result
    (the final width is known in advance here, so nothing is ever re-laid out; no header, no
    structure). ``direct``: the files are opened ``O_DIRECT`` (the page cache bypassed), the
    bytes staged in a reused aligned buffer and written in whole blocks, the last partial block
    rewritten by the next batch (the file cut to its length at the end).
    """
    width = max(int(b["labels"].shape[1]) for b in pool)
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | (os.O_DIRECT if direct else 0)
    fds = {
        key: os.open(Path(directory) / f"{key}.raw", flags, 0o644) for key in ("logits", "labels")
    }
    offsets = dict.fromkeys(fds, 0)
    block = 4096
    stage: dict[str, Any] = {}
    for i in range(n):
        batch = _fresh(pool, i)
        with clock:
            for key, fd in fds.items():
                buffers = _padded_rows(batch[key].numpy(), width)
                size = sum(len(b) for b in buffers)
                if not direct:
                    if os.pwritev(fd, buffers, offsets[key]) != size:
                        raise OSError(f"{key}: a short write")  # a regular file takes it all
                    offsets[key] += size
                    continue
                head = offsets[key] % block  # bytes of the last partial block, already staged
                if key not in stage or len(stage[key]) < head + size + block:
                    grown = mmap.mmap(-1, 2 * (head + size + block))
                    if key in stage:
                        grown[:head] = stage[key][:head]
                    stage[key] = grown
                buf = stage[key]
                at = head
                for part in buffers:
                    buf[at : at + len(part)] = part
                    at += len(part)
                whole = -(-at // block) * block
                os.pwrite(fd, memoryview(buf)[:whole], offsets[key] - head)
                offsets[key] += size
                keep = offsets[key] % block
                start = at - keep
                buf[:keep] = buf[start:at]
        del batch
    out: dict[str, Any] = {}
    with clock:
        for key, fd in fds.items():
            os.ftruncate(fd, offsets[key])
            os.close(fd)
    for key, ref in pool[0].items():
        dtype = ref.numpy().dtype
        inner = (width, *ref.shape[2:])
        rows = offsets[key] // (dtype.itemsize * int(np.prod(inner)))
        out[key] = np.memmap(Path(directory) / f"{key}.raw", dtype, "r", shape=(rows, *inner))
    return out


def _direct_io_works() -> bool:
    """Whether files in the temporary directory can be opened ``O_DIRECT``."""
    if not hasattr(os, "O_DIRECT"):
        return False
    with tempfile.TemporaryDirectory() as tmp:
        try:
            os.close(os.open(Path(tmp) / "probe", os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o644))
        except OSError:
            return False
    return True


def run_gpt2(task: dict[str, Any]) -> dict[str, Any]:
    """One method on the GPT-2 workload, in this (fresh) process: time, peak, bytes moved."""
    import torch

    from tonumpy import accumulate

    method, device, n = task["method"], task["device"], task["n_batches"]
    pool = [{k: v.to(device) for k, v in b.items()} for b in torch.load(task["pool"])]
    handed, original = count_handed()
    clock = Clock()
    tmp = tempfile.TemporaryDirectory(dir=task.get("tmp"))
    if device != "cpu":
        torch.cuda.synchronize()
    base = status("VmRSS")
    reset_peak()
    if method == "plain":
        out = _gpt2_plain(pool, n, clock, handed)
    elif method in ("container", "nested_concat"):
        out = _gpt2_hf(method, pool, n, clock, handed)
    elif method in ("write", "write_direct"):
        out = _gpt2_write(pool, n, clock, tmp.name, direct=method == "write_direct")
    else:
        out = _gpt2_tonumpy(method, pool, n, clock, tmp.name)
    peak = status("VmHWM")
    accumulate.start = original  # type: ignore[assignment]
    result: dict[str, Any] = {
        "seconds": clock.wall,
        "cpu": clock.cpu,
        "peak": peak - base,
        "handed": handed[0],
        "bytes": sum(np.asarray(v).nbytes for v in out.values()),
        "checksum": [float(np.asarray(out[k][::7, ::3], dtype=np.float64).sum()) for k in out],
    }
    if "directory" in method:  # the file, read by NumPy alone as it is
        loaded = np.load(Path(tmp.name) / "logits.npy", mmap_mode="r")
        result["np_load"] = bool(np.array_equal(loaded[::7, ::3], out["logits"][::7, ::3]))
        del loaded
    del out
    tmp.cleanup()
    return result


# ------------------------------------------------------------------------------- children


def child(task: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    kind, n = task["kind"], task.get("n", 0)
    if kind == "gpt2":
        return run_gpt2(task)
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


def _spawn_once(task: dict[str, Any], timeout: float, src: str | None = None) -> dict[str, Any]:
    """Run ``task`` in a fresh process (importing tonumpy from ``src`` if given)."""
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(task)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=env,
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
        self.checks: dict[str, float] = {}
        self.correct = True

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

    # -------------------------------------------------------------- the workload

    def gpt2(self) -> None:
        """The tiny GPT-2 full-logits workload: every method, alternating, several rounds."""
        quick, device = self.quick, self.args.device
        n_seq, shortest, longest, batch, vocab, distinct = GPT2_SIZES[quick]
        thp = _thp()
        with tempfile.TemporaryDirectory() as tmp:
            pool_path = Path(tmp) / "pool.pt"
            info = make_gpt2_pool(pool_path, quick, device)
            n = info["n_batches"]
            self.say(
                f"### The issue's workload: a tiny GPT-2's full logits ({device}; host huge "
                f"pages: `{thp}`)"
            )
            self.say()
            self.say(
                f"GPT-2 (2 layers, width 64, vocabulary {vocab:,}) from a config; {n_seq:,} "
                f"sequences of {shortest} to {longest} tokens in {n} batches of {batch}, each "
                f"batch padded to its longest sequence (the model computed {distinct} distinct "
                "batches; each step clones one, as a model hands out fresh tensors); "
                f"`{{'logits': (16, L, {vocab}) float32, 'labels': (16, L) int64}}` per batch, "
                f"`pad_value={PAD}`. Time: every `append` (or the method's per-batch step) and "
                "the final assembly, nothing else. Peak: VmHWM over VmRSS before the loop, "
                "its own process."
            )
            self.say()
            base = {"kind": "gpt2", "device": device, "pool": str(pool_path), "n_batches": n}
            srcs: dict[str, str | None] = {"": None}
            if self.args.baseline_src:
                srcs[" (before)"] = self.args.baseline_src
            runs: dict[str, list[dict[str, Any]]] = {}
            rounds = self.args.repeat
            ours = [m for m, (_, hf) in GPT2_METHODS.items() if not hf]
            if not _direct_io_works():  # tmpfs and others: no O_DIRECT floor
                ours.remove("write_direct")
            for r in range(rounds):
                order = ours[r % len(ours) :] + ours[: r % len(ours)]
                for method in order:
                    for tag, src in srcs.items():
                        if method in NOT_TONUMPY and tag:
                            continue
                        task = {**base, "method": method}
                        runs.setdefault(method + tag, []).append(
                            _spawn_once(task, self.timeout, src)
                        )
            if not self.args.no_transformers:
                for method, (_, hf) in GPT2_METHODS.items():
                    if hf:
                        task = {**base, "method": method}
                        runs[method] = [_spawn_once(task, self.timeout)]
            half = _spawn_once({**base, "method": "directory", "n_batches": n // 2}, self.timeout)
        self._gpt2_table(runs, half, rounds)

    def _gpt2_table(
        self, runs: dict[str, list[dict[str, Any]]], half: dict[str, Any], rounds: int
    ) -> None:
        def med(key: str, field: str) -> float:
            return statistics.median(r[field] for r in runs[key])

        plain_t, plain_p = med("plain", "seconds"), med("plain", "peak")
        self.say(
            f"| method | seconds (median of {rounds}; range) | vs plain | peak RSS | vs plain | "
            "bytes handed to the conversion | result |"
        )
        self.say("|---|---:|---:|---:|---:|---:|---:|")
        for key, rs in runs.items():
            method, _, tag = key.partition(" ")
            label = GPT2_METHODS[method][0] + (f" {tag}" if tag else "")
            times = [r["seconds"] for r in rs]
            span = f"{min(times):.3f}-{max(times):.3f}" if len(rs) > 1 else "one run"
            self.say(
                f"| {label} | {med(key, 'seconds'):.3f} ({span}) | "
                f"{med(key, 'seconds') / plain_t:.2f}x | {mib(med(key, 'peak'))} | "
                f"{med(key, 'peak') / plain_p:.2f}x | {size_text(rs[0]['handed'])} | "
                f"{size_text(rs[0]['bytes'])} |"
            )
        self.say()
        full = [r["checksum"] for k in runs if "reduce" not in k for r in runs[k]]
        reduced = [r["checksum"] for k in runs if "reduce" in k for r in runs[k]]
        same = all(np.allclose(c, full[0]) for c in full) and all(
            np.allclose(c, reduced[0]) for c in reduced
        )
        loads = all(r.get("np_load", True) for k in runs for r in runs[k])
        self.say(
            f"Results identical across methods (checksums; `reduce=` rows among themselves): "
            f"{same}. `directory=` files read by `np.load(mmap_mode='r')` equal the result: "
            f"{loads}. `directory=` with half the batches: peak {mib(half['peak'])}."
        )
        self.say()
        self.checks["time tonumpy / plain"] = med("tonumpy", "seconds") / plain_t
        self.checks["peak tonumpy / plain"] = med("tonumpy", "peak") / plain_p
        self.checks["time directory / tonumpy"] = med("directory", "seconds") / med(
            "tonumpy", "seconds"
        )
        if "write" in runs:
            ours, floor = med("tonumpy", "seconds"), med("write", "seconds")
            direct = ""
            if "write_direct" in runs:
                seconds = med("write_direct", "seconds")
                direct = f", {seconds:.3f} s with `O_DIRECT` = {seconds / ours:.2f}x"
            self.say(
                "The host's floor for `directory=` (the same padded bytes written into fresh "
                f"files, no tonumpy): {floor:.3f} s through the page cache = {floor / ours:.2f}x "
                f"the in-memory `Accumulator`{direct}; `directory=` = "
                f"{med('directory', 'seconds') / floor:.2f}x the page-cache floor."
            )
            self.say()
        flat_limit = 1.25 * half["peak"] + 16 * 2**20
        self.checks["peak directory at 2x the batches / at 1x (flat: <= 1.25x + 16 MiB)"] = (
            med("directory", "peak") / flat_limit
        )
        self.correct = self.correct and same and loads

    def peers(self) -> None:
        """W1-W7 of benchmarks/run.py, in this run (its own processes), and their asked ratios."""
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "run.json"
            cmd = [sys.executable, str(Path(__file__).with_name("run.py")), "--no-write"]
            cmd += ["--json", str(out)] + (["--quick"] if self.quick else [])
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise RuntimeError(f"benchmarks/run.py failed: {proc.stderr[-2000:]}")
            results = json.loads(out.read_text())["results"]
        self.say("### W1-W7 (`benchmarks/run.py`, same run): tonumpy's time / the baseline's")
        self.say()
        self.say("| case | tonumpy / baseline (min; median) | fastest limit / baseline |")
        w6: tuple[float, float] | None = None
        self.say("|---|---:|---:|")
        for wl in results:
            for case in wl["cases"]:
                rows = case["rows"]
                ours = next(r for r in rows if r["kind"] == "tonumpy")
                limits = [r for r in rows if r["kind"] == "limit" and "ratio_min" in r]
                best = min((r["ratio_min"] for r in limits), default=float("nan"))
                if "ratio_min" not in ours:
                    self.say(f"| {case['case']} | {ours['status']} | {best:.2f}x |")
                    continue
                self.say(
                    f"| {case['case']} | {ours['ratio_min']:.2f}x; {ours['ratio_median']:.2f}x "
                    f"| {best:.2f}x |"
                )
                key = f"{case['case']} / baseline"
                if key in ASKED:
                    self.checks[key] = ours["ratio_min"]
                if case["case"] == "W6 ml_dtypes":
                    bare = next(r for r in limits if "view(int16)" in r["name"])
                    self.checks["W6 ml_dtypes / bare bit-view map"] = ours["min"] / bare["min"]
                    w6 = (ours["min"] / bare["min"], ours["median"] / bare["median"])
        self.say()
        if w6:
            self.say(
                f"W6 ml_dtypes: tonumpy / the bare bit-view map in the same process: "
                f"{w6[0]:.2f}x (min), {w6[1]:.2f}x (median)."
            )
            self.say()

    def verdict(self) -> int:
        """The asked ratios, measured against their limits; the exit status."""
        self.say("### The asked ratios")
        self.say()
        self.say("| ratio | measured | asked | |")
        self.say("|---|---:|---:|---|")
        failed = 0
        for what, limit in ASKED.items():
            if what not in self.checks:
                self.say(f"| {what} | not measured | <= {limit:.2f} | - |")
                continue
            value = self.checks[what]
            ok = value <= limit
            failed += not ok
            self.say(f"| {what} | {value:.2f} | <= {limit:.2f} | {'pass' if ok else 'MISSED'} |")
        self.say()
        if self.quick:
            self.say(
                "--quick: small sizes on a noisy machine, so the ratios are reported, not "
                "enforced (the exit status reflects only errors and wrong results)."
            )
            return 0 if self.correct else 2
        if not self.correct:
            self.say("Results differ between methods: FAILED.")
            return 2
        self.say(f"{failed} asked ratio(s) missed.")
        return 1 if failed else 0


def _thp() -> str:
    """The host's transparent huge page setting (the bracketed word), or 'unknown'."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "unknown"
    word = text[text.find("[") + 1 : text.find("]")] if "[" in text else text.strip()
    return word or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, a few seconds (CI)")
    parser.add_argument("--write", action="store_true", help="update docs/performance.md")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--hf-batches", type=int, help="batches for the transformers loops")
    parser.add_argument("--repeat", type=int, help="runs per timing, fastest kept (3; quick: 1)")
    parser.add_argument(
        "--device", default="cpu", help="device of the models: cpu (default) or cuda"
    )
    parser.add_argument(
        "--baseline-src",
        help="also run tonumpy's rows with tonumpy imported from this src/ (before/after)",
    )
    parser.add_argument("--no-peers", action="store_true", help="skip W1-W7 (benchmarks/run.py)")
    parser.add_argument(
        "--no-transformers", action="store_true", help="skip the slow transformers loops"
    )
    parser.add_argument(
        "--only-gpt2", action="store_true", help="only the issue's workload and the checks"
    )
    args = parser.parse_args()
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    report = Report(args)
    report.gpt2()
    if not args.no_peers:
        report.peers()
    if not args.only_gpt2:
        report.header()
        report.compare()
        report.linearity()
        report.memory()
        report.directory()
        report.language_model()
    code = report.verdict()
    if args.write:
        write_section(report.lines, args.quick)
    sys.exit(code)


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
