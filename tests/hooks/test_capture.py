"""capture, Activations and numpy_args: choosing modules, what is stored, hooks, the decorator."""

from __future__ import annotations

import copy as copy_module
import dataclasses
import gc
import re
import weakref
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.checkpoint import checkpoint

import tonumpy
from _helpers.engine import HostEngine
from _helpers.trees import Point, ToyOutput
from tonumpy import (
    Activations,
    CaptureError,
    ConversionError,
    capture,
    numpy_args,
)
from tonumpy.hooks import _capturing

# ------------------------------------------------------------------------------------ models


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 8),
        nn.ReLU(),
        nn.Sequential(nn.Linear(8, 8), nn.Tanh()),
        nn.Linear(8, 2),
    )


class Shared(nn.Module):
    """One Linear called three times per forward."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(3):
            x = self.lin(x)
        return x


class Structured(nn.Module):
    """Submodules that return a tuple, a dict, a namedtuple and a ModelOutput-like object."""

    class Tup(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
            return x * 2, [x + 1, x - 1]

    class Dct(nn.Module):
        def forward(self, x: torch.Tensor) -> dict[str, Any]:
            return {"h": x.sum(-1), "name": "dct", "nothing": None}

    class Nt(nn.Module):
        def forward(self, x: torch.Tensor) -> Point:
            return Point(x[:, 0], x[:, 1])

    class Mo(nn.Module):
        def forward(self, x: torch.Tensor) -> ToyOutput:
            return ToyOutput(logits=x.mean(-1), hidden_states=(x, x * 3))

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.tup = self.Tup()
        self.dct = self.Dct()
        self.nt = self.Nt()
        self.mo = self.Mo()

    def forward(self, x: torch.Tensor) -> Any:
        h = self.lin(x)
        a, _ = self.tup(h)
        self.dct(h)
        self.nt(a)
        return self.mo(h)


class Kw(nn.Module):
    def forward(self, x: torch.Tensor, *, scale: torch.Tensor | None = None) -> torch.Tensor:
        return x if scale is None else x * scale


class Boom(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")


def hook_count(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._forward_hooks_always_called)
        for m in model.modules()
    )


def no_tensors(tree: Any) -> bool:
    leaves, _ = tonumpy._tree.flatten(tree)
    return not any(isinstance(leaf, torch.Tensor) for leaf in leaves)


# ------------------------------------------------------------------------------ choosing modules


@pytest.mark.parametrize(
    ("include", "exclude", "expected"),
    [
        ("**", (), ["", "0", "1", "2", "2.0", "2.1", "3"]),
        ("*", (), ["0", "1", "2", "3"]),
        ("2.*", (), ["2.0", "2.1"]),
        ("2.**", (), ["2", "2.0", "2.1"]),
        ("**.1", (), ["1", "2.1"]),
        (["0", "3"], (), ["0", "3"]),
        ("**", "", ["0", "1", "2", "2.0", "2.1", "3"]),
        ("**", ["2.**", ""], ["0", "1", "3"]),
        ("?", (), ["0", "1", "2", "3"]),
        ("[!2]", (), ["0", "1", "3"]),
        ("", (), [""]),
        (re.compile(r"2\.\d"), (), ["2.0", "2.1"]),
        (re.compile("2"), (), ["2"]),
        ("**", re.compile(r".*\.1|1"), ["", "0", "2", "2.0", "3"]),
    ],
    ids=[
        "all",
        "one-segment",
        "glob",
        "subtree",
        "any-depth",
        "list",
        "not-root",
        "exclude-list",
        "one-char",
        "negated-set",
        "root-only",
        "regex",
        "regex-whole-name",
        "regex-exclude",
    ],
)
def test_patterns_choose_modules(include: Any, exclude: Any, expected: list[str]) -> None:
    """Patterns over named_modules() names pick the modules, in named_modules() order:
    '*' within a segment, '**' any number of segments, regular expressions the whole name."""
    model = mlp()
    assert tonumpy.module_names(model, include=include, exclude=exclude) == expected
    with capture(model, include=include, exclude=exclude) as acts:
        model(torch.randn(5, 4))
    assert acts.chosen == tuple(expected)
    assert list(acts) == expected
    assert all(acts.num_calls(name) == 1 for name in expected)


def test_no_match_lists_the_names() -> None:
    """A pattern that matches nothing raises, listing the names there are."""
    model = mlp()
    with pytest.raises(CaptureError, match=r"'2\.0'") as info, capture(model, include="enc*"):
        pass  # pragma: no cover - never entered
    assert isinstance(info.value, ValueError)
    assert hook_count(model) == 0


@pytest.mark.parametrize(
    "options",
    [
        {"every": 0},
        {"every": 1.5},
        {"every": True},
        {"max_calls": 0},
        {"inputs": False, "outputs": False},
        {"include": [1]},
    ],
)
def test_bad_options(options: dict[str, Any]) -> None:
    """Out-of-range options raise CaptureError before any hook is registered."""
    model = mlp()
    with pytest.raises(CaptureError), capture(model, **options):
        pass  # pragma: no cover
    assert hook_count(model) == 0


def test_not_a_module() -> None:
    """Passing a tensor instead of a module says what to use instead."""
    with pytest.raises(CaptureError, match="to_numpy"), capture(torch.ones(2)):  # type: ignore[arg-type]
        pass  # pragma: no cover


# ----------------------------------------------------------------------------- what is stored


def test_outputs_equal_the_module_outputs() -> None:
    """Each captured output equals what the module returned, as an independent array."""
    model = mlp()
    x = torch.randn(5, 4)
    with capture(model, include=["0", "2.0", ""]) as acts:
        out = model(x)
    np.testing.assert_array_equal(acts[""][0], out.detach().numpy())
    np.testing.assert_array_equal(acts["0"][0], model[0](x).detach().numpy())
    assert acts["2.0"][0].shape == (5, 8)
    assert all(type(calls[0]) is np.ndarray for calls in acts.values())


def test_inplace_change_after_capture_does_not_reach_arrays() -> None:
    """An in-place ReLU after a Linear leaves the Linear's captured output (negatives) intact."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(inplace=True))
    x = torch.randn(8, 4)
    expected = model[0](x).detach().numpy().copy()
    with capture(model, include="0") as acts:
        model(x)
    assert (expected < 0).any()
    np.testing.assert_array_equal(acts["0"][0], expected)


