"""Choosing modules by name: glob segments, '**', regular expressions, dry runs, errors (15.1)."""

from __future__ import annotations

import fnmatch
import re
import warnings
from collections.abc import Sequence
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import tonumpy
from tonumpy import CaptureError, capture, module_names


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.0))
        self.mlp = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.attn(x))


class Deep(nn.Module):
    """``encoder.layers.N.{attn.0, attn.1, mlp}`` for N in 0..11, and a ``head``."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(Block() for _ in range(12))
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.encoder.layers:  # type: ignore[union-attr]
            x = layer(x)
        return self.head(x)


def hook_count(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._forward_hooks_always_called)
        for m in model.modules()
    )


LAYERS = [f"encoder.layers.{i}" for i in range(12)]


@pytest.mark.parametrize(
    ("include", "expected"),
    [
        ("encoder.layers.*", LAYERS),
        ("**.attn", [f"{name}.attn" for name in LAYERS]),
        ("encoder.layers.1*", ["encoder.layers.1", "encoder.layers.10", "encoder.layers.11"]),
        ("encoder.layers.?", LAYERS[:10]),
        ("encoder.**.1", [f"{name}.attn.1" for name in LAYERS] + ["encoder.layers.1"]),
        (re.compile(r"encoder\.layers\.1[01]"), LAYERS[10:]),
        ("*", ["encoder", "head"]),
    ],
    ids=["layers", "any-depth", "segment-prefix", "one-char", "between", "regex", "top"],
)
def test_star_stays_within_a_segment(include: Any, expected: list[str]) -> None:
    """The issue's case: 'encoder.layers.*' is the 12 layers (layer 10 and 11 included), not
    every module below them as with fnmatch, where '*' matched dots."""
    model = Deep()
    names = [name for name, _ in model.named_modules()]
    chosen = module_names(model, include=include)
    assert sorted(chosen) == sorted(expected)
    assert chosen == [name for name in names if name in expected]  # named_modules() order
    with capture(model, include=include) as acts:
        model(torch.ones(1, 4))
    assert acts.chosen == tuple(chosen)
    assert list(acts) == [name for name in chosen if name != "encoder"]  # never called


def test_module_names_is_a_dry_run() -> None:
    """module_names registers nothing and runs nothing; capture then hooks exactly those."""
    model = Deep()
    calls: list[str] = []
    model.register_forward_pre_hook(lambda *_: calls.append("forward"))
    before = hook_count(model)
    names = module_names(model, include="**.mlp", exclude="encoder.layers.0.*")
    assert names == [f"{name}.mlp" for name in LAYERS[1:]]
    assert hook_count(model) == before
    assert calls == []
    with capture(model, include="**.mlp", exclude="encoder.layers.0.*") as acts:
        assert acts.chosen == tuple(names)
        assert hook_count(model) == before + len(names)
    assert module_names(model) == [name for name, _ in model.named_modules()]


# ------------------------------------------------------------ the rule, against a reference


def reference(pattern: Sequence[str], name: Sequence[str]) -> bool:
    """Segment by segment: '**' takes zero or more segments, any other glob exactly one."""
    if not pattern:
        return not name
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        return any(reference(rest, name[i:]) for i in range(len(name) + 1))
    return bool(name) and fnmatch.fnmatchcase(name[0], head) and reference(rest, name[1:])


def tree_of(names: list[list[str]]) -> nn.Module:
    """Nested ModuleDicts whose named_modules() are ``names`` (and their parents, and '')."""
    root = nn.ModuleDict()
    for segments in names:
        node = root
        for segment in segments:
            if segment not in node:
                node[segment] = nn.ModuleDict()
            node = node[segment]  # type: ignore[assignment]
    return root


SEGMENTS = ["a", "b", "ab", "ba", "0", "1", "10"]
GLOBS = ["a", "b", "*", "**", "?", "a*", "*b", "[0-9]", "[!a]", "1?", "[ab]*", "*a*"]


@settings(max_examples=300, deadline=None)
@given(
    names=st.lists(st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=4), max_size=6),
    pattern=st.lists(st.sampled_from(GLOBS), min_size=1, max_size=4),
)
def test_globs_match_segment_by_segment(names: list[list[str]], pattern: list[str]) -> None:
    """For any tree and any glob, the names chosen are those the segment-wise rule accepts."""
    model = tree_of(names)
    every = [name for name, _ in model.named_modules()]
    expected = [n for n in every if reference(pattern, n.split(".") if n else [])]
    text = ".".join(pattern)
    if expected:
        assert module_names(model, include=text) == expected
    else:
        with pytest.raises(CaptureError, match="no module of ModuleDict matches"):
            module_names(model, include=text)


def test_root_is_matched_by_empty_pattern_and_double_star_only() -> None:
    """The root module '' is zero segments: '' and '**' choose it, '*' does not."""
    model = nn.Sequential(nn.Identity())
    assert module_names(model, include="") == [""]
    assert module_names(model, include="**") == ["", "0"]
    assert module_names(model, include="*") == ["0"]
    assert module_names(model, include="**.**") == ["", "0"]


# ------------------------------------------------------------------------------- the errors


def test_no_match_suggests_double_star_and_lists_names() -> None:
    """A pattern written for the name's tail gets the '**.' form suggested, with what it finds."""
    model = Deep()
    with pytest.raises(CaptureError) as info, capture(model, include="layers.*"):
        pass  # pragma: no cover - never entered
    message = str(info.value)
    assert "no module of Deep matches include=['layers.*']" in message
    assert "'**.layers.*' matches 12: 'encoder.layers.0'" in message
    assert "'encoder.layers.0.attn.0'" in message  # the names there are
    assert "tonumpy.module_names(model)" in message
    assert hook_count(model) == 0


