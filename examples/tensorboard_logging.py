"""Log activation histograms and scalar metrics of a training loop to TensorBoard.

A tiny BERT classifier (built from a config: nothing is downloaded) is trained on synthetic token
sequences whose length changes from batch to batch. Every ``log_every`` steps, ``tonumpy.capture``
takes the outputs of the encoder layers and of their attention modules (which return tuples, as
Hugging Face attention modules do): the full arrays, for histograms, and their RMS reduced on the
device, for scalars. ``Activations.arrays()`` gives one array per tag; the logging functions
receive NumPy through ``tonumpy.numpy_args``. Captured calls are read at the start of the next
step: on a GPU their copies have landed by then, so logging never stalls the training loop. The
last captured step is logged after the loop.

Run it (``pip install tonumpy[tensorboard] transformers``), then ``tensorboard --logdir runs``::

    python examples/tensorboard_logging.py --logdir runs/demo --steps 200 --log-every 20
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from torch.utils.tensorboard import SummaryWriter

import tonumpy

#: The modules logged: the encoder layers, and their attention modules at any depth.
PATTERNS = ["bert.encoder.layer.*", "**.attention"]
VOCAB = 99


def make_model(seed: int = 0) -> Any:
    """A 2-layer BERT classifier, hidden size 32 (dropout off, so that a run can be replayed)."""
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        vocab_size=VOCAB,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return transformers.BertForSequenceClassification(config)


def make_batches(steps: int, batch: int = 16, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Synthetic data, 4 to 12 tokens a sequence: the label is whether the first token is low."""
    gen = torch.Generator().manual_seed(seed)
    out: list[dict[str, torch.Tensor]] = []
    for _ in range(steps):
        length = int(torch.randint(4, 13, (), generator=gen))
        ids = torch.randint(3, VOCAB, (batch, length), generator=gen)
        out.append({"input_ids": ids, "labels": (ids[:, 0] < VOCAB // 2).long()})
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
    """Write the last captured call of each module (histograms and RMS), then forget them."""
    for name, values in hists.arrays().items():  # 'bert.encoder.layer.0.attention[0]', ...
        writer.add_histogram(f"activations/{name}", values, step)
        record.setdefault(f"activations/{name}", {})[step] = values
    for name, norm in norms.arrays().items():
        writer.add_scalar(f"rms/{name}", norm, step)
        record.setdefault(f"rms/{name}", {})[step] = norm
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
    options: dict[str, Any] = {"include": PATTERNS, "every": log_every, "max_calls": 1}
    try:
        with (
            tonumpy.capture(model, **options) as hists,
            tonumpy.capture(model, **options, reduce=rms, scalars=True) as norms,
        ):
            for step, cpu_batch in enumerate(make_batches(steps, seed=seed)):
                if captured_at is not None:  # one step later: nothing left to wait for
                    log_captured(writer, captured_at, hists, norms, record)
                    captured_at = None
                batch = {key: value.to(device) for key, value in cpu_batch.items()}
                out = model(**batch)
                opt.zero_grad()
                out.loss.backward()
                opt.step()
                if step % log_every == 0:
                    captured_at = step
                    accuracy = (out.logits.argmax(-1) == batch["labels"]).float().mean()
                    logged = log_scalars(writer, step, {"loss": out.loss, "accuracy": accuracy})
                    for tag, value in logged.items():
                        record.setdefault(tag, {})[step] = value
        if captured_at is not None:  # the last step was captured: log it too
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
    hist = record["activations/bert.encoder.layer.0"]
    last = max(hist)
    print(f"layer 0 activations at step {last}: mean {np.mean(hist[last]):.4f}")


if __name__ == "__main__":
    main()