def test_inputs_are_taken_before_an_inplace_forward() -> None:
    """inputs=True captures what an in-place module received, before it changed it."""
    model = nn.Sequential(nn.Identity(), nn.ReLU(inplace=True))
    x = torch.tensor([[-1.0, 2.0]])
    with capture(model, include="1", inputs=True, outputs=False) as acts:
        model(x.clone())
    (received,) = acts["1"][0]
    np.testing.assert_array_equal(received, [[-1.0, 2.0]])


def test_inputs_and_outputs_together() -> None:
    """With both, a call is {'inputs': args, 'outputs': output}."""
    model = mlp()
    x = torch.randn(3, 4)
    with capture(model, include="1", inputs=True) as acts:
        model(x)
    (call,) = acts["1"]
    assert set(call) == {"inputs", "outputs"}
    (received,) = call["inputs"]
    np.testing.assert_array_equal(call["outputs"], np.maximum(received, 0))


def test_keyword_inputs() -> None:
    """Keyword arguments make the inputs {'args': ..., 'kwargs': ...}."""
    model = Kw()
    with capture(model, inputs=True, outputs=False) as acts:
        model(torch.ones(2))
        model(torch.ones(2), scale=torch.tensor(3.0))
    plain, keyed = acts[""]
    assert isinstance(plain, tuple)
    np.testing.assert_array_equal(plain[0], [1.0, 1.0])
    assert keyed["kwargs"]["scale"] == np.float32(3.0)
    np.testing.assert_array_equal(keyed["args"][0], [1.0, 1.0])


