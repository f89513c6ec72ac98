"""Named fixtures for the code blocks of the docs (see tests/_helpers/docs_runner.py).

A page asks for them with ``<!-- docs-test: fixtures NAME ... -->``; each is a function of a
`PageContext` that returns the names it defines in the page's namespace. The models are tiny
Hugging Face models built from configs (nothing is downloaded), and every loader yields batches
of different sequence lengths, as real evaluation loops do.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from _helpers import models as _models

VOCAB = 99
# 10 examples (not a multiple of the batch size), lengths chosen so that every batch of 4 is
# padded to a different length: 9, 12, 6
LENGTHS = (3, 9, 5, 7, 12, 4, 8, 6, 6, 3)
TARGET_LENGTHS = (4, 2, 6, 3, 5, 7, 2, 4, 3, 5)
BATCH_SIZE = 4


@dataclass
class PageContext:
    """What a fixture may use: the page's working directory and a place to register cleanups."""

    directory: Path
    namespace: dict[str, Any]
    cleanups: list[Callable[[], None]] = field(default_factory=list)


FIXTURES: dict[str, Callable[[PageContext], dict[str, Any]]] = {}


def fixture(fn: Callable[[PageContext], dict[str, Any]]) -> Callable[[PageContext], dict[str, Any]]:
    FIXTURES[fn.__name__] = fn
    return fn


def _pad(rows: list[torch.Tensor], value: int) -> torch.Tensor:
    out = torch.full((len(rows), max(len(r) for r in rows)), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def _token_examples(*, targets: bool) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    examples = []
    for i, length in enumerate(LENGTHS):
        ids = torch.randint(3, VOCAB, (length,), generator=gen)
        labels = torch.randint(3, VOCAB, (TARGET_LENGTHS[i],), generator=gen) if targets else ids
        examples.append({"input_ids": ids, "labels": labels})
    return examples


def collate(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Pad a list of examples to the longest in the batch (ids with 0, labels with -100)."""
    ids = [e["input_ids"] for e in examples]
    return {
        "input_ids": _pad(ids, 0),
        "attention_mask": _pad([torch.ones_like(i) for i in ids], 0),
        "labels": _pad([e["labels"] for e in examples], -100),
    }


def _model_names(model: torch.nn.Module, examples: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    loader = torch.utils.data.DataLoader(examples, batch_size=BATCH_SIZE, collate_fn=collate)
    return {
        "model": model,
        "dataset": examples,
        "loader": loader,
        "batch": next(iter(loader)),
        "optimizer": torch.optim.SGD(model.parameters(), lr=1e-3),
    }


def tiny_bert() -> Any:
    """A 2-layer BERT masked LM, hidden size 32, seeded (modules ``bert.encoder.layer.N``)."""
    return _models.tiny_bert(vocab_size=VOCAB)


@fixture
def bert_mlm(ctx: PageContext) -> dict[str, Any]:
    """``model``: a tiny BERT masked LM; ``loader``/``dataset``/``batch``: token batches of
    different lengths with ``labels`` (-100 on padding); ``optimizer``: SGD over the model."""
    return _model_names(tiny_bert(), _token_examples(targets=False))


@fixture
def gpt2_lm(ctx: PageContext) -> dict[str, Any]:
    """As ``bert_mlm``, with a tiny GPT-2 language model whose outputs carry its KV cache
    (``cache`` in transformers 5, ``past_key_values`` before): logits, loss and cache."""
    model = _models.tiny_gpt2(use_cache=True)
    return _model_names(model, _token_examples(targets=False))


@fixture
def bart_seq2seq(ctx: PageContext) -> dict[str, Any]:
    """As ``bert_mlm``, with a tiny BART encoder-decoder (modules ``model.encoder.layers.N``,
    ``model.decoder.layers.N``); ``labels`` are target sequences of their own lengths."""
    return _model_names(_models.tiny_bart(vocab_size=VOCAB), _token_examples(targets=True))


@fixture
def process_group(ctx: PageContext) -> dict[str, Any]:
    """A one-rank gloo process group (destroyed after the page) and ``sampler``, a
    ``DistributedSampler`` over the page's ``dataset``; ``loader`` is rebuilt to use it."""
    import torch.distributed as dist

    if dist.is_initialized():
        msg = "a process group is already initialised: a page or test did not clean up"
        raise RuntimeError(msg)
    store = ctx.directory / "process-group-store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    ctx.cleanups.append(dist.destroy_process_group)
    dataset = ctx.namespace["dataset"]
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=False)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=BATCH_SIZE, sampler=sampler, collate_fn=collate
    )
    return {"sampler": sampler, "loader": loader}


@fixture
def restore_pinned_pool_limit(ctx: PageContext) -> dict[str, Any]:
    """Nothing to the page; puts the pinned-pool limit back after it (pages may change it)."""
    from tonumpy.asynchronous import set_pinned_pool_limit

    limit = set_pinned_pool_limit(1 << 62)  # reads the limit; a larger one releases nothing
    set_pinned_pool_limit(limit)
    ctx.cleanups.append(lambda: set_pinned_pool_limit(limit))
    return {}
