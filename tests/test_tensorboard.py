"""End to end: the TensorBoard example's event files, read back with TensorBoard's own reader."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch

# tensorboard is an optional extra of tonumpy (`tonumpy[tensorboard]`); the dev extra has it.
pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import (
    EventAccumulator,
)

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "tensorboard_logging.py"
STEPS, EVERY, BATCH = 25, 10, 64


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("tensorboard_logging_example", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModuleType, dict[str, Any], Any]:
    example = load_example()
    logdir = tmp_path_factory.mktemp("tb")
    record = example.train(logdir, steps=STEPS, log_every=EVERY)
    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    return example, record, events


def test_tags_written(run: tuple[ModuleType, dict[str, Any], Any]) -> None:
    """Every layer has a histogram and an RMS scalar; loss and accuracy are scalars."""
    example, record, events = run
    tags = events.Tags()
    layers = example.LAYERS
    assert sorted(tags["histograms"]) == sorted(f"activations/{n}" for n in layers)
    assert sorted(tags["scalars"]) == sorted(["loss", "accuracy", *(f"rms/{n}" for n in layers)])
    assert set(record) == set(tags["histograms"]) | set(tags["scalars"])


def test_scalars_match_what_was_logged(run: tuple[ModuleType, dict[str, Any], Any]) -> None:
    """Scalars are at steps 0, 10, 20 with the values the loop computed (float32 in the file)."""
    _, record, events = run
    for tag in events.Tags()["scalars"]:
        read = {event.step: event.value for event in events.Scalars(tag)}
        assert sorted(read) == [0, 10, 20], tag
        for step, value in read.items():
            assert isinstance(record[tag][step], float)
            assert value == pytest.approx(record[tag][step], rel=1e-6), (tag, step)


def test_histograms_match_captured_arrays(run: tuple[ModuleType, dict[str, Any], Any]) -> None:
    """Each histogram counts, bounds and sums exactly the captured activation array."""
    _, record, events = run
    widths = {"fc1": 32, "fc2": 32, "head": 2}
    for name, width in widths.items():
        tag = f"activations/{name}"
        read = {event.step: event.histogram_value for event in events.Histograms(tag)}
        assert sorted(read) == [0, 10, 20]
        for step, hist in read.items():
            values = record[tag][step]
            assert isinstance(values, np.ndarray)
            assert values.shape == (BATCH, width)
            assert hist.num == values.size
            assert hist.min == pytest.approx(float(values.min()), rel=1e-6)
            assert hist.max == pytest.approx(float(values.max()), rel=1e-6)
            assert hist.sum == pytest.approx(float(values.astype(np.float64).sum()), rel=1e-5)
            assert sum(hist.bucket) == values.size


def test_step_zero_recomputed_independently(run: tuple[ModuleType, dict[str, Any], Any]) -> None:
    """At step 0 the model is the seeded initial one: the logged values can be recomputed."""
    example, _, events = run
    model = example.make_model(0)
    x, y = example.make_batches(1, seed=0)[0]
    with torch.no_grad():
        fc1 = model.fc1(x)
        logits = model(x)
    loss = torch.nn.functional.cross_entropy(logits, y).item()
    hist = events.Histograms("activations/fc1")[0]
    assert hist.step == 0
    assert hist.histogram_value.min == pytest.approx(fc1.min().item(), rel=1e-6)
    assert hist.histogram_value.max == pytest.approx(fc1.max().item(), rel=1e-6)
    assert hist.histogram_value.sum == pytest.approx(fc1.double().sum().item(), rel=1e-5)
    rms = events.Scalars("rms/fc1")[0]
    assert rms.value == pytest.approx(fc1.square().mean().sqrt().item(), rel=1e-6)
    assert events.Scalars("loss")[0].value == pytest.approx(loss, rel=1e-6)


def test_logging_did_not_change_training(run: tuple[ModuleType, dict[str, Any], Any]) -> None:
    """The loss curve logged with capture equals the one of the same loop without hooks."""
    example, record, _ = run
    model = example.make_model(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = {}
    for step, (x, y) in enumerate(example.make_batches(STEPS, seed=0)):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % EVERY == 0:
            losses[step] = loss.item()
    assert losses == record["loss"]