def test_nested_outputs_keep_their_structure() -> None:
    """Tuples, lists, dicts, namedtuples and ModelOutput-like outputs keep their types."""
    model = Structured()
    with capture(model, include=["tup", "dct", "nt", "mo"]) as acts:
        model(torch.randn(4, 2))
    a, (b, c) = acts["tup"][0]
    np.testing.assert_allclose(b - c, np.full((4, 2), 2.0, np.float32), rtol=1e-6)
    assert a.shape == (4, 2)
    dct = acts["dct"][0]
    assert dct["name"] == "dct"
    assert dct["nothing"] is None
    assert dct["h"].shape == (4,)
    nt = acts["nt"][0]
    assert type(nt) is Point
    assert nt.x.shape == (4,)
    mo = acts["mo"][0]
    assert type(mo) is ToyOutput
    assert list(mo.keys()) == ["logits", "hidden_states"]
    np.testing.assert_allclose(mo.hidden_states[1], mo.hidden_states[0] * 3, rtol=1e-6)
    assert mo.loss is None
    for calls in acts.values():
        assert no_tensors(calls)


def test_module_called_several_times_per_forward() -> None:
    """Each call of a shared module is its own entry, in call order."""
    model = Shared()
    x = torch.randn(2, 3)
    with capture(model, include="lin") as acts:
        model(x)
    calls = acts["lin"]
    assert len(calls) == 3
    h = x
    for call in calls:
        h = model.lin(h)
        np.testing.assert_allclose(call, h.detach().numpy(), rtol=1e-6)


def test_ml_dtypes_and_scalars_options() -> None:
    """bfloat16 outputs widen to float32 by default and stay bfloat16 with ml_dtypes=True."""
    ml_dtypes = pytest.importorskip("ml_dtypes")  # an optional extra of tonumpy itself
    model = nn.Linear(2, 2).to(torch.bfloat16)
    x = torch.ones(1, 2, dtype=torch.bfloat16)
    with capture(model) as wide, capture(model, ml_dtypes=True) as exact:
        model(x)
    assert wide[""][0].dtype == np.float32
    assert exact[""][0].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(exact[""][0].astype(np.float32), wide[""][0])
    with capture(model, reduce=lambda t: t.float().sum(), scalars=True) as acts:
        model(x)
    assert isinstance(acts[""][0], float)


# ------------------------------------------------------------------------------ which calls


def test_every_counts_forwards_of_the_root() -> None:
    """every=3 captures forwards 0, 3, 6: all three calls of the shared module in each."""
    model = Shared()
    xs = [torch.full((1, 3), float(i)) for i in range(7)]
    with capture(model, include=["lin", ""], every=3) as acts:
        for x in xs:
            model(x)
    assert acts.num_calls("") == 3
    assert acts.num_calls("lin") == 9
    np.testing.assert_allclose(acts[""][1], model(xs[3]).detach().numpy(), rtol=1e-6)
    np.testing.assert_allclose(acts["lin"][3], model.lin(xs[3]).detach().numpy(), rtol=1e-6)


def test_every_counts_own_calls_outside_the_root() -> None:
    """A chosen submodule called directly (not through the root) counts its own calls."""
    model = mlp()
    with capture(model, include="3", every=2) as acts:
        for i in range(5):
            model[3](torch.full((1, 8), float(i)))
    assert acts.num_calls("3") == 3  # calls 0, 2, 4
    np.testing.assert_allclose(acts["3"][2], model[3](torch.full((1, 8), 4.0)).detach().numpy())


def test_max_calls_keeps_the_most_recent() -> None:
    """max_calls=2 keeps the last two calls of each module."""
    model = nn.Identity()
    with capture(model, max_calls=2) as acts:
        for i in range(5):
            model(torch.tensor([float(i)]))
    assert [call.item() for call in acts[""]] == [3.0, 4.0]


@settings(max_examples=25, deadline=None)
@given(
    n_forwards=st.integers(0, 12),
    every=st.integers(1, 5),
    max_calls=st.one_of(st.none(), st.integers(1, 6)),
)
def test_every_and_max_calls_property(n_forwards: int, every: int, max_calls: int | None) -> None:
    """The captured steps are the last max_calls multiples of `every` below n_forwards."""
    model = nn.Sequential(nn.Identity())
    with capture(model, include="0", every=every, max_calls=max_calls) as acts:
        for step in range(n_forwards):
            model(torch.tensor([step]))
    captured = list(range(0, n_forwards, every))
    if max_calls is not None:
        captured = captured[-max_calls:]
    assert [int(call[0]) for call in acts.get("0", [])] == captured
    assert ("0" in acts) == bool(captured)


