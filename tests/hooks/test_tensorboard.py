"""End to end: event files of the TensorBoard example and of the logging guide's recipe, read
back with TensorBoard's own reader, on tiny BERT models built from configs."""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch

# tensorboard is an optional extra of tonumpy (`tonumpy[tensorboard]`); the dev extra has it.
pytest.importorskip("tensorboard")
pytest.importorskip("transformers")
from tensorboard.backend.event_processing.event_accumulator import (
    EventAccumulator,
)

from _helpers.capture_models import Recorded
from _helpers.docs_runner import PageRun, parse_page

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "tensorboard_logging.py"
GUIDE = ROOT / "docs" / "guides" / "logging-hooks.md"
STEPS, EVERY, BATCH = 21, 10, 16  # step 20, the last, is captured: logged after the loop


def read_events(logdir: Path) -> Any:
    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    return events


# ------------------------------------------------------------------------------ the example


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
    return example, record, read_events(logdir)


LAYERS = ["bert.encoder.layer.0", "bert.encoder.layer.1"]
KEYS = [key for layer in LAYERS for key in (layer, f"{layer}.attention[0]")]


def test_tags_written(run: tuple[ModuleType, dict[str, Any], Any]) -> None:
    """Every layer, and the tensor part of every attention module's tuple, has a histogram and an
    RMS scalar; loss and accuracy are scalars."""
    _, record, events = run
    tags = events.Tags()
    assert sorted(tags["histograms"]) == sorted(f"activations/{key}" for key in KEYS)
    assert sorted(tags["scalars"]) == sorted(["loss", "accuracy", *(f"rms/{k}" for k in KEYS)])
    assert set(record) == set(tags["histograms"]) | set(tags["scalars"])


def test_scalars_match_what_was_logged(run: tuple[ModuleType, dict[str, Any], Any]) -> None:
    """Scalars are at steps 0, 10, 20 (the last step too) with the values the loop computed."""
    _, record, events = run
    for tag in events.Tags()["scalars"]:
        read = {event.step: event.value for event in events.Scalars(tag)}
        assert sorted(read) == [0, 10, 20], tag
        for step, value in read.items():
            assert isinstance(record[tag][step], float)
            assert value == pytest.approx(record[tag][step], rel=1e-6), (tag, step)


def test_histograms_match_captured_arrays(run: tuple[ModuleType, dict[str, Any], Any]) -> None:
    """Each histogram counts, bounds and sums exactly the captured array of its step, whose
    sequence length is that step's batch's."""
    example, record, events = run
    lengths = [b["input_ids"].shape[1] for b in example.make_batches(STEPS, seed=0)]
    assert len(set(lengths)) > 1
    for key in KEYS:
        tag = f"activations/{key}"
        read = {event.step: event.histogram_value for event in events.Histograms(tag)}
        assert sorted(read) == [0, 10, 20]
        for step, hist in read.items():
            values = record[tag][step]
            assert isinstance(values, np.ndarray)
            assert values.shape == (BATCH, lengths[step], 32)
            assert hist.num == values.size
            assert hist.min == pytest.approx(float(values.min()), rel=1e-6)
            assert hist.max == pytest.approx(float(values.max()), rel=1e-6)
            assert hist.sum == pytest.approx(float(values.astype(np.float64).sum()), rel=1e-4)
            assert sum(hist.bucket) == values.size


def test_step_zero_recomputed_independently(run: tuple[ModuleType, dict[str, Any], Any]) -> None:
    """At step 0 the model is the seeded initial one: the logged values can be recomputed."""
    example, _, events = run
    model = example.make_model(0)
    batch = example.make_batches(1, seed=0)[0]
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    for index, layer in enumerate(LAYERS):
        hidden = out.hidden_states[index + 1]  # the output of layer `index`
        hist = events.Histograms(f"activations/{layer}")[0]
        assert hist.step == 0
        assert hist.histogram_value.min == pytest.approx(hidden.min().item(), rel=1e-5)
        assert hist.histogram_value.max == pytest.approx(hidden.max().item(), rel=1e-5)
        assert hist.histogram_value.sum == pytest.approx(hidden.double().sum().item(), abs=1e-2)
        rms = events.Scalars(f"rms/{layer}")[0]
        assert rms.value == pytest.approx(hidden.square().mean().sqrt().item(), rel=1e-5)
    assert events.Scalars("loss")[0].value == pytest.approx(out.loss.item(), rel=1e-5)


