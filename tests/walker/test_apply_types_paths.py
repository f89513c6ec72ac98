"""apply: containers of a requested type handed whole (12.17); key paths, several trees (12.18)."""

from __future__ import annotations

import dataclasses
from collections import OrderedDict, namedtuple
from typing import Any

import numpy as np
import optree
import pytest
import torch

import tonumpy
from tonumpy import ConversionError, OptionError, apply

Pair = namedtuple("Pair", "a b")


@dataclasses.dataclass
class Out:
    logits: Any
    hidden: Any = None


class Record(OrderedDict):  # a dict subclass, as transformers' ModelOutput is
    pass


def tree() -> dict[str, Any]:
    return {
        "out": Out(torch.ones(2), [torch.zeros(1), {"deep": torch.full((1,), 3.0)}]),
        "pair": Pair(torch.ones(1), "label"),
        "meta": {"step": 3, "name": "run"},
        "none": None,
    }


# ---------------------------------------------------------------------------------- 12.17


def test_types_dict_hands_each_outermost_dict_whole() -> None:
    """Lightning's apply_to_collection(data, dict, fn): the repro returned the tree untouched."""
    seen: list[Any] = []
    data = [{"a": torch.ones(1)}, ({"b": 1, "c": {"d": 2}},), "text"]
    out = apply(lambda d: seen.append(d) or sorted(d), data, types=dict)
    assert out == [["a"], (["b", "c"],), "text"]
    assert seen == [data[0], data[1][0]]  # the inner {"d": 2} is not visited on its own
    assert seen[0] is data[0]


def test_the_root_is_matched_too() -> None:
    """apply(types=) matches the root itself when it is of the asked type."""
    data = {"x": torch.ones(1)}
    assert apply(len, data, types=dict) == 1
    assert apply(type, data, types=object) is dict


@pytest.mark.parametrize(
    ("types", "expected"),
    [
        (Out, {"out": "Out"}),
        (tuple, {"pair": "Pair"}),
        (list, {"out.hidden": "list"}),
        (type(None), {"none": "NoneType"}),
        (str, {"pair.1": "str", "meta.name": "str"}),
        (Record, {"rec": "Record"}),
        ((Out, str), {"out": "Out", "pair.1": "str", "meta.name": "str"}),
    ],
    ids=str,
)
def test_every_container_kind_can_be_asked_for(types: Any, expected: dict[str, str]) -> None:
    """apply(types=) hands fn each container kind asked for, at its path, and rebuilds around it."""
    data = {**tree(), "rec": Record(x=torch.ones(1))}
    found: dict[str, str] = {}

    def note(path: tuple[Any, ...], node: Any) -> str:
        found[".".join(map(str, path))] = type(node).__name__
        return "replaced"

    out = apply(note, data, types=types, with_path=True)
    assert found == expected
    for dotted in expected:
        node: Any = out
        for key in dotted.split("."):
            if isinstance(node, dict):
                node = node[key]
            elif isinstance(node, tuple):
                node = node[int(key)]
            else:
                node = getattr(node, key)
        assert node == "replaced"


def test_tensors_and_containers_together() -> None:
    """types= may mix tensors and containers: the outermost match is handed to fn whole."""
    data = {"a": [torch.ones(1), {"k": torch.ones(1)}], "b": torch.ones(2)}
    assert apply(type, data, types=(torch.Tensor, dict)) is dict  # the root: handed whole
    out = apply(
        lambda x: "dict" if isinstance(x, dict) else tuple(x.shape),
        [data["a"], data["b"]],
        types=(torch.Tensor, dict),
    )
    assert out == [[(1,), "dict"], (2,)]


def test_is_leaf_still_applies_with_container_types() -> None:
    """is_leaf= still keeps nodes whole (and untouched) when types= names containers."""
    data = {"keep": [torch.ones(1)], "map": [{"x": 1}]}
    out = apply(len, data["map"], types=dict, is_leaf=lambda node: node is data["keep"])
    assert out == [1]
    nested = {"keep": [1], "map": {"inner": [2]}}
    out = apply(lambda x: "hit", nested, types=list, is_leaf=lambda node: node is nested["map"])
    assert out == {"keep": "hit", "map": {"inner": [2]}}  # "map" is a leaf that is not a list
    assert out["map"] is nested["map"]


def test_same_results_as_lightning_apply_to_collection() -> None:
    """apply(fn, tree, types=T) gives what Lightning's apply_to_collection gives."""
    apply_func = pytest.importorskip("lightning_utilities.core.apply_func")
    data = {"a": [{"x": torch.ones(1)}, {"y": 2}], "b": ({"z": 3},), "c": "s"}
    for dtype in (dict, torch.Tensor, int, str):
        ours = apply(repr, data, types=dtype)
        theirs = apply_func.apply_to_collection(data, dtype, repr)
        assert ours == theirs, dtype


def test_unmatched_trees_come_back_equal_and_fresh() -> None:
    """A tree with nothing matched comes back equal in new containers; the input is untouched."""
    data = tree()
    assert apply(lambda x: x, data, types=dict) is data  # the root dict, handed to fn whole
    out = apply(lambda t: t + 1, data)
    assert torch.equal(out["out"].logits, torch.full((2,), 2.0))
    assert out["meta"] == {"step": 3, "name": "run"}
    assert torch.equal(data["out"].logits, torch.ones(2))  # the input is left as it was


@pytest.mark.parametrize("types", ["dict", (dict, "list"), (), 3, [dict]])
def test_types_must_be_types(types: Any) -> None:
    """types= that is not a type or a tuple of types is an OptionError."""
    with pytest.raises(OptionError, match=r"apply\(types=.*takes a type or a tuple of types"):
        apply(len, {"a": 1}, types=types)


