"""capture on real Hugging Face models (tiny, from configs): issue 15, items 1-4.

What each module did is recorded by plain forward hooks registered beside capture's, in the same
forward, so that the expected values and the set of modules that ran come from torch itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import tonumpy
from _helpers.engine import HostEngine
from tonumpy import CaptureError, ConversionError, capture
from tonumpy.hooks import _capturing

transformers = pytest.importorskip("transformers")
from _helpers.capture_models import MODELS, Recorded, Unknown, batch, bert, gpt2  # noqa: E402


def run(
    model: Any, *lengths: int, engine: HostEngine | None = None, **options: Any
) -> tuple[tonumpy.Activations, Recorded]:
    hooked = (
        capture(model, **options) if engine is None else _capturing(model, engine=engine, **options)
    )
    with hooked as acts:
        recorded = Recorded(model)
        try:
            for length in lengths:
                model(**batch(model, length))
        finally:
            recorded.remove()
    return acts, recorded


# --------------------------------------------------------------------------- item 1: patterns


def test_bert_layer_pattern_chooses_the_layers() -> None:
    """The issue's pattern: 'bert.encoder.layer.*' is the 2 layers (fnmatch: 36 modules)."""
    model = bert()
    every = [name for name, _ in model.named_modules()]
    assert len([n for n in every if n.startswith("bert.encoder.layer.")]) == 36
    layers = ["bert.encoder.layer.0", "bert.encoder.layer.1"]
    assert tonumpy.module_names(model, include="bert.encoder.layer.*") == layers
    assert tonumpy.module_names(model, include="**.layer.*") == layers
    attention = tonumpy.module_names(model, include="**.attention")
    assert attention == [f"{name}.attention" for name in layers]
    with pytest.raises(CaptureError, match=r"'\*\*\.encoder\.layer\.\*' matches 2"):
        tonumpy.module_names(model, include="encoder.layer.*")


# ----------------------------------------------------------- item 3: modules that never ran


@pytest.mark.parametrize("name", MODELS)
def test_only_modules_that_ran_are_in_the_mapping(name: str) -> None:
    """Modules never called (a ModuleList, the dropout an SDPA kernel skips) are hooked but not
    listed; every listed module has calls, so the guide's calls[-1] works on each."""
    model = MODELS[name]()
    acts, recorded = run(model, 5)
    every = [n for n, _ in model.named_modules()]
    ran = [n for n in every if n in recorded.last]
    never = [n for n in every if n not in recorded.last]
    assert never, "each of these models has modules that never run"
    assert acts.chosen == tuple(every)
    assert list(acts) == ran
    assert len(acts) == len(ran)
    assert [n for n, calls in acts.items()] == ran
    assert [len(calls) for calls in acts.values()] == [recorded.calls[n] for n in ran]
    for module, calls in acts.items():
        assert calls[-1] is not None or recorded.last[module] == {}
    for module in never:
        assert module not in acts
        assert acts.get(module) is None
        assert acts.num_calls(module) == 0
        with pytest.raises(KeyError, match="is hooked but has no captured call"):
            acts[module]
        with pytest.raises(ConversionError, match="no captured call"):
            acts.concat(module)
    with pytest.raises(KeyError, match=r"is not a hooked module; acts\.chosen lists the"):
        acts["no.such.module"]
    with pytest.raises(KeyError, match="is not a hooked module"):
        acts.num_calls("no.such.module")


def test_bert_sdpa_dropout_never_runs() -> None:
    """The issue's example: attention.self.dropout under SDPA is hooked, never called."""
    model = bert()
    if model.config._attn_implementation != "sdpa":  # pragma: no cover - older transformers
        pytest.skip("attention is not SDPA in this transformers version")
    dropout = "bert.encoder.layer.0.attention.self.dropout"
    acts, _ = run(model, 4, include="bert.encoder.layer.0.**")
    assert dropout in acts.chosen
    assert dropout not in list(acts)
    assert "bert.encoder.layer.0.attention.self" in acts