def test_checkpoint_recomputation_is_not_captured_twice() -> None:
    """Activation checkpointing re-runs forwards during backward; those are not captured."""
    model = mlp()

    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return checkpoint(self.inner, x, use_reentrant=False)

    wrapped = Wrapped()
    with capture(wrapped, include="inner.*", every=2) as acts:
        for _ in range(3):
            wrapped(torch.randn(2, 4, requires_grad=True)).sum().backward()
    assert acts.num_calls("inner.0") == 2


# --------------------------------------------------------------------------- hooks and memory


def test_hooks_removed_after_exception_in_block() -> None:
    """An exception inside the block propagates and leaves no hook behind."""
    model = mlp()
    hooked: list[int] = []

    def loop() -> None:
        with capture(model, inputs=True, every=2):
            model(torch.randn(1, 4))
            hooked.append(hook_count(model))
            raise KeyError("in the loop")

    with pytest.raises(KeyError, match="in the loop"):
        loop()
    assert hooked[0] > 0
    assert hook_count(model) == 0
    model(torch.randn(1, 4))  # still runs


def test_exception_in_forward_keeps_inputs() -> None:
    """A forward that raises still records its inputs, with outputs None, and hooks stay sane."""
    model = nn.Sequential(nn.Identity(), Boom())
    with capture(model, include="1", inputs=True) as acts:
        for _ in range(2):
            with pytest.raises(RuntimeError, match="boom"):
                model(torch.ones(2))
    assert len(acts["1"]) == 2
    assert acts["1"][0]["outputs"] is None
    np.testing.assert_array_equal(acts["1"][0]["inputs"][0], [1.0, 1.0])
    assert hook_count(model) == 0


def test_outputs_unchanged_and_gradients_flow() -> None:
    """Capturing changes neither the forward result nor the gradients."""
    model = mlp()
    x = torch.randn(6, 4)
    reference = model(x)
    reference.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]  # type: ignore[union-attr]
    model.zero_grad()
    with capture(model, inputs=True, reduce=lambda t: t.norm()) as acts:
        out = model(x)
        out.sum().backward()
    assert torch.equal(out, reference)
    for p, g in zip(model.parameters(), grads, strict=True):
        assert torch.equal(p.grad, g)  # type: ignore[arg-type]
    assert len(acts) == 7


def test_nothing_keeps_the_graph_or_tensors_alive() -> None:
    """After the step, the output tensor and its graph die although the calls are held."""
    model = mlp()
    with capture(model, inputs=True) as acts:
        x = torch.randn(3, 4, requires_grad=True)
        out = model(x)
        out_ref = weakref.ref(out)
        x_ref = weakref.ref(x)
        grad_fn_name = type(out.grad_fn).__name__
        del out, x
        gc.collect()
    assert grad_fn_name.endswith("Backward0")
    assert out_ref() is None
    assert x_ref() is None
    for calls in acts.values():
        assert no_tensors(calls)


def test_hooks_silent_in_a_copy_after_exit() -> None:
    """A deepcopy made inside the block carries the hooks, which go quiet once the block ends."""
    model = mlp()
    with capture(model) as acts:
        clone = copy_module.deepcopy(model)
        clone(torch.randn(1, 4))
    before = acts.num_calls("0")
    clone(torch.randn(1, 4))
    assert before == 1
    assert acts.num_calls("0") == 1


def test_reduce_runs_on_detached_tensors() -> None:
    """reduce sees detached tensors under no_grad; its result may be a tree."""
    seen: list[tuple[bool, bool]] = []

    def stats(t: torch.Tensor) -> dict[str, torch.Tensor]:
        seen.append((t.requires_grad, torch.is_grad_enabled()))
        return {"mean": t.mean(), "absmax": t.abs().amax()}

    model = mlp()
    x = torch.randn(4, 4)
    with capture(model, include="0", reduce=stats) as acts:
        model(x)
        model(x)
    assert seen == [(False, False), (False, False)]
    full = model[0](x).detach()
    call = acts["0"][0]
    assert call["mean"].shape == ()
    np.testing.assert_allclose(call["mean"], full.mean().item(), rtol=1e-6)
    joined = acts.concat("0")
    assert joined["absmax"].shape == (2,)