def test_logging_did_not_change_training(run: tuple[ModuleType, dict[str, Any], Any]) -> None:
    """The loss curve logged with capture equals the one of the same loop without hooks."""
    example, record, _ = run
    model = example.make_model(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = {}
    for step, batch in enumerate(example.make_batches(STEPS, seed=0)):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % EVERY == 0:
            losses[step] = loss.item()
    assert losses == record["loss"]


# ----------------------------------------------------------- the logging guide's recipe


@pytest.fixture(scope="module")
def guide(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict[str, Any], Path]]:
    """The logging guide run as the docs test runs it, through its TensorBoard recipe (as
    written: it trains on the page's loader and logs to runs/exp); its namespace and directory."""
    steps = parse_page(GUIDE)
    target = next(
        i for i, s in enumerate(steps) if s.block is not None and "SummaryWriter(" in s.block.code
    )
    directory = tmp_path_factory.mktemp("guide")
    page = PageRun(GUIDE, steps, directory, types.ModuleType("guide_logging_hooks"))
    cwd = Path.cwd()
    os.chdir(directory)
    try:
        page.run_through(target)
        yield page.module.__dict__, directory
    finally:
        os.chdir(cwd)
        page.close()


def layer_sizes(namespace: dict[str, Any]) -> list[dict[str, int]]:
    """Per batch of the page's loader: the size of every array of bert.encoder.layer.** (found
    with plain forward hooks), keyed as Activations.arrays() keys them."""
    model = namespace["model"]
    sizes = []
    recorded = Recorded(model)
    try:
        for batch in namespace["loader"]:
            recorded.last.clear()
            with torch.no_grad():
                model(**batch)
            sizes.append(
                {
                    key: value.size
                    for name, arrays in recorded.last.items()
                    if name.startswith("bert.encoder.layer")
                    and name != "bert.encoder.layer"  # a ModuleList: never called anyway
                    for key, value in arrays.items()
                }
            )
    finally:
        recorded.remove()
    return sizes


def check_events(logdir: Path, expected_steps: list[int], sizes: list[dict[str, int]]) -> None:
    events = read_events(logdir)
    assert events.Tags()["scalars"] == ["loss"]
    assert [e.step for e in events.Scalars("loss")] == expected_steps
    keys = sizes[0].keys()
    assert any(key.endswith(".attention[0]") for key in keys)  # tuples are logged
    assert sorted(events.Tags()["histograms"]) == sorted(f"activations/{k}" for k in keys)
    for key in keys:
        read = events.Histograms(f"activations/{key}")
        assert [e.step for e in read] == expected_steps
        for event in read:  # each step's histogram has the size of that step's batch
            assert event.histogram_value.num == sizes[event.step][key], (key, event.step)


def test_guide_recipe_as_written(guide: tuple[dict[str, Any], Path]) -> None:
    """The recipe as written (log_every=100, a loader of 3 batches) logs step 0: the loss and a
    histogram of every array of the layers, tuples of the attention modules included."""
    namespace, directory = guide
    check_events(directory / "runs" / "exp", [0], layer_sizes(namespace))


@pytest.mark.parametrize(("log_every", "steps"), [(2, [0, 2]), (1, [0, 1, 2])])
def test_guide_recipe_logs_the_last_step_and_each_step_its_own(
    guide: tuple[dict[str, Any], Path], tmp_path: Path, log_every: int, steps: list[int]
) -> None:
    """The guide's train(): the last captured step (2) is logged after the loop, and with
    log_every=1 each step's histograms are that step's (batches of 9, 12 and 6 tokens)."""
    namespace, _ = guide
    sizes = layer_sizes(namespace)
    assert len({tuple(s.values()) for s in sizes}) == 3  # every batch has its own shapes
    writer = namespace["SummaryWriter"](str(tmp_path))
    namespace["train"](
        namespace["model"], namespace["loader"], namespace["optimizer"], writer,
        log_every=log_every,
    )  # fmt: skip
    writer.close()
    check_events(tmp_path, steps, sizes)
