"""``reduce=`` and ``exclude=`` (key-path patterns) of ``Accumulator`` and ``concat`` (issue 15).

Real tiny Hugging Face models (GPT-2 with its cache, BERT, T5) built from configs, fed batches
of different sequence lengths; expected results are computed from the model outputs by hand.
"""

from __future__ import annotations

import sys
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers
from test_accumulator_threads import fast_switching  # noqa: F401 - a fixture used below

import tonumpy
from _helpers.engine import HostEngine, accumulating
from _helpers.models import tiny_bert, tiny_t5
from tonumpy import Accumulator, ConversionError, OptionError, UnmatchedPatternWarning, concat

LENGTHS = (5, 9, 3, 7)  # sequence lengths of the batches: every batch ragged against another
VOCAB = 100


def _ids(length: int, seed: int, rows: int = 2) -> torch.Tensor:
    return torch.randint(3, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=64, use_cache=True
    )
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def gpt2_outputs(gpt2: torch.nn.Module) -> list[Any]:
    """One output per batch (loss, logits, and the KV cache), batches of ``LENGTHS``."""
    with torch.no_grad():
        return [gpt2(input_ids=_ids(n, n), labels=_ids(n, n)) for n in LENGTHS]


def _cache_key(output: Any) -> str:
    """The cache's key in this transformers version (``cache`` in 5.x, else past_key_values)."""
    return "cache" if "cache" in output else "past_key_values"


def _append_all(acc: Accumulator, outputs: list[Any]) -> None:
    """Append every output; the first append warns that the cache key of the other
    transformers version (``["cache", "past_key_values"]`` serves both) matches nothing."""
    other = "past_key_values" if _cache_key(outputs[0]) == "cache" else "cache"
    with pytest.warns(UnmatchedPatternWarning, match=rf"exclude=.*'{other}' matches no node"):
        acc.append(outputs[0])
    for output in outputs[1:]:
        acc.append(output)
    assert acc.matched["exclude"][other] == []
    assert acc.matched["exclude"][_cache_key(outputs[0])] == [(_cache_key(outputs[0]),)]


def _padded(arrays: list[np.ndarray], pad: Any) -> np.ndarray:
    """Concatenate along axis 0, padding axis 1 to the longest (by hand)."""
    width = max(a.shape[1] for a in arrays)
    out = np.full((sum(len(a) for a in arrays), width, *arrays[0].shape[2:]), pad, arrays[0].dtype)
    start = 0
    for a in arrays:
        out[start : start + len(a), : a.shape[1]] = a
        start += len(a)
    return out


# ------------------------------------------------------------------------------ exclude


def test_exclude_drops_the_gpt2_cache(gpt2_outputs: list[Any]) -> None:
    """exclude= leaves the KV cache out: the result is the ModelOutput without its tensors."""
    key = _cache_key(gpt2_outputs[0])
    assert len(gpt2_outputs[0][key]) == 2  # two layers of (keys, values) were returned
    acc = Accumulator(pad_value=0.0, exclude=["cache", "past_key_values"])
    _append_all(acc, gpt2_outputs)
    preds = acc.result()
    assert type(preds) is type(gpt2_outputs[0])
    assert preds.get(key) is None
    logits = [o.logits.numpy() for o in gpt2_outputs]
    np.testing.assert_array_equal(preds.logits, _padded(logits, 0.0))
    np.testing.assert_array_equal(preds.loss, np.array([o.loss for o in gpt2_outputs]))
    assert [type(value) for value in preds.values()] == [np.ndarray, np.ndarray, type(None)]


def test_without_exclude_the_cache_is_ragged(gpt2_outputs: list[Any]) -> None:
    """The cache's (batch, heads, seq, dim) tensors are ragged: without exclude= they need a pad."""
    acc = Accumulator(pad_value={"logits": 0.0})
    acc.append(gpt2_outputs[0])
    with pytest.raises(ConversionError, match=r"\[0\]\[0\].*pad_value="):
        acc.append(gpt2_outputs[1])


