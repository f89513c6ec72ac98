"""Logging hooks: per-step overhead of tonumpy.capture against no capture and a naive hook.

A training loop (forward, backward, SGD step) of a small MLP and of a small transformer
encoder captures the output of every module on every step. Compared:

* ``none``: the loop without hooks (the baseline);
* ``naive``: a forward hook on every module that stores ``out.detach().cpu().numpy()`` for each
  tensor it returns (what people write; on a GPU every call stops the host until the copy is
  done; on the CPU the arrays are views that later in-place ops would change);
* ``capture``: ``tonumpy.capture(model)`` around the loop; all calls are read (as NumPy) at the
  end of each step, then ``clear()``-ed: one wait per step on a GPU;
* ``capture, read next step``: ``with tonumpy.capture(model) as acts`` around the forward of
  each step; ``acts`` is read one step later, when its copies have landed: no wait at all.

Per method: the wall time of a step (synchronised at the end of each timed run), its ratio to
``none``, the extra time per captured array, and the host time the forward pass took to
return (where the naive hook's stalls show on a GPU). Methods are interleaved over repeats and
the fastest run of each is kept (the least disturbed by other load on a shared machine).

    python benchmarks/capture.py --quick      # seconds; what CI runs
    python benchmarks/capture.py              # bigger models, more steps
    python benchmarks/capture.py --device cuda --write   # on a GPU; update docs/performance.md
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

import tonumpy

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## Logging hooks"


# ------------------------------------------------------------------------------------ models


def make_mlp(width: int, depth: int) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.GELU()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


def make_transformer(d_model: int, layers: int) -> nn.Module:
    layer = nn.TransformerEncoderLayer(
        d_model, nhead=4, dim_feedforward=4 * d_model, dropout=0.0, batch_first=True
    )
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


def cases(quick: bool) -> list[dict[str, Any]]:
    if quick:
        return [
            {"name": "MLP 4 x 128, batch 32", "model": lambda: make_mlp(128, 4), "x": (32, 128)},
            {
                "name": "transformer 1 x d64, 16 x 16 tokens",
                "model": lambda: make_transformer(64, 1),
                "x": (16, 16, 64),
            },
        ]
    return [
        {"name": "MLP 8 x 512, batch 64", "model": lambda: make_mlp(512, 8), "x": (64, 512)},
        {"name": "MLP 8 x 64, batch 16", "model": lambda: make_mlp(64, 8), "x": (16, 64)},
        {
            "name": "transformer 2 x d128, 8 x 64 tokens",
            "model": lambda: make_transformer(128, 2),
            "x": (8, 64, 128),
        },
    ]


# ----------------------------------------------------------------------------------- methods


class Loop:
    """One training loop: the model, its optimiser and a fixed batch, on one device."""

    def __init__(self, case: dict[str, Any], device: torch.device) -> None:
        torch.manual_seed(0)
        self.model = case["model"]().to(device)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-3)
        self.x = torch.randn(*case["x"], device=device)
        self.device = device
        self.forward_s = 0.0

    def step(self, around_forward: Callable[[], AbstractContextManager[Any]] = nullcontext) -> Any:
        start = time.perf_counter()
        with around_forward() as ctx:
            out = self.model(self.x)
        self.forward_s += time.perf_counter() - start
        loss = out.float().square().mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return ctx

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def tensors_in(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, list | tuple):
        return [t for item in out for t in tensors_in(item)]
    return []


def run_none(loop: Loop, steps: int) -> int:
    for _ in range(steps):
        loop.step()
    return 0


def run_naive(loop: Loop, steps: int) -> int:
    stored: list[Any] = []

    def hook(_module: nn.Module, _args: Any, out: Any) -> None:
        stored.extend(t.detach().cpu().numpy() for t in tensors_in(out))

    handles = [m.register_forward_hook(hook) for m in loop.model.modules()]
    try:
        count = 0
        for _ in range(steps):
            loop.step()
            count += len(stored)
            stored.clear()
        return count
    finally:
        for handle in handles:
            handle.remove()


def read_all(acts: tonumpy.Activations) -> int:
    return sum(len(acts[name]) for name in acts)


def run_capture(loop: Loop, steps: int) -> int:
    count = 0
    with tonumpy.capture(loop.model) as acts:
        for _ in range(steps):
            loop.step()
            count += read_all(acts)
            acts.clear()
    return count


def run_capture_lagged(loop: Loop, steps: int) -> int:
    count = 0
    previous = None
    for _ in range(steps):
        acts = loop.step(lambda: tonumpy.capture(loop.model))
        if previous is not None:
            count += read_all(previous)
        previous = acts
    if previous is not None:
        count += read_all(previous)
    return count


METHODS: dict[str, Callable[[Loop, int], int]] = {
    "none": run_none,
    "naive `.detach().cpu().numpy()` hook": run_naive,
    "`capture`, read every step": run_capture,
    "`capture` per step, read next step": run_capture_lagged,
}


def measure(
    case: dict[str, Any], device: torch.device, steps: int, repeats: int
) -> dict[str, tuple[float, float, int]]:
    """Best (step seconds, forward host seconds) over the repeats, and arrays per run."""
    loops = {name: Loop(case, device) for name in METHODS}
    walls: dict[str, list[float]] = {name: [] for name in METHODS}
    fwds: dict[str, list[float]] = {name: [] for name in METHODS}
    counts: dict[str, int] = {}
    for name, run in METHODS.items():  # warm up: kernels, allocator, pinned pool
        run(loops[name], 2)
        loops[name].sync()
    for _ in range(repeats):
        for name, run in METHODS.items():
            loop = loops[name]
            loop.sync()
            loop.forward_s = 0.0
            start = time.perf_counter()
            counts[name] = run(loop, steps)
            loop.sync()
            walls[name].append((time.perf_counter() - start) / steps)
            fwds[name].append(loop.forward_s / steps)
    return {name: (min(walls[name]), min(fwds[name]), counts[name]) for name in METHODS}


# -------------------------------------------------------------------------------------- main


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    return (
        f"CPU, {os.cpu_count()} cores shared with other jobs, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), Python {platform.python_version()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small models, few steps")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1: steadier on a shared machine)"
    )
    parser.add_argument("--write", action="store_true", help="update docs/performance.md")
    parser.add_argument("--no-write", dest="write", action="store_false")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    steps = args.steps or (5 if args.quick else 20)
    repeats = args.repeats or (3 if args.quick else 7)

    lines = [
        f"{describe(device)}; {steps} training steps per timed run, best of {repeats} runs; "
        "every module's output captured on every step.",
        "",
    ]
    print(lines[0])
    for case in cases(args.quick):
        results = measure(case, device, steps, repeats)
        base_wall, _, _ = results["none"]
        table = [
            f"**{case['name']}**",
            "",
            "| method | ms / step | step vs none | extra µs / array | forward host ms "
            "| arrays / step |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for name, (wall, fwd, count) in results.items():
            per_step = count // steps
            extra = f"{(wall - base_wall) / per_step * 1e6:.0f}" if per_step else "-"
            table.append(
                f"| {name} | {wall * 1e3:.2f} | {wall / base_wall:.2f}x | {extra} "
                f"| {fwd * 1e3:.2f} | {per_step} |"
            )
        table.append("")
        print("\n" + "\n".join(table))
        lines += table
    if args.write:
        write_section(lines, args.quick, args.device)


def write_section(lines: list[str], quick: bool, device: str) -> None:
    path = ROOT / "docs" / "performance.md"
    text = path.read_text() if path.exists() else "# Performance\n"
    when = time.strftime("%Y-%m-%d")
    command = "python benchmarks/capture.py" + (" --quick" if quick else "")
    body = "\n".join(
        [
            SECTION,
            "",
            f"Measured with `{command} --device {device}` on {when}. Timings on a shared "
            "machine are noisy: compare the ratios within one table.",
            "",
            *lines,
        ]
    )
    if SECTION in text:
        start = text.index(SECTION)
        end = text.find("\n## ", start + len(SECTION))
        text = text[:start] + body + (text[end:] if end != -1 else "\n")
    else:
        text = text.rstrip("\n") + "\n\n" + body + "\n"
    path.write_text(text)


if __name__ == "__main__":
    main()