def test_clear_and_every_leave_only_modules_with_calls() -> None:
    """After clear(), and on forwards every= skips, no module is listed until it is captured."""
    model = bert()
    with capture(model, include="**.attention", every=2) as acts:
        model(**batch(model, 4))
        assert list(acts) == ["bert.encoder.layer.0.attention", "bert.encoder.layer.1.attention"]
        acts.clear()
        assert list(acts) == []
        assert len(acts) == 0
        model(**batch(model, 4))  # forward 1: skipped
        assert dict(acts) == {}
        model(**batch(model, 4))  # forward 2: captured
        assert len(acts) == 2


# ------------------------------------------------------- item 2: outputs that are not tensors


@pytest.mark.parametrize("name", MODELS)
def test_arrays_flattens_every_call_to_named_arrays(name: str) -> None:
    """acts.arrays(): each array of each module's last call, under the module name and its place
    in the output (tuples of HF attention modules, ModelOutputs; None left out)."""
    model = MODELS[name]()
    acts, recorded = run(model, 3, 6)
    arrays = acts.arrays()
    assert all(isinstance(value, np.ndarray) for value in arrays.values())
    checked = tuples = 0
    for module in acts:
        expected = recorded.last[module]
        if any(isinstance(value, Unknown) for value in expected.values()):
            continue  # holds a KV cache: see the GPT-2 test below
        mine = {key for key in arrays if key == module or key.startswith(module + "[")}
        assert mine == set(expected), module  # nothing more, nothing less
        for key, value in expected.items():
            np.testing.assert_array_equal(arrays[key], value)
            checked += 1
        tuples += isinstance(acts[module][-1], tuple)
    assert checked > 20
    assert tuples > 0, "attention modules return tuples"


def test_arrays_of_gpt2_name_cache_and_tuples() -> None:
    """GPT-2 with its cache: the attention tuple's output is 'attn[0]' (its None is left out),
    the root's logits and every cache array are named by their place."""
    model = gpt2()
    acts, recorded = run(model, 4)
    arrays = acts.arrays()
    attn = "transformer.h.0.attn"
    assert f"{attn}[0]" in arrays
    assert not any(key.startswith(f"{attn}[1]") for key in arrays)  # the attention weights: None
    np.testing.assert_array_equal(arrays["['logits']"], recorded.last[""]["['logits']"])
    cache = [key for key in arrays if key.startswith("['cache']")]
    assert cache
    assert len(cache) == 4  # 2 layers x (keys, values)
    assert all(arrays[key].shape == (2, 2, 4, 16) for key in cache)


def test_arrays_call_index_and_errors() -> None:
    """call= picks which call (0: the first); a module without that call is named."""
    model = bert()
    layer = "bert.encoder.layer.0"
    acts, _ = run(model, 3, 7, include=[layer, "cls"])
    assert acts.arrays(call=0)[layer].shape == (2, 3, 32)
    assert acts.arrays()[layer].shape == (2, 7, 32)
    assert acts.arrays(call=-2)[layer].shape == (2, 3, 32)
    with pytest.raises(IndexError, match=r"module 'bert.encoder.layer.0' has 2 captured"):
        acts.arrays(call=2)
    with pytest.raises(tonumpy.OptionError, match="call="):
        acts.arrays(call=True)


def test_arrays_numbers_and_collisions() -> None:
    """scalars=True reductions give numbers; two leaves under one key are refused."""
    from collections import namedtuple

    Pair = namedtuple("Pair", ["y", "z"])  # a field named like a submodule

    class Outer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.y = torch.nn.Identity()

        def forward(self, x: torch.Tensor) -> Any:
            return Pair(self.y(x), None)

    model = torch.nn.Sequential(Outer())
    with capture(model, include="0.**", reduce=lambda t: t.sum(), scalars=True) as acts:
        model(torch.ones(2))
    with pytest.raises(ConversionError, match=r"two arrays would be named '0\.y'"):
        acts.arrays()
    with capture(model, include="0", reduce=lambda t: t.sum(), scalars=True) as acts:
        model(torch.ones(2))
    assert acts.arrays() == {"0.y": 2.0}


