"""Tests of ``tonumpy.lightning.PredictionWriter`` on the real Lightning Trainer, on CPU.

One ``strategy="ddp_spawn"`` run on 2 devices (two processes, gloo) and one on 1 device: the
shards each rank wrote read back, with ``tonumpy.load``, as the model's outputs on the whole
dataset in dataset order (the predict dataloader's sampler splits 11 items unevenly: 6 and 5).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from torch.utils.data import DataLoader, Dataset, IterableDataset

import tonumpy
from _helpers.trees import assert_same_tree
from tonumpy import FileFormatError, OptionError
from tonumpy.lightning import PredictionWriter

N = 11


class _Items(Dataset):  # type: ignore[type-arg]
    """A map-style dataset of ``N`` items (Lightning gives its batches' indices)."""

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor([i / 2, 1.0 - i])


class _Model(LightningModule):
    """A tiny model whose predictions carry a per-sample tree and a per-batch value."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)

    def predict_step(
        self, batch: torch.Tensor, batch_idx: int, dataloader_idx: int = 0
    ) -> dict[str, Any]:
        logits = self(batch)
        return {"logits": logits, "hidden": [logits * 2], "cache": logits, "mean": batch.mean()}


def top1(t: torch.Tensor) -> torch.Tensor:
    """A reduce function defined at module level: ddp_spawn pickles the callback."""
    return t.argmax(-1)


def _expected(model: _Model) -> dict[str, np.ndarray]:
    x = torch.stack([_Items()[i] for i in range(N)])
    with torch.no_grad():
        logits = model(x).numpy()
    return {"logits": logits.argmax(-1), "hidden": logits * 2}


def _trainer(devices: int, writer: PredictionWriter, tmp_path: Path) -> Trainer:
    return Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",
        callbacks=[writer],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )


@pytest.mark.parametrize(
    ("devices", "format"),
    [(1, "npy"), (2, "npy"), (1, "parquet")],
    ids=["1-npy", "2-npy", "1-parquet"],
)
def test_predictions_in_dataset_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, devices: int, format: str
) -> None:
    """Each rank writes its shard; the set reads as the whole dataset's predictions, in order."""
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    model = _Model()
    writer = PredictionWriter(
        tmp_path / "preds", reduce={"logits": top1}, exclude="cache", pad_value=0, format=format
    )
    loader = DataLoader(_Items(), batch_size=4)
    _trainer(devices, writer, tmp_path).predict(model, loader, return_predictions=False)
    shards = sorted(p.name for p in (tmp_path / "preds").iterdir())
    assert shards == [f"rank-{r:05d}-of-{devices:05d}" for r in range(devices)]
    out = tonumpy.load(tmp_path / "preds")
    expected = _expected(model)
    assert_same_tree(out["logits"], expected["logits"])
    np.testing.assert_allclose(out["hidden"][0], expected["hidden"], rtol=1e-6)
    assert out["cache"] is None
    # one mean per batch: 3 batches of 4, 4, 3 (one device), or 2 per rank of 6 and 5 items
    assert out["mean"].shape == ((3,) if devices == 1 else (4,))
    if format == "parquet":
        assert (tmp_path / "preds/rank-00000-of-00001/predictions.parquet").is_file()


class _Stream(IterableDataset):  # type: ignore[type-arg]
    """An iterable dataset: Lightning gives no batch indices."""

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(_Items()[i] for i in range(N))


def test_second_dataloader_and_iterable_dataset(tmp_path: Path) -> None:
    """A second predict dataloader goes to dataloader-1/; without indices, rows stay in order."""
    model = _Model()
    writer = PredictionWriter(tmp_path / "preds")
    loaders = [DataLoader(_Items(), batch_size=4), DataLoader(_Stream(), batch_size=5)]
    with pytest.warns(UserWarning, match="Couldn't infer the batch indices"):  # the stream's
        _trainer(1, writer, tmp_path).predict(model, loaders, return_predictions=False)
    first, second = tonumpy.load(tmp_path / "preds"), tonumpy.load(tmp_path / "preds/dataloader-1")
    x = torch.stack([_Items()[i] for i in range(N)])
    with torch.no_grad():
        expected = model(x).numpy()
    for out in (first, second):
        np.testing.assert_allclose(out["logits"], expected, rtol=1e-6)
    assert second["mean"].shape == (3,)  # batches of 5, 5, 1
    assert (
        json.loads((tmp_path / "preds/rank-00000-of-00001/__shard__.json").read_text())["num_items"]
        == N
    )  # the map-style dataset's length, recorded to be proven on reading


def test_a_crashed_rank_is_refused(tmp_path: Path) -> None:
    """A set whose shard was never closed (its rank died mid-predict) does not read."""
    model = _Model()
    writer = PredictionWriter(tmp_path / "preds")
    _trainer(1, writer, tmp_path).predict(
        model, DataLoader(_Items(), batch_size=4), return_predictions=False
    )
    acc = tonumpy.Accumulator(directory=tmp_path / "preds", shard=(0, 1), resume=True)
    acc.append(model.predict_step(_Items()[0][None], 0), index=[0])
    with pytest.raises(FileFormatError, match="rank-00000-of-00001 is incomplete"):
        tonumpy.load(tmp_path / "preds")


def test_format_option() -> None:
    """.npy and Parquet shards are written; other formats are refused."""
    with pytest.raises(OptionError, match="format='csv'"):
        PredictionWriter("x", format="csv")


def test_import_tonumpy_does_not_import_lightning() -> None:
    """Lightning is imported by tonumpy.lightning only."""
    code = (
        "import sys, tonumpy; print(sorted({'lightning', 'pytorch_lightning'} & set(sys.modules)))"
    )
    assert (
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout.strip()
        == "[]"
    )
