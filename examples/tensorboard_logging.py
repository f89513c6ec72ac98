"""Log activation histograms and scalar metrics of a training loop to TensorBoard.

A small classifier is trained on synthetic data. Every ``log_every`` steps, ``tonumpy.capture``
takes the outputs of the chosen layers (the full arrays, for histograms, and their RMS reduced on
the device, for scalars); the logging functions receive NumPy through ``tonumpy.numpy_args``.
Captured calls are read one step later: on a GPU their copies have landed by then, so logging
never stalls the training loop.

Run it (``pip install tonumpy[tensorboard]``), then ``tensorboard --logdir runs``::

    python examples/tensorboard_logging.py --logdir runs/demo --steps 200 --log-every 20
"""

from __future__ import annotations

import argparse
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter

import tonumpy

LAYERS = ["fc1", "fc2", "head"]


def make_model(seed: int = 0) -> nn.Sequential:
    """The classifier: two hidden layers of 32 units."""
    torch.manual_seed(seed)
    return nn.Sequential(
        OrderedDict(
            fc1=nn.Linear(8, 32),
            act1=nn.ReLU(),
            fc2=nn.Linear(32, 32),
            act2=nn.ReLU(),
            head=nn.Linear(32, 2),
        )
    )


def make_batches(steps: int, batch: int = 64, seed: int = 0) -> list[tuple[torch.Tensor, ...]]:
    """Synthetic data: the label is which side of a fixed hyperplane a point is on."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(8, generator=gen)
    out: list[tuple[torch.Tensor, ...]] = []
    for _ in range(steps):
        x = torch.randn(batch, 8, generator=gen)
        out.append((x, (x @ w > 0).long()))
    return out


def rms(t: torch.Tensor) -> torch.Tensor:
    """Root mean square of an activation, computed where the activation lives."""
    return t.float().square().mean().sqrt()


@tonumpy.numpy_args(scalars=True)
def log_scalars(writer: SummaryWriter, step: int, metrics: dict[str, Any]) -> dict[str, float]:
    """Write each metric as a scalar; tensors arrive here as Python floats."""
    for tag, value in metrics.items():
        writer.add_scalar(tag, value, step)
    return metrics


def log_captured(
    writer: SummaryWriter,
    step: int,
    hists: tonumpy.Activations,
    norms: tonumpy.Activations,
    record: dict[str, dict[int, Any]],
) -> None:
    """Write the last captured call of each layer (histogram and RMS), then forget them."""
    for name in LAYERS:
        values = hists[name][-1]
        writer.add_histogram(f"activations/{name}", values, step)
        record.setdefault(f"activations/{name}", {})[step] = values
        norm = norms[name][-1]
        writer.add_scalar(f"rms/{name}", norm, step)
        record.setdefault(f"rms/{name}", {})[step] = float(norm)
    hists.clear()
    norms.clear()


def train(
    logdir: str | Path,
    *,
    steps: int = 50,
    log_every: int = 10,
    device: str = "cpu",
    seed: int = 0,
) -> dict[str, dict[int, Any]]:
    """Train for ``steps`` steps, logging to ``logdir``; return what was logged, by tag and step."""
    model = make_model(seed).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    record: dict[str, dict[int, Any]] = {}
    writer = SummaryWriter(str(logdir))
    captured_at: int | None = None  # the step whose calls wait to be logged
    try:
        with (
            tonumpy.capture(model, include=LAYERS, every=log_every, max_calls=1) as hists,
            tonumpy.capture(
                model, include=LAYERS, every=log_every, max_calls=1, reduce=rms, scalars=True
            ) as norms,
        ):
            for step, (x, y) in enumerate(make_batches(steps, seed=seed)):
                logits = model(x.to(device))
                loss = nn.functional.cross_entropy(logits, y.to(device))
                opt.zero_grad()
                loss.backward()
                opt.step()
                if captured_at is not None:  # one step later: nothing left to wait for
                    log_captured(writer, captured_at, hists, norms, record)
                    captured_at = None
                if step % log_every == 0:
                    captured_at = step
                    accuracy = (logits.argmax(-1) == y.to(device)).float().mean()
                    logged = log_scalars(writer, step, {"loss": loss, "accuracy": accuracy})
                    for tag, value in logged.items():
                        record.setdefault(tag, {})[step] = value
            if captured_at is not None:
                log_captured(writer, captured_at, hists, norms, record)
    finally:
        writer.close()
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", default="runs/tonumpy-demo")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--log-every", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    record = train(args.logdir, steps=args.steps, log_every=args.log_every, device=args.device)
    losses = record["loss"]
    print(f"logged {len(record)} tags to {args.logdir}")
    print("loss by step:", {step: round(value, 4) for step, value in losses.items()})
    hist = record["activations/fc1"]
    last = max(hist)
    print(f"fc1 activations at step {last}: mean {np.mean(hist[last]):.4f}")


if __name__ == "__main__":
    main()