def test_fn_must_be_callable() -> None:
    """apply with an fn that is not callable is an OptionError."""
    with pytest.raises(OptionError, match="fn must be callable"):
        apply("len", {"a": torch.ones(1)})  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------- 12.18


def test_fn_sees_each_leafs_key_path() -> None:
    """with_path=True hands fn each leaf's key path as optree spells it."""
    out = apply(lambda path, t: path, tree(), with_path=True)
    assert out["out"].logits == ("out", "logits")
    assert out["out"].hidden == [("out", "hidden", 0), {"deep": ("out", "hidden", 1, "deep")}]
    assert out["pair"] == Pair(("pair", 0), "label")  # optree's paths: namedtuples by index
    assert out["meta"] == {"step": 3, "name": "run"}


def test_paths_are_optrees_paths() -> None:
    """For containers optree knows, the paths are those of optree.tree_flatten_with_path."""
    data = {"b": [torch.ones(1), (torch.ones(1),)], "a": {"x": torch.ones(1)}}
    paths, _, _ = optree.tree_flatten_with_path(data)
    collected: list[tuple[Any, ...]] = []
    apply(lambda path, t: collected.append(path), data, with_path=True)
    assert sorted(collected) == sorted(paths)
    assert collected == paths  # and in the same order


def test_paths_match_error_paths_and_pad_value_keys() -> None:
    """The paths apply gives are the keys pad_value= mappings take."""
    data = {"labels": [torch.ones(1, 1), torch.ones(1, 2)]}
    out = apply(lambda path, t: path, data, with_path=True)
    padded = tonumpy.concat([data, data], pad_value={out["labels"][1]: -1})
    assert padded["labels"][1].tolist() == [[1, 1], [1, 1]]


def test_several_trees() -> None:
    """apply over several trees passes fn matching leaves; other values come from the first tree."""
    a = {"x": torch.ones(2), "y": [torch.zeros(1)], "name": "a"}
    b = {"x": torch.full((2,), 2.0), "y": [torch.ones(1)], "name": "b"}
    c = {"x": np.full(2, 10.0), "y": [np.ones(1)], "name": "c"}
    out = apply(lambda p, q, r: p + q + torch.from_numpy(r).float(), a, b, c)
    assert out["x"].tolist() == [13.0, 13.0]
    assert out["y"][0].tolist() == [2.0]
    assert out["name"] == "a"  # not a tensor in the first tree: the first tree's part


def test_several_trees_with_paths() -> None:
    """apply over several trees with with_path=True passes the path, then each tree's leaf."""
    a = {"x": torch.ones(1), "y": (torch.ones(1),)}
    out = apply(lambda path, p, q: (path, float(p + q)), a, a, with_path=True)
    assert out == {"x": (("x",), 2.0), "y": ((("y", 0), 2.0),)}


def test_dict_key_order_does_not_matter_between_trees() -> None:
    """Dicts with the same keys in another order match by key; the first tree's order is kept."""
    a = {"x": torch.ones(1), "y": torch.zeros(1)}
    b = {"y": torch.full((1,), 5.0), "x": torch.full((1,), 7.0)}
    out = apply(torch.add, a, b)
    assert list(out) == ["x", "y"]
    assert out["x"].item() == 8.0
    assert out["y"].item() == 5.0


@pytest.mark.parametrize(
    ("other", "path", "words"),
    [
        ({"x": torch.ones(1), "y": [torch.ones(1)]}, ("z",), "the key is missing"),
        ({"x": torch.ones(1), "y": [torch.ones(1), torch.ones(1)], "z": 1}, ("y",), "2 items"),
        ({"x": torch.ones(1), "y": (torch.ones(1),), "z": 1}, ("y",), "a tuple"),
        ({"x": [torch.ones(1)], "y": [torch.ones(1)], "z": 1}, ("x",), "a list"),
        ({"x": None, "y": [torch.ones(1)], "z": 1}, ("x",), "None"),
    ],
    ids=["missing key", "longer list", "tuple for list", "list for leaf", "None for leaf"],
)
def test_differing_structures_name_the_first_differing_path(
    other: Any, path: tuple[Any, ...], words: str
) -> None:
    """Trees of different structures are refused before fn runs, naming the first differing path."""
    first = {"x": torch.ones(1), "y": [torch.ones(1)], "z": 1}
    calls: list[Any] = []
    with pytest.raises(ConversionError, match=words) as info:
        apply(lambda *xs: calls.append(xs), first, first, other)
    assert info.value.path == path
    assert "rests[1] does not have the structure of tree" in str(info.value)
    assert calls == []  # checked before fn runs


def test_fn_errors_name_the_path() -> None:
    """An error raised by fn carries a note naming the leaf's path."""

    def boom(t: torch.Tensor) -> None:
        raise RuntimeError("bad leaf")

    with pytest.raises(RuntimeError, match="bad leaf") as info:
        apply(boom, {"a": [torch.ones(1)]})
    assert any("tree['a'][0]" in note for note in getattr(info.value, "__notes__", []))


def test_tree_is_positional_only_and_options_keyword_only() -> None:
    """The tree is positional-only, and options are checked (with_path=1 is refused)."""
    with pytest.raises(TypeError):
        apply(len, tree={"a": 1})  # type: ignore[call-arg]
    with pytest.raises(OptionError, match=r"apply\(with_path=1"):
        apply(len, {"a": 1}, with_path=1)  # type: ignore[arg-type]
