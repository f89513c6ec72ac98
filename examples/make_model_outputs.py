"""Write examples/model_outputs.pt: the outputs of a tiny model, as a user would torch.save them.

The file holds what real model outputs hold: a plain dict around a ModelOutput-like object
(an OrderedDict that is also a dataclass, with a field left None), bfloat16 logits that still
require grad, int64 labels and predictions, a tuple of hidden states and a few plain values.
The seed is fixed, so the same torch version writes the same numbers.

Run from the repository root: python examples/make_model_outputs.py
Then: tonumpy show examples/model_outputs.pt
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn

OUT = Path(__file__).with_name("model_outputs.pt")


@dataclasses.dataclass
class TinyModelOutput(OrderedDict):  # type: ignore[type-arg]
    """Like transformers' ModelOutput: fields that are not None are also the mapping's items."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is not None:
                self[field.name] = value


class TinyModel(nn.Module):
    def __init__(self, vocab: int = 10, hidden: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.layer = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, classes).to(torch.bfloat16)

    def forward(self, ids: torch.Tensor, labels: torch.Tensor) -> TinyModelOutput:
        h0 = self.embed(ids)
        h1 = torch.tanh(self.layer(h0))
        logits = self.head(h1.to(torch.bfloat16)).mean(dim=1)  # (batch, classes), bfloat16
        loss = nn.functional.cross_entropy(logits.float(), labels)
        return TinyModelOutput(loss=loss, logits=logits, hidden_states=(h0, h1))


def make_outputs() -> dict[str, Any]:
    torch.manual_seed(0)
    model = TinyModel()
    ids = torch.randint(0, 10, (2, 4))
    labels = torch.tensor([0, 2])
    out = model(ids, labels)
    # torch.save keeps requires_grad but cannot save the autograd graph: store leaves that
    # still say requires_grad=True, as a detached-and-re-flagged copy does.
    for key in ("loss", "logits"):
        out[key] = out[key].detach().requires_grad_()
        object.__setattr__(out, key, out[key])
    hidden = tuple(h.detach() for h in out["hidden_states"])
    out["hidden_states"] = hidden
    object.__setattr__(out, "hidden_states", hidden)
    return {
        "model_output": out,
        "labels": labels,
        "predictions": out["logits"].argmax(dim=-1),
        "input_ids": ids,
        "epoch": 3,
        "split": "validation",
    }


def main() -> None:
    torch.save(make_outputs(), OUT)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
