"""The README's first command in Python: examples/model_outputs.pt to NumPy, before and after.

``tonumpy convert examples/model_outputs.pt model_outputs.npz`` reads the file with
``weights_only=True`` (nothing it names is imported or run) and converts every tensor. Here the
same file is read the same way: ``tonumpy.io.read`` gives its tree as stored (tensors, with
grad and bfloat16), ``tonumpy.load`` gives it converted, exactly as ``tonumpy.load`` gives back
the ``.npz`` the command writes. Key paths come from ``tonumpy.apply(..., with_path=True)``,
which visits a dict's keys in sorted order (as optree does); ``tonumpy show`` lists them as stored.

Run from anywhere: python examples/model_outputs.py
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

import tonumpy
import tonumpy.io

EXAMPLE = Path(__file__).with_name("model_outputs.pt")
#: The leaves to list: tensors, arrays and plain values (containers are walked into).
LEAVES = (torch.Tensor, np.ndarray, str, int, float)


def describe(tree: Any) -> str:
    """One line per leaf: its key path and what it is."""
    lines: list[str] = []

    def line(path: tuple[Any, ...], leaf: Any) -> Any:
        lines.append(f"  {'.'.join(map(str, path)):<28} {_kind(leaf)}")
        return leaf

    tonumpy.apply(line, tree, types=LEAVES, with_path=True)
    return "\n".join(lines)


def _kind(leaf: Any) -> str:
    if isinstance(leaf, torch.Tensor):
        grad = ", grad" if leaf.requires_grad else ""
        return f"Tensor {tuple(leaf.shape)} {leaf.dtype}{grad}"
    if isinstance(leaf, np.ndarray):
        return f"ndarray {leaf.shape} {leaf.dtype}"
    return repr(leaf)


def main() -> None:
    stored = tonumpy.io.read(EXAMPLE).tree
    print(f"{EXAMPLE.name}, as stored (tonumpy.io.read):")
    print(describe(stored))
    arrays = tonumpy.load(EXAMPLE)
    print("converted (tonumpy.load, as `tonumpy convert` converts it):")
    print(describe(arrays))
    exact = tonumpy.load(EXAMPLE, ml_dtypes=True)["model_output"]["logits"]
    print(f"with ml_dtypes=True (--ml-dtypes) the logits stay {exact.dtype}, bit for bit")


if __name__ == "__main__":
    main()
