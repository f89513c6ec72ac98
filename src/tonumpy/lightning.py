"""Lightning's ``trainer.predict`` into one dataset-ordered result: ``PredictionWriter``.

Importing this module imports Lightning (``lightning.pytorch``, else ``pytorch_lightning``);
``import tonumpy`` never does.

Each rank's ``predict_step`` outputs go, batch by batch, into an
[`tonumpy.Accumulator`][] shard of its own (``directory/rank-RRRRR-of-WWWWW/``, written with
no collective), with the batch's dataset indices that Lightning gives
``write_on_batch_end`` (``batch_indices``: for map-style datasets, whose dataloader has a
sampler). When the prediction epoch ends, every shard is closed, recording the dataset's
length, and [`tonumpy.load`][] of ``directory`` reads the set as one tree in dataset order,
proving that every item was predicted exactly once.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ._combine._pad import PadValue
from ._combine._select import Pattern
from .accumulate import Accumulator, check_format


def _writer_base() -> Any:
    """Lightning's ``BasePredictionWriter`` (``lightning.pytorch``, else ``pytorch_lightning``)."""
    try:
        from lightning.pytorch.callbacks import BasePredictionWriter  # noqa: PLC0415
    except ImportError:  # pragma: no cover - the older package name
        try:
            from pytorch_lightning.callbacks import (  # type: ignore[assignment] # noqa: PLC0415
                BasePredictionWriter,
            )
        except ImportError:
            raise ImportError(
                "tonumpy.lightning needs Lightning: pip install lightning (it keeps an "
                "installed torch that satisfies it)"
            ) from None
    return BasePredictionWriter


__all__ = ["PredictionWriter"]


class PredictionWriter(_writer_base()):  # type: ignore[misc] # Lightning's class, found on import
    """A Lightning callback that writes every rank's predictions as a set of shards.

    Examples:
        >>> import torch, tempfile, tonumpy
        >>> from lightning.pytorch import LightningModule, Trainer
        >>> from torch.utils.data import DataLoader
        >>> class Model(LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.layer = torch.nn.Linear(1, 2)
        ...     def predict_step(self, batch, batch_idx):
        ...         return {"scores": self.layer(batch[:, None]), "mean": batch.mean()}
        >>> directory = tempfile.mkdtemp()
        >>> trainer = Trainer(accelerator="cpu", devices=1, logger=False,
        ...                   enable_progress_bar=False, enable_model_summary=False,
        ...                   callbacks=[PredictionWriter(directory)])
        >>> loader = DataLoader(torch.arange(5.0), batch_size=2)
        >>> trainer.predict(Model(), loader, return_predictions=False)
        >>> out = tonumpy.load(directory)
        >>> out["scores"].shape, out["mean"]  # one mean per batch
        ((5, 2), array([0.5, 2.5, 4. ], dtype=float32))

    Args:
        directory: Where the shards go: ``directory/rank-RRRRR-of-WWWWW/`` for the first
            prediction dataloader, ``directory/dataloader-K/rank-.../`` for dataloader
            ``K >= 1``. It must not hold another run's shards.
        reduce: As for [`tonumpy.Accumulator`][]: functions run on chosen outputs, on the
            device, before they are moved (``{"logits": lambda t: t.argmax(-1)}``). With
            ``strategy="ddp_spawn"`` the callback is pickled into each process: use functions
            defined at module level (a lambda does not pickle).
        exclude: As for [`tonumpy.Accumulator`][]: outputs to leave out.
        format: The shards' format: ``"npy"`` (one ``.npy`` file per leaf) or ``"parquet"``
            (one Parquet file per rank, a row group per batch; see
            [`tonumpy.Accumulator`][]).
        pad_value: As for [`tonumpy.Accumulator`][]: how to pad outputs whose batches differ
            in a dimension other than the first.
        ml_dtypes: Keep bfloat16/float8 bit-exact (see [`tonumpy.to_numpy`][]).

    Raises:
        OptionError: ``format`` is not ``"npy"`` or ``"parquet"`` (the other options are
            checked by the first batch's ``Accumulator``).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        reduce: Mapping[Pattern, Callable[[Any], Any]] | None = None,
        exclude: Pattern | list[Pattern] | None = None,
        format: str = "npy",
        pad_value: PadValue = None,
        ml_dtypes: bool = False,
    ) -> None:
        super().__init__(write_interval="batch")
        check_format(format, "PredictionWriter")
        self.directory = Path(directory)
        self.options: dict[str, Any] = {
            "reduce": reduce,
            "exclude": exclude,
            "format": format,
            "pad_value": pad_value,
            "ml_dtypes": ml_dtypes,
        }
        self._accumulators: dict[int, Accumulator] = {}  # made in each process, never pickled
        self._indexed: dict[int, bool] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_accumulators"], state["_indexed"] = {}, {}
        return state

    def _accumulator(self, trainer: Any, dataloader_idx: int) -> Accumulator:
        acc = self._accumulators.get(dataloader_idx)
        if acc is None:
            parent = self.directory
            if dataloader_idx:
                parent = parent / f"dataloader-{dataloader_idx}"
            acc = Accumulator(
                directory=parent, shard=(trainer.global_rank, trainer.world_size), **self.options
            )
            self._accumulators[dataloader_idx] = acc
        return acc

    def write_on_batch_end(  # noqa: PLR0917 - Lightning's signature
        self,
        trainer: Any,
        pl_module: Any,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        """Append this batch's prediction, with its dataset indices when Lightning has them.

        Lightning records the indices in its batch sampler (map-style datasets); for a loader
        it cannot follow (an iterable dataset) it warns and passes the previous loader's
        indices along, so those are not used.
        """
        acc = self._accumulator(trainer, dataloader_idx)
        loader = _loaders(trainer)[dataloader_idx]
        if not hasattr(getattr(loader, "batch_sampler", None), "seen_batch_indices"):
            batch_indices = None
        self._indexed[dataloader_idx] = batch_indices is not None
        acc.append(prediction, index=list(batch_indices) if batch_indices is not None else None)

    def on_predict_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        """Close every shard of this rank (an empty one for a dataloader it had no batch of)."""
        for k, loader in enumerate(_loaders(trainer)):
            num_items = None
            dataset: Any = getattr(loader, "dataset", None)
            if self._indexed.get(k) and hasattr(dataset, "__len__"):
                num_items = len(dataset)
            self._accumulator(trainer, k).close(num_items=num_items)
        self._accumulators.clear()


def _loaders(trainer: Any) -> list[Any]:
    """The trainer's prediction dataloaders, as a list."""
    given = trainer.predict_dataloaders
    return list(given) if isinstance(given, list | tuple) else [given]