def test_reduce_error_names_the_module() -> None:
    """An error raised by reduce propagates with a note naming the module."""
    model = mlp()

    def bad(t: torch.Tensor) -> torch.Tensor:
        raise ValueError("no")

    with pytest.raises(ValueError, match="no") as info, capture(model, include="2.1", reduce=bad):
        model(torch.randn(1, 4))
    assert any("'2.1'" in note for note in getattr(info.value, "__notes__", []))
    assert hook_count(model) == 0


# ------------------------------------------------------------------------------- Activations


def test_activations_is_a_read_only_mapping() -> None:
    """Activations is a Mapping; values are fresh lists; it has no item assignment."""
    model = mlp()
    with capture(model, include="0") as acts:
        model(torch.randn(1, 4))
    assert isinstance(acts, Mapping)
    assert isinstance(acts, Activations)
    calls = acts["0"]
    calls.clear()
    assert len(acts["0"]) == 1
    assert "0" in acts
    assert "1" not in acts
    with pytest.raises(TypeError):
        acts["0"] = []  # type: ignore[index]
    with pytest.raises(KeyError):
        acts["1"]
    assert repr(acts) == "Activations({'0': 1 call})"
    assert acts.done()


def test_clear_forgets_calls_and_keeps_hooking() -> None:
    """clear() empties every module; later calls are captured again."""
    model = mlp()
    with capture(model, include="0") as acts:
        model(torch.randn(1, 4))
        acts.clear()
        assert acts.num_calls("0") == 0
        model(torch.randn(2, 4))
    assert acts["0"][0].shape == (2, 8)


def test_concat_joins_calls() -> None:
    """concat joins batches along axis 0, a smaller last batch included."""
    model = Structured()
    batches = [torch.randn(4, 2), torch.randn(4, 2), torch.randn(1, 2)]
    with capture(model, include=["lin", "dct", "mo"]) as acts:
        for b in batches:
            model(b)
    lin = acts.concat("lin")
    assert lin.shape == (9, 2)
    np.testing.assert_allclose(lin, model.lin(torch.cat(batches)).detach().numpy(), rtol=1e-5)
    dct = acts.concat("dct")
    assert dct["h"].shape == (9,)
    assert dct["name"] == ["dct", "dct", "dct"]
    mo = acts.concat("mo")
    assert type(mo) is ToyOutput
    assert mo.hidden_states[1].shape == (9, 2)


def test_concat_errors() -> None:
    """concat names the problem: no calls, differing structure, arrays that cannot join."""
    model = Kw()
    with capture(model, inputs=True, outputs=False) as acts:
        with pytest.raises(ConversionError, match="no captured call"):
            acts.concat("")
        model(torch.ones(2))
        model(torch.ones(2), scale=torch.tensor(2.0))
    with pytest.raises(ConversionError, match=r"call 1 does not have the structure of call 0"):
        acts.concat("")
    model2 = nn.Identity()
    with capture(model2) as acts2:
        model2(torch.ones(2, 3))
        model2(torch.ones(2, 4))
    with pytest.raises(ConversionError, match=r"acts\[''\]\[i\]") as info:
        acts2.concat("", axis=0)
    assert info.value.path == ()
    assert acts2.concat("", axis=1).shape == (2, 7)


# ---------------------------------------------------------------------- the pending (GPU) path


def test_engine_path_values_and_structure(host_engine: HostEngine) -> None:
    """Through the engine, calls are in flight until read, and read back as the same trees."""
    model = Structured()
    x = torch.randn(4, 2)
    with _capturing(model, engine=host_engine, include=["lin", "mo", "dct"], inputs=True) as acts:
        model(x)
        model(x)
    assert not acts.done()
    lin = acts["lin"][1]
    np.testing.assert_array_equal(lin["inputs"][0], x.numpy())
    np.testing.assert_allclose(lin["outputs"], model.lin(x).detach().numpy(), rtol=1e-6)
    mo = acts["mo"][0]["outputs"]
    assert type(mo) is ToyOutput
    assert acts["dct"][0]["outputs"]["name"] == "dct"
    assert acts.concat("lin")["outputs"].shape == (8, 2)
    for calls in acts.values():
        assert no_tensors(calls)