def test_tensorboard_histograms_of_real_models(tmp_path: Path) -> None:
    """The logging guide's histogram loop, over arrays(), writes every array of BERT, GPT-2 and
    T5 (tuples and ModelOutputs included), read back with TensorBoard's own reader."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    for name, make in MODELS.items():
        model = make()
        acts, _ = run(model, 5, exclude="")
        logdir = tmp_path / name
        writer = SummaryWriter(str(logdir))
        arrays = acts.arrays()
        for tag, array in arrays.items():
            writer.add_histogram(f"activations/{tag}", array, 7)
        writer.close()
        events = EventAccumulator(str(logdir), size_guidance={"histograms": 0})
        events.Reload()
        assert sorted(events.Tags()["histograms"]) == sorted(f"activations/{t}" for t in arrays)
        for tag, array in arrays.items():
            (event,) = events.Histograms(f"activations/{tag}")
            assert event.step == 7
            assert event.histogram_value.num == array.size
            assert event.histogram_value.max == pytest.approx(float(array.max()), rel=1e-6)


# ------------------------------------------------------------------ item 4: concat pads calls


def test_concat_pads_calls_of_different_lengths() -> None:
    """Batches of 5, 9 and 3 tokens: concat pads each leaf to 9 with pad_value, meaning what it
    means for tonumpy.concat (a value, a mapping by key path, a callable (path, dtype))."""
    model = bert()
    layer, attention = "bert.encoder.layer.1", "bert.encoder.layer.1.attention"
    acts, recorded = run(model, 5, 9, 3, include=[layer, attention])
    calls = acts[layer]
    assert [c.shape for c in calls] == [(2, 5, 32), (2, 9, 32), (2, 3, 32)]
    joined = acts.concat(layer, pad_value=-7.0)
    assert joined.shape == (6, 9, 32)
    assert joined.dtype == np.float32
    for i, (call, length) in enumerate(zip(calls, (5, 9, 3), strict=True)):
        np.testing.assert_array_equal(joined[2 * i : 2 * i + 2, :length], call)
        assert (joined[2 * i : 2 * i + 2, length:] == -7.0).all()
    np.testing.assert_array_equal(joined, tonumpy.concat(calls, pad_value=-7.0))
    np.testing.assert_array_equal(joined[4:, :3], recorded.last[layer][layer])  # torch's own
    # a tuple output: pad_value by key path, and by a callable of (path, dtype)
    by_path = acts.concat(attention, pad_value={(0,): 0.5})
    assert type(by_path) is tuple
    assert by_path[0].shape == (6, 9, 32)
    assert by_path[1] is None
    np.testing.assert_array_equal(
        by_path[0], tonumpy.concat(acts[attention], pad_value={(0,): 0.5})[0]
    )
    seen: list[tuple[Any, Any]] = []

    def pad(path: Any, dtype: Any) -> float:
        seen.append((path, dtype))
        return 0.5

    np.testing.assert_array_equal(acts.concat(attention, pad_value=pad)[0], by_path[0])
    assert seen == [((0,), np.dtype(np.float32))]
    with pytest.raises(
        ConversionError, match=r"acts\['bert.encoder.layer.1.attention'\]\[i\]\[0\]"
    ):
        acts.concat(attention)  # no pad_value: ragged calls are an error naming the place


def test_arrays_keeps_what_is_leaf_kept_whole() -> None:
    """A node capture's is_leaf kept whole (here an object holding a tensor) is left out of
    arrays(), not walked into or refused."""

    class Box:
        def __init__(self, t: torch.Tensor) -> None:
            self.t = t

    class Boxed(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> Any:
            return x + 1, Box(x)

    model = Boxed()
    with capture(model, is_leaf=lambda node: isinstance(node, Box)) as acts:
        model(torch.zeros(3))
    assert isinstance(acts[""][0][1], Box)
    arrays = acts.arrays()
    assert list(arrays) == ["[0]"]
    np.testing.assert_array_equal(arrays["[0]"], np.ones(3, np.float32))


def test_arrays_and_items_through_the_engine(host_engine: HostEngine) -> None:
    """With the transfer engine (as on a GPU), calls are in flight until read; items(), values()
    and arrays() wait for them and give the same arrays as torch's own outputs."""
    model = bert()
    acts, recorded = run(
        model, 4, engine=host_engine, include=["**.attention", "bert.encoder.layer.*"]
    )
    assert not acts.done()
    assert [name for name, _ in acts.items()] == list(acts)
    arrays = acts.arrays()
    assert sorted(arrays) == sorted(k for name in acts for k in recorded.last[name])
    for name in acts:
        for key, value in recorded.last[name].items():
            np.testing.assert_array_equal(arrays[key], value)
    assert acts.done()