@pytest.mark.parametrize(
    ("exclude", "kept"),
    [
        ("b", {"a", "c.x", "c.y"}),  # a bare key
        (("c", "x"), {"a", "b", "c.y"}),  # a key path into a subtree
        (["a", ("c",)], {"b"}),  # a list; a prefix covers the whole subtree
        (["nothing", ("c", "z")], {"a", "b", "c.x", "c.y"}),  # patterns that name nothing
    ],
)
def test_exclude_pattern_forms(exclude: Any, kept: set[str]) -> None:
    """Bare keys, key paths and prefixes, as for pad_value's mappings; excluded parts are None."""
    batch = {"a": torch.ones(2), "b": torch.zeros(2, 3), "c": {"x": torch.ones(2), "y": [1, 2]}}
    if "nothing" in exclude:
        with pytest.warns(UnmatchedPatternWarning, match=r"'nothing', \('c', 'z'\) match no node"):
            out = concat([batch, batch], exclude=exclude)
    else:
        out = concat([batch, batch], exclude=exclude)
    found = set()
    for name in ("a", "b"):
        if out[name] is not None:
            found.add(name)
    for name in ("x", "y"):
        if out["c"] is not None and out["c"][name] is not None:
            found.add(f"c.{name}")
    assert found == kept


def test_exclude_keeps_aliased_leaves_elsewhere() -> None:
    """A tensor that appears at an excluded and at a kept place is kept at the kept one."""
    t = torch.arange(4.0)
    out = concat([{"keep": t, "drop": t}], exclude="drop")
    assert out["drop"] is None
    np.testing.assert_array_equal(out["keep"], np.arange(4.0, dtype=np.float32))


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (3, r"exclude=3.*key-path pattern"),
        ({"cache": 1}, r"exclude=.*key-path pattern"),
        ([["cache"]], r"\['cache'\] is not a key-path pattern"),
        ((), r"\(\) covers the whole tree"),
    ],
)
def test_exclude_option_errors(bad: Any, message: str) -> None:
    """A malformed exclude= is an OptionError naming the parameter, before any work."""
    with pytest.raises(OptionError, match=message):
        Accumulator(exclude=bad)
    with pytest.raises(OptionError, match=message):
        concat([{"a": torch.ones(1)}], exclude=bad)


# ------------------------------------------------------------------------------ reduce


def test_reduce_argmax_on_gpt2_logits(gpt2_outputs: list[Any]) -> None:
    """reduce= turns (batch, seq, vocab) logits into token ids; ragged ids are padded."""
    acc = Accumulator(
        reduce={"logits": lambda t: t.argmax(-1)},
        exclude=["cache", "past_key_values"],
        pad_value=-100,
    )
    _append_all(acc, gpt2_outputs)
    preds = acc.result()
    ids = [o.logits.argmax(-1).numpy() for o in gpt2_outputs]
    np.testing.assert_array_equal(preds.logits, _padded(ids, -100))
    assert preds.logits.dtype == np.int64
    assert preds.logits.shape == (2 * len(LENGTHS), max(LENGTHS))


def test_reduce_gets_the_batch_tensor_itself_without_grad(gpt2: torch.nn.Module) -> None:
    """The function sees the batch's own tensor (not a converted copy), autograd off."""
    seen: list[tuple[Any, bool]] = []

    def top1(t: torch.Tensor) -> torch.Tensor:
        seen.append((t, torch.is_grad_enabled()))
        return t.argmax(-1)

    out = gpt2(input_ids=_ids(4, 0))  # with grad: the logits require it
    assert out.logits.requires_grad
    acc = Accumulator(reduce={("logits",): top1}, exclude="cache")
    acc.append(out)
    assert seen[0][0] is out.logits
    assert seen[0][1] is False
    np.testing.assert_array_equal(acc.result().logits, out.logits.argmax(-1).numpy())