def test_engine_path_snapshots_before_inplace_changes(host_engine: HostEngine) -> None:
    """Through the engine too, a later in-place ReLU does not reach the captured output."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(inplace=True))
    x = torch.randn(8, 4)
    expected = model[0](x).detach().numpy().copy()
    with _capturing(model, engine=host_engine, include="0", reduce=lambda t: t[:, :3]) as acts:
        model(x)
    assert (expected[:, :3] < 0).any()
    np.testing.assert_array_equal(acts["0"][0], expected[:, :3])


class FakeCall:
    """A captured call whose copies land when the test says so."""

    ready = False

    def __init__(self, log: list[str], name: str) -> None:
        self.log, self.name, self.landed = log, name, False

    def done(self) -> bool:
        return self.landed

    def result(self) -> str:
        self.log.append(self.name)
        return self.name


def test_landed_calls_are_finished_oldest_first() -> None:
    """Each new call finishes, without waiting, the oldest calls whose copies have landed."""
    log: list[str] = []
    acts = Activations(["a", "b"], None)
    first, second, third = FakeCall(log, "1"), FakeCall(log, "2"), FakeCall(log, "3")
    acts._add("a", first)
    acts._add("b", second)
    assert log == []
    assert not acts.done()
    second.landed = True
    acts._add("a", third)
    assert log == []  # the oldest has not landed: nothing is finished out of order
    first.landed = True
    acts._add("b", FakeCall(log, "4"))
    assert log == ["1", "2"]
    assert acts["a"] == ["1", "3"]
    acts.clear()
    assert acts.done()


# ------------------------------------------------------------------------------- numpy_args


def test_numpy_args_positional_keyword_nested() -> None:
    """Tensors at any depth, positional or keyword, arrive as arrays; other values as themselves."""
    seen: dict[str, Any] = {}

    @numpy_args
    def log(step: Any, metrics: Any, *rest: Any, tag: str = "", hist: Any = None) -> str:
        seen.update(step=step, metrics=metrics, rest=rest, tag=tag, hist=hist)
        return "ok"

    marker = object()
    options = {"window": 3}
    result = log(
        torch.tensor(7),
        {"loss": torch.tensor(0.25, requires_grad=True), "parts": [torch.ones(2), marker]},
        Point(torch.zeros(1), 5),
        options,
        tag="train",
        hist={"w": (torch.arange(3),)},
    )
    assert result == "ok"
    assert log.__name__ == "log"
    assert isinstance(seen["step"], np.ndarray)
    assert seen["step"].shape == ()
    assert seen["metrics"]["loss"] == np.float32(0.25)
    assert seen["metrics"]["parts"][1] is marker
    np.testing.assert_array_equal(seen["metrics"]["parts"][0], [1.0, 1.0])
    assert type(seen["rest"][0]) is Point
    assert seen["rest"][1] is options
    assert seen["tag"] == "train"
    np.testing.assert_array_equal(seen["hist"]["w"][0], [0, 1, 2])


def test_numpy_args_scalars_and_copy() -> None:
    """scalars=True gives Python numbers; copy=True gives arrays that share no memory."""
    t = torch.arange(3.0)

    @numpy_args(scalars=True, copy=True)
    def log(value: Any, arr: Any) -> tuple[Any, Any]:
        return value, arr

    value, arr = log(torch.tensor(1.5), t)
    assert value == 1.5
    assert type(value) is float
    t += 1
    np.testing.assert_array_equal(arr, [0.0, 1.0, 2.0])


def test_numpy_args_on_a_method_keeps_self() -> None:
    """A decorated method of a dataclass gets the very same self, not a rebuilt copy."""

    @dataclasses.dataclass
    class Logger:
        state: torch.Tensor
        rows: list[Any] = dataclasses.field(default_factory=list)

        @numpy_args(scalars=True)
        def log(self, value: Any) -> None:
            self.rows.append(value)

    logger = Logger(torch.zeros(1))
    logger.log(torch.tensor(2))
    assert logger.rows == [2]
    assert isinstance(logger.state, torch.Tensor)


def test_numpy_args_error_names_the_path() -> None:
    """An unconvertible tensor argument raises tonumpy's error naming its place."""

    @numpy_args
    def log(metrics: Any) -> None:  # pragma: no cover - never reached
        raise AssertionError

    with pytest.raises(tonumpy.UnsupportedLeafError, match=r"\['bad'\]"):
        log({"bad": torch.empty(2, device="meta")})


