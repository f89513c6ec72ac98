"""Tiny Hugging Face models from configs, their batches, and a reference recorder of outputs.

For the capture tests (tests/hooks/test_capture_hf.py, tests/hooks/test_tensorboard.py): what each
module did is recorded by plain forward hooks, so expected values come from torch itself, not
tonumpy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
import transformers

from _helpers import models as _models
from _helpers.docs_fixtures import tiny_bert as bert
from _helpers.models import tiny_t5


def gpt2() -> Any:
    """A tiny GPT-2 LM in eval mode."""
    return _models.tiny_gpt2().eval()


def t5() -> Any:
    """A tiny T5 in eval mode."""
    return tiny_t5().eval()


def batch(model: Any, length: int, rows: int = 2) -> dict[str, torch.Tensor]:
    """Inputs of ``rows`` sequences of ``length`` tokens (GPT-2 with its cache)."""
    gen = torch.Generator().manual_seed(length)
    ids = torch.randint(3, 99, (rows, length), generator=gen)
    if isinstance(model, transformers.GPT2LMHeadModel):
        return {"input_ids": ids, "use_cache": True}
    if isinstance(model, transformers.T5ForConditionalGeneration):
        return {"input_ids": ids, "labels": torch.randint(3, 99, (rows, 3), generator=gen)}
    return {"input_ids": ids, "labels": ids}


MODELS: dict[str, Callable[[], Any]] = {"bert": bert, "gpt2": gpt2, "t5": t5}


class Unknown:
    """What ``expected_arrays`` gives for an output it does not take apart (a KV cache)."""


def expected_arrays(key: str, out: Any) -> Iterator[tuple[str, Any]]:
    """The arrays of one module output, keyed as the issue asks, found without tonumpy."""
    if isinstance(out, torch.Tensor):
        yield key, out.detach().clone().numpy()
    elif isinstance(out, dict):  # ModelOutput: its non-None fields
        for name, value in out.items():
            yield from expected_arrays(f"{key}[{name!r}]", value)
    elif isinstance(out, tuple | list):
        for index, value in enumerate(out):
            yield from expected_arrays(f"{key}[{index}]", value)
    elif out is not None:
        yield key, Unknown()


class Recorded:
    """Plain forward hooks on every module: which modules ran, and their last output's arrays."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.last: dict[str, dict[str, Any]] = {}
        self.calls: dict[str, int] = {}
        self.handles = [
            module.register_forward_hook(self._hook(name)) for name, module in model.named_modules()
        ]

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(_module: Any, _args: Any, out: Any) -> None:
            self.last[name] = dict(expected_arrays(name, out))
            self.calls[name] = self.calls.get(name, 0) + 1

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