def test_reduce_with_the_asynchronous_engine(
    gpt2_outputs: list[Any], host_engine: HostEngine
) -> None:
    """Through the transfer engine (as on a GPU), the reduced leaves are what travels."""
    acc = accumulating(
        Accumulator(reduce={"logits": lambda t: t.max(-1).values}, exclude="cache", pad_value=0),
        host_engine,
    )
    for output in gpt2_outputs:
        acc.append(output)
    expected = _padded([o.logits.max(-1).values.numpy() for o in gpt2_outputs], 0.0)
    np.testing.assert_array_equal(acc.result().logits, expected)


def test_reduce_may_return_a_container(gpt2_outputs: list[Any]) -> None:
    """topk gives values and indices: both are accumulated, under the leaf's place."""
    acc = Accumulator(
        reduce={"logits": lambda t: t.topk(3, dim=-1)},
        exclude=["cache", "past_key_values"],
        pad_value={("logits", 0): float("nan"), ("logits", 1): -1},
    )
    _append_all(acc, gpt2_outputs)
    values, indices = acc.result().logits
    tops = [o.logits.topk(3, dim=-1) for o in gpt2_outputs]
    np.testing.assert_array_equal(values, _padded([t.values.numpy() for t in tops], np.nan))
    np.testing.assert_array_equal(indices, _padded([t.indices.numpy() for t in tops], -1))


def test_reduce_longest_pattern_wins_and_prefixes_cover_subtrees() -> None:
    """{(): f, "h": g, ("h", 1): k}: every leaf gets the function of its longest pattern."""
    batch = {"x": torch.ones(2, 2), "h": [torch.ones(2, 2), torch.ones(2, 2)], "s": "text"}
    out = concat(
        [batch],
        reduce={(): lambda t: t.sum(-1), "h": lambda t: t * 3, ("h", 1): lambda t: t[:, 0]},
    )
    np.testing.assert_array_equal(out["x"], np.full(2, 2.0, np.float32))
    np.testing.assert_array_equal(out["h"][0], np.full((2, 2), 3.0, np.float32))
    np.testing.assert_array_equal(out["h"][1], np.ones(2, np.float32))
    assert out["s"] == ["text"]  # non-tensor leaves are left alone


def test_reduce_error_names_the_leaf() -> None:
    """An error in the function propagates as it is, with a note naming the leaf."""

    def broken(t: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")

    acc = Accumulator(reduce={"out": broken})
    with pytest.raises(RuntimeError, match="boom") as info:
        acc.append({"out": [torch.ones(3, 4)]})
    notes = getattr(info.value, "__notes__", [])
    if sys.version_info >= (3, 11):
        assert any("tree['out'][0]" in note and "(3, 4)" in note for note in notes), notes
    with pytest.raises(ConversionError, match="before any append"):
        acc.result()  # the batch was not added


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (len, r"reduce=.*takes a mapping"),
        ({"logits": "argmax"}, r"the value for 'logits' is 'argmax'"),
        ({"logits": lambda a, b: a}, r"the function for 'logits' is called with one tensor"),
    ],
)
def test_reduce_option_errors(bad: Any, message: str) -> None:
    """A malformed reduce= is an OptionError naming the parameter, before any work."""
    with pytest.raises(OptionError, match=message):
        Accumulator(reduce=bad)


@pytest.mark.cuda
def test_reduce_runs_on_the_device() -> None:
    """On a GPU the function runs on the CUDA tensor; only its result is copied."""
    devices = []

    def top1(t: torch.Tensor) -> torch.Tensor:
        devices.append(t.device.type)
        return t.argmax(-1)

    logits = torch.randn(2, 5, 32000, device="cuda")
    acc = Accumulator(reduce={"logits": top1})
    acc.append({"logits": logits})
    assert devices == ["cuda"]
    np.testing.assert_array_equal(acc.result()["logits"], logits.argmax(-1).cpu().numpy())


# ------------------------------------------------------------------------------ other models