def test_exclude_that_leaves_nothing_says_so() -> None:
    """An exclude= that removes every module include= matched is an error saying so."""
    model = Deep()
    with pytest.raises(CaptureError, match=r"matches 12 module\(s\) of Deep .* leaves none"):
        module_names(model, include="encoder.layers.*", exclude=re.compile(r".*\.\d+"))


@pytest.mark.parametrize(
    ("include", "message"),
    [
        ("encoder.layers**", r"include='encoder.layers\*\*': '\*\*' stands for whole segments"),
        ("encoder..layers", "empty segment"),
        (".head", "empty segment"),
        ("head.", "empty segment"),
        ("[9-0]", "not a valid glob pattern"),
        (re.compile(b"head"), "compiled regular expressions"),
        (3, "takes glob patterns"),
        ([None], "takes glob patterns"),
    ],
)
def test_malformed_patterns(include: Any, message: str) -> None:
    """Malformed patterns are refused before any hook, naming the option and the pattern."""
    model = Deep()
    with pytest.raises(CaptureError, match=message), capture(model, include=include):
        pass  # pragma: no cover
    with pytest.raises(CaptureError, match=message):
        module_names(model, include=include)
    with pytest.raises(CaptureError, match=message.replace("include", "exclude")):
        module_names(model, exclude=include)
    assert hook_count(model) == 0


def test_regex_written_as_a_string_gets_a_hint() -> None:
    """A regex passed as a plain string gets an error suggesting re.compile(...)."""
    model = Deep()
    with pytest.raises(CaptureError, match=re.escape(r"re.compile('encoder\\.layers\\.\\d+')")):
        module_names(model, include=r"encoder\.layers\.\d+")


def test_module_names_needs_a_module() -> None:
    """module_names of something that is not an nn.Module is a CaptureError; it is public."""
    with pytest.raises(CaptureError, match=r"needs a torch\.nn\.Module"):
        module_names(torch.ones(1))  # type: ignore[arg-type]
    assert "module_names" in tonumpy.__all__


# ------------------------------------------------------------------------------- unmatched patterns


def test_include_and_exclude_patterns_that_match_nothing_warn_by_name() -> None:
    """Of several patterns, each one that matches no module is named in a warning (issue 20.1),
    by capture and by module_names alike; what matched is what module_names lists."""
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
    include = ["0", "encoder.*", "decoder.*"]  # one list for several model families
    with pytest.warns(
        tonumpy.UnmatchedPatternWarning, match=r"include='encoder\.\*', 'decoder\.\*': these"
    ):
        assert module_names(model, include=include) == ["0"]
    with (
        pytest.warns(tonumpy.UnmatchedPatternWarning, match=r"exclude='2'.*no included module"),
        capture(model, include=["0", "1"], exclude=["1", "2"]) as acts,
    ):
        model(torch.ones(1, 2))
    assert list(acts.arrays()) == ["0"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # patterns that all match: no warning
        assert module_names(model, include=["0", "2"], exclude="2") == ["0"]
