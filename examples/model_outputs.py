"""Convert a tiny model's outputs, with grad and bfloat16, to NumPy: before and after.

Run: python examples/model_outputs.py
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import tonumpy


@dataclass
class Output:
    """What many models return: a dataclass of tensors and plain values."""

    logits: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...]
    loss: torch.Tensor
    note: str = "tiny"


class TinyModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.layer = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3).to(torch.bfloat16)

    def forward(self, ids: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
        h0 = self.embed(ids)
        h1 = torch.relu(self.layer(h0))
        logits = self.head(h1.to(torch.bfloat16))
        loss = nn.functional.cross_entropy(logits.float().mean(1), labels)
        return {
            "output": Output(logits, (h0, h1), loss),
            "labels": labels,
            "top": torch.max(logits, dim=-1),
        }


def describe(tree: Any) -> str:
    paths, leaves = _paths(tree)
    return "\n".join(
        f"  {path:<34} {_kind(leaf)}" for path, leaf in zip(paths, leaves, strict=True)
    )


def _paths(tree: Any) -> tuple[list[str], list[Any]]:
    leaves, spec = tonumpy._tree.flatten(tree)  # noqa: SLF001 - the example shows key paths
    return [tonumpy._tree.leaf_path(spec, i)[1] for i in range(len(leaves))], leaves  # noqa: SLF001


def _kind(leaf: Any) -> str:
    if isinstance(leaf, torch.Tensor):
        grad = ", grad" if leaf.requires_grad else ""
        return f"Tensor {tuple(leaf.shape)} {leaf.dtype}{grad}"
    if hasattr(leaf, "dtype") and hasattr(leaf, "shape"):
        return f"{type(leaf).__name__} {leaf.shape} {leaf.dtype}"
    return repr(leaf)


def main() -> None:
    torch.manual_seed(0)
    model = TinyModel()
    outputs = model(torch.randint(0, 10, (2, 4)), torch.tensor([0, 2]))
    print("before:")
    print(describe(outputs))
    arrays = tonumpy.to_numpy(outputs)
    print("after tonumpy.to_numpy(outputs):")
    print(describe(arrays))
    exact = tonumpy.to_numpy(outputs, ml_dtypes=True)
    print(f"with ml_dtypes=True the logits stay {exact['output'].logits.dtype}, bit for bit")


if __name__ == "__main__":
    main()