def test_bert_and_t5_outputs() -> None:
    """BERT (argmax of its MLM logits) and T5 (cache and encoder states excluded)."""
    bert = tiny_bert(vocab_size=VOCAB).eval()
    t5 = tiny_t5(vocab_size=VOCAB).eval()
    bert_acc = Accumulator(reduce={"logits": lambda t: t.argmax(-1)}, pad_value=-100)
    t5_acc = Accumulator(
        exclude=["cache", "past_key_values", "encoder_last_hidden_state"], pad_value=0.0
    )
    bert_ids, t5_logits, t5_losses = [], [], []
    with torch.no_grad():
        for n in LENGTHS:
            out = bert(input_ids=_ids(n, n), labels=_ids(n, n))
            bert_acc.append(out)
            bert_ids.append(out.logits.argmax(-1).numpy())
            out = t5(input_ids=_ids(n, n), labels=_ids(n - 2, n + 1))
            assert "encoder_last_hidden_state" in out
            if n == LENGTHS[0]:  # one list for both transformers versions: one key is missing
                with pytest.warns(UnmatchedPatternWarning, match=r"exclude=.*matches no node"):
                    t5_acc.append(out)
            else:
                t5_acc.append(out)
            t5_logits.append(out.logits.numpy())
            t5_losses.append(out.loss.item())
    np.testing.assert_array_equal(bert_acc.result().logits, _padded(bert_ids, -100))
    t5_preds = t5_acc.result()
    np.testing.assert_array_equal(t5_preds.logits, _padded(t5_logits, 0.0))
    np.testing.assert_allclose(t5_preds.loss, t5_losses, rtol=1e-6)
    assert t5_preds.get("encoder_last_hidden_state") is None


def test_directory_with_reduce_and_exclude(gpt2_outputs: list[Any], tmp_path: Path) -> None:
    """directory= stores the reduced leaves; the excluded ones are not written at all."""
    acc = Accumulator(
        reduce={"logits": lambda t: t.argmax(-1)},
        exclude=["cache", "past_key_values"],
        pad_value=-100,
        directory=tmp_path / "preds",
    )
    _append_all(acc, gpt2_outputs)
    preds = acc.result()
    assert sorted(p.name for p in (tmp_path / "preds").iterdir()) == [
        "__progress__.npy",  # the log of whole batches (resume=True)
        "__shard__.json",  # complete: result() was called
        "__tonumpy__.json",
        "logits.npy",
        "loss.npy",
    ]
    loaded = tonumpy.load(tmp_path / "preds")
    np.testing.assert_array_equal(loaded["logits"], preds.logits)
    ids = [o.logits.argmax(-1).numpy() for o in gpt2_outputs]
    np.testing.assert_array_equal(np.load(tmp_path / "preds" / "logits.npy"), _padded(ids, -100))


# ------------------------------------------------------------------------------ threads