# ------------------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
def test_cuda_hook_never_synchronises() -> None:
    """No hook waits for the GPU: the forward runs under sync debug mode 'error'."""
    model = mlp().cuda()
    x = torch.randn(64, 4, device="cuda")
    with capture(model, inputs=True) as warm:  # kernels, cuBLAS, the pinned pool
        model(x)
    assert len(warm[""]) == 1
    torch.cuda.synchronize()
    with (
        capture(model, inputs=True, reduce=None) as acts,
        capture(model, include="0", reduce=lambda t: t.float().norm()) as norms,
    ):
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = model(x)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        out.sum().backward()
    np.testing.assert_allclose(acts[""][0]["outputs"], out.detach().cpu().numpy(), rtol=1e-6)
    np.testing.assert_allclose(norms["0"][0], model[0](x).norm().item(), rtol=1e-5)


@pytest.mark.cuda
def test_cuda_values_correct_when_read_early() -> None:
    """Reading right after a delayed stream gives the right values (the event is waited on)."""
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(inplace=True)).cuda()
    x = torch.randn(512, 256, device="cuda")
    model(x)
    torch.cuda.synchronize()
    with capture(model, include="0") as acts:
        torch.cuda._sleep(500_000_000)  # keep the stream busy so the copy lands late
        model(x)
        returned_early = not torch.cuda.current_stream().query()
        pending = not acts.done()
        early = acts["0"][0]
    assert returned_early  # the forward, hooks included, did not wait for the GPU
    assert pending
    assert acts.done()
    expected = model[0](x).detach().cpu().numpy()
    assert (expected < 0).any()
    np.testing.assert_allclose(early, expected, rtol=1e-6)


@pytest.mark.cuda
def test_cuda_pending_holds_no_device_memory() -> None:
    """Device memory held by captured calls is bounded by the copies still in flight."""
    model = nn.Linear(1024, 1024).cuda()
    x = torch.randn(256, 1024, device="cuda")
    one_call = 2 * x.nbytes  # the detached input and output a call in flight holds
    model(x)  # cuBLAS allocates its workspace on the first matmul
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    with capture(model, inputs=True) as acts:
        for _ in range(6):
            model(x)
            torch.cuda.synchronize()  # the copies land; the next call finishes them
            assert torch.cuda.memory_allocated() <= base + one_call
    assert len(acts[""]) == 6  # reading finishes the last one
    assert acts.done()
    assert torch.cuda.memory_allocated() == base


@pytest.mark.cuda
def test_cuda_bfloat16_conj_and_non_contiguous() -> None:
    """bf16, conjugate views and non-contiguous outputs cross correctly."""

    class Odd(nn.Module):
        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            z = torch.complex(x, x + 1)
            return {"bf16": x.bfloat16(), "conj": z.conj(), "t": x.t(), "neg": z.conj().imag}

    model = Odd()
    x = torch.randn(8, 3, device="cuda")
    with capture(model) as acts:
        model(x)
    call = acts[""][0]
    host = x.cpu()
    np.testing.assert_array_equal(call["bf16"], host.bfloat16().float().numpy())
    z = torch.complex(host, host + 1)
    np.testing.assert_array_equal(call["conj"], z.conj().resolve_conj().numpy())
    np.testing.assert_array_equal(call["t"], host.t().numpy())
    np.testing.assert_array_equal(call["neg"], -(host + 1).numpy())


def test_skipped_calls_leave_nothing_pending() -> None:
    """Calls skipped by `every` leave no per-call state behind, for inputs alone or with outputs."""
    model = nn.Sequential(nn.Identity())
    for outputs in (False, True):
        with capture(model, include="0", inputs=True, outputs=outputs, every=3) as acts:
            for step in range(7):
                model(torch.tensor([step]))
            (rec,) = [
                cell.cell_contents
                for hook in model[0]._forward_pre_hooks.values()
                for cell in hook.__closure__ or ()
                if type(cell.cell_contents).__name__ == "_Recorder"
            ]
            assert all(not stack for stack in rec.thread_state().pending_inputs.values())
        calls = acts["0"]
        firsts = [call["inputs"][0] if outputs else call[0] for call in calls]
        assert [int(x[0]) for x in firsts] == [0, 3, 6]
