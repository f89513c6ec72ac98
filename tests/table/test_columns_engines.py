"""to_columns as the UDF of Ray Data's map_batches and of datasets' map(batched=True).

The real engines run on CPU (one local Ray instance for the module, ``num_cpus=2``); a tiny BERT
built from a config inside the worker computes ``logits`` and ``hidden_states`` for batches of
token ids whose lengths differ from batch to batch. Rebuilt with ``from_columns``, the rows equal
those of one process running the same model into a ``tonumpy.Accumulator``, value for value.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import tonumpy
from _helpers.models import tiny_bert

# Ray Data's own settings warn about their deprecations when it starts (not tonumpy's business)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*")

ROWS, BATCH = 10, 4
# patterns that match BertModel's output (one that matches nothing warns: UnmatchedPatternWarning)
OPTIONS: dict[str, Any] = {
    "exclude": "attentions",
    "reduce": {"last_hidden_state": lambda t: t.double()},
}


def _examples() -> list[dict[str, Any]]:
    """Token ids of different lengths: each batch is padded to its own longest."""
    rng = np.random.default_rng(0)
    return [
        {"idx": i, "ids": rng.integers(1, 99, size=3 + (i * 7) % 5).tolist()} for i in range(ROWS)
    ]


def _pad(ids: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(x) for x in ids)
    input_ids = torch.zeros(len(ids), longest, dtype=torch.long)
    mask = torch.zeros(len(ids), longest, dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = torch.as_tensor(np.asarray(x, dtype=np.int64))
        mask[i, : len(x)] = 1
    return input_ids, mask


class Predict:
    """The UDF: builds its model from a config in the worker (a model pickled into a worker
    after a forward pass fails to pickle, and one pickled before loses ``hidden_states``)."""

    def __init__(self) -> None:
        torch.set_num_threads(1)
        self.model = tiny_bert(__import__("transformers").BertModel).eval()

    def __call__(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        input_ids, mask = _pad(list(batch["ids"]))
        with torch.no_grad():
            out = self.model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True)
        return {"idx": np.asarray(batch["idx"]), **tonumpy.to_columns(out, **OPTIONS)}


def _reference() -> tuple[Any, str]:
    """One process, the same model and batches, into an Accumulator; and the structure."""
    predict = Predict()
    acc = tonumpy.Accumulator(pad_value=0.0, **OPTIONS)
    examples = _examples()
    structure = None
    for start in range(0, ROWS, BATCH):
        ids = [e["ids"] for e in examples[start : start + BATCH]]
        input_ids, mask = _pad(ids)
        with torch.no_grad():
            out = predict.model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True)
        acc.append(out)
        structure = structure or tonumpy.column_structure(out, **OPTIONS)
    assert structure is not None
    return acc.result(), structure


def _check(rebuilt: Any, reference: Any) -> None:
    assert rebuilt["last_hidden_state"].shape == (ROWS, 7, 32)
    assert len(rebuilt["hidden_states"]) == 3
    np.testing.assert_array_equal(rebuilt["last_hidden_state"], reference["last_hidden_state"])
    np.testing.assert_array_equal(rebuilt["pooler_output"], reference["pooler_output"])
    for got, want in zip(rebuilt["hidden_states"], reference["hidden_states"], strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.fixture(scope="module")
def ray_local() -> Iterator[Any]:
    ray = pytest.importorskip("ray")
    # workers import this module (the UDF's class) and _helpers.models: they need its folder
    # and tests/ on their path
    here = Path(__file__).resolve().parent
    path = os.pathsep.join([str(here), str(here.parent), os.environ.get("PYTHONPATH", "")])
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        runtime_env={"env_vars": {"PYTHONPATH": path}},
    )
    yield ray
    ray.shutdown()


def test_ray_data_map_batches_equals_one_process(ray_local: Any) -> None:
    """Ray Data map_batches with to_columns; from_columns of the rows equals the Accumulator."""
    import ray.data

    ds = ray.data.from_items(_examples(), override_num_blocks=1)
    out = ds.map_batches(Predict, batch_size=BATCH, concurrency=1, batch_format="numpy")
    columns = out.take_batch(ROWS, batch_format="numpy")
    order = np.argsort(columns["idx"])
    columns = {
        k: np.asarray(v)[order] if not isinstance(v, list) else [v[i] for i in order]
        for k, v in columns.items()
    }
    reference, structure = _reference()
    _check(tonumpy.from_columns(columns, structure, pad_value=0.0), reference)


def test_datasets_map_batched_equals_one_process(tmp_path: Path) -> None:
    """Hugging Face datasets map(batched=True) with to_columns; same rows as the Accumulator."""
    datasets = pytest.importorskip("datasets")
    predict = Predict()
    ds = datasets.Dataset.from_list(_examples())
    mapped = ds.map(
        predict,
        batched=True,
        batch_size=BATCH,
        remove_columns=["ids"],
        cache_file_name=str(tmp_path / "cache.arrow"),
    )
    mapped.set_format("numpy")
    reference, structure = _reference()
    _check(tonumpy.from_columns(mapped[:], structure, pad_value=0.0), reference)
    path = tmp_path / "preds.parquet"
    mapped.to_parquet(str(path))  # datasets writes the columns; tonumpy reads them back
    plain = tonumpy.load(path)  # no tonumpy metadata: nested by column name, ragged as lists
    assert sorted(plain) == sorted(["idx", "last_hidden_state", "pooler_output", "hidden_states"])
    assert isinstance(plain["last_hidden_state"], list)
    rebuilt = tonumpy.from_columns({"last_hidden_state": plain["last_hidden_state"]}, pad_value=0.0)
    np.testing.assert_array_equal(rebuilt["last_hidden_state"], reference["last_hidden_state"])