@pytest.mark.usefixtures("fast_switching")
def test_reduce_and_exclude_from_several_threads() -> None:
    """Threads appending at once: every batch is reduced and cut, and added whole."""

    def batch(n: int) -> dict[str, Any]:  # the cache is ragged: excluded, it needs no pad
        return {
            "logits": torch.full((1, 4, 6), float(n)),
            "n": torch.tensor([n]),
            "cache": [torch.ones(1, n % 3 + 1)],
        }

    acc = Accumulator(reduce={"logits": lambda t: t.sum(-1)}, exclude="cache")
    errors: list[BaseException] = []

    def work(first: int) -> Callable[[], None]:
        def run() -> None:
            try:
                for n in range(first, 120, 3):
                    acc.append(batch(n))
            except BaseException as exc:  # noqa: BLE001 - checked below
                errors.append(exc)

        return run

    threads = [threading.Thread(target=work(first)) for first in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    out = acc.result()
    assert sorted(out["n"]) == list(range(120))
    np.testing.assert_array_equal(out["logits"], np.repeat(out["n"][:, None] * 6.0, 4, 1))
    assert out["cache"] is None


# ------------------------------------------------------------------------------ per batch


def test_num_items_never_cuts_per_batch_values() -> None:
    """0-d leaves hold one value per batch: result(num_items=) cuts per-sample rows only."""
    acc = Accumulator()
    for i in range(10):  # batches of one sample: as many losses as samples
        acc.append({"x": torch.tensor([i]), "loss": torch.tensor(float(i)), "tag": f"b{i}"})
    out = acc.result(num_items=4)
    np.testing.assert_array_equal(out["x"], np.arange(4))
    np.testing.assert_array_equal(out["loss"], np.arange(10, dtype=np.float32))
    assert out["tag"] == [f"b{i}" for i in range(10)]


def test_num_items_beyond_a_ranks_share_points_to_gather() -> None:
    """result(num_items=len(dataset)) on a rank holding its share says what to do instead."""
    acc = Accumulator()
    acc.append({"x": torch.arange(5)})
    with pytest.raises(ConversionError, match=r"num_items=10 .* gather\(acc, sampler=\.\.\.\)"):
        acc.result(num_items=10)


# ------------------------------------------------------------------------------ unmatched patterns


def _nested_batch() -> dict[str, Any]:
    """A batch whose logits sit under ``out`` (where ``"logits"`` is not a top-level key)."""
    return {"out": {"logits": torch.ones(2, 3, 5), "past_key_values": [torch.ones(2, 1)]}}


def test_a_reduce_pattern_matching_nothing_warns_at_the_first_batch() -> None:
    """reduce={"logits": ...} on batches whose logits sit under "out" keeps the full logits: the
    first append says so, naming the pattern and the leaves there are (issue 20.1)."""
    acc = Accumulator(reduce={"logits": lambda t: t.argmax(-1)})
    with pytest.warns(
        UnmatchedPatternWarning,
        match=r"reduce=.*'logits' matches no leaf of "
        r"batch 0 \(its leaves: tree\['out'\]\['logits'\]",
    ):
        acc.append(_nested_batch())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once, not at every batch
        acc.append(_nested_batch())
        out = acc.result()
    assert out["out"]["logits"].shape == (4, 3, 5)  # not reduced: what the warning is about
    assert acc.matched == {"exclude": {}, "reduce": {"logits": []}}
    fixed = Accumulator(reduce={("out", "logits"): lambda t: t.argmax(-1)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fixed.append(_nested_batch())
    assert fixed.matched["reduce"] == {("out", "logits"): [("out", "logits")]}


def test_an_exclude_typo_warns_and_names_every_unmatched_pattern() -> None:
    """exclude=["past_key_value"] (a typo) keeps and pads the cache: the warning names it; every
    pattern that matches nothing is named, in Accumulator, concat and gather alike."""
    acc = Accumulator(exclude=["past_key_value", "cache"], pad_value=0.0)
    with pytest.warns(UnmatchedPatternWarning, match=r"patterns 'past_key_value', 'cache' match"):
        acc.append(_nested_batch())
    assert acc.matched["exclude"] == {"past_key_value": [], "cache": []}
    with pytest.warns(UnmatchedPatternWarning, match=r"concat\(exclude=.*'typo' matches no node"):
        concat([_nested_batch()], exclude=["typo", ("out", "past_key_values")])
    with pytest.warns(UnmatchedPatternWarning, match=r"gather\(reduce=.*'logits' matches no leaf"):
        tonumpy.gather(_nested_batch(), reduce={"logits": lambda t: t.argmax(-1)})
    right = Accumulator(exclude=[("out", "past_key_values")])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        right.append(_nested_batch())
    assert right.matched["exclude"] == {("out", "past_key_values"): [("out", "past_key_values")]}


def test_unmatched_patterns_can_be_silenced_or_made_errors() -> None:
    """One pattern list for several model families: the documented filters silence the warning
    or turn it into an error (nothing is appended then)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnmatchedPatternWarning)
        acc = Accumulator(exclude=["cache", "past_key_values"])
        acc.append({"logits": torch.ones(1, 2)})
    with warnings.catch_warnings():
        warnings.filterwarnings("error", category=tonumpy.UnmatchedPatternWarning)
        strict = Accumulator(exclude="cache")
        with pytest.raises(UnmatchedPatternWarning):
            strict.append({"logits": torch.ones(1, 2)})
    assert len(strict) == 0
