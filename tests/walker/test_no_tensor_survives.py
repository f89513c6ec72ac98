"""Property: no torch.Tensor survives to_numpy anywhere in the result, unless is_leaf kept it.

Random trees mix every container kind tonumpy rebuilds (builtins, namedtuples, dataclasses,
dict/list/tuple/deque/UserDict/UserList subclasses, SimpleNamespace, ChainMap, mappingproxy,
transformers caches), nest them, and put tensors anywhere, extra attributes included. The
result is searched everywhere a tensor could hide: items, elements, ``__dict__``, slots.
"""

from __future__ import annotations

import dataclasses
import types
from collections import ChainMap, OrderedDict, UserDict, UserList, defaultdict, deque
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tonumpy
from tonumpy import UnsupportedLeafError, apply, to_numpy


class Pt(NamedTuple):
    x: Any
    y: Any


@dataclasses.dataclass
class Dc:
    a: Any
    b: Any = None


@dataclasses.dataclass(frozen=True)
class FrozenDc:
    a: Any


@dataclasses.dataclass(slots=True)
class SlotDc:
    a: Any


class DictSub(dict):  # type: ignore[type-arg]
    pass


class ListSub(list):  # type: ignore[type-arg]
    pass


class TupleSub(tuple):  # type: ignore[type-arg]
    pass


class DequeSub(deque):  # type: ignore[type-arg]
    pass


class UDict(UserDict):  # type: ignore[type-arg]
    pass


class UList(UserList):  # type: ignore[type-arg]
    pass


class NsSub(types.SimpleNamespace):
    pass


class Opaque:
    """An object tonumpy cannot rebuild: refused if it holds a tensor, kept with is_leaf."""

    def __init__(self, value: Any) -> None:
        self.value = value


_WITH_ATTRIBUTES = (Dc, DictSub, ListSub, TupleSub, DequeSub, UDict, UList, NsSub)


try:  # transformers is optional: without it, trees have no KV caches
    from transformers import cache_utils
except ImportError:  # pragma: no cover - a dev dependency
    cache_utils = None


@st.composite
def _tensor(draw: st.DrawFn) -> torch.Tensor:
    shape = draw(st.lists(st.integers(0, 3), max_size=2))
    t = torch.full(shape, float(draw(st.integers(-3, 3))))
    return t.requires_grad_() if draw(st.booleans()) else t


@st.composite
def _cache(draw: st.DrawFn) -> Any:
    layers = draw(st.integers(1, 2))
    seq = draw(st.integers(1, 3))
    pairs = [(torch.ones(1, 2, seq, 4), torch.zeros(1, 2, seq, 4))] * layers
    return cache_utils.DynamicCache(ddp_cache_data=pairs)


def _wrap(draw: st.DrawFn, children: st.SearchStrategy[Any]) -> Any:
    kind = draw(st.integers(0, 17))
    items = draw(st.lists(children, max_size=3))
    keyed = {f"k{i}": v for i, v in enumerate(items)}
    one = items[0] if items else None
    node: Any
    if kind == 0:
        node = items
    elif kind == 1:
        node = tuple(items)
    elif kind == 2:
        node = keyed
    elif kind == 3:
        node = Pt(one, items)
    elif kind == 4:
        node = Dc(one, items)
    elif kind == 5:
        node = FrozenDc(one)
    elif kind == 6:
        node = SlotDc(one)
    elif kind == 7:
        node = DictSub(keyed)
    elif kind == 8:
        node = ListSub(items)
    elif kind == 9:
        node = TupleSub(items)
    elif kind == 10:
        node = DequeSub(items, maxlen=draw(st.sampled_from([None, 5])))
    elif kind == 11:
        node = UDict(keyed)
    elif kind == 12:
        node = UList(items)
    elif kind == 13:
        node = NsSub(**keyed)
    elif kind == 14:
        node = ChainMap(keyed, {"z": one})
    elif kind == 15:
        node = types.MappingProxyType(keyed)
    elif kind == 16:
        node = OrderedDict(keyed)
    else:
        node = defaultdict(list, keyed)
    if isinstance(node, _WITH_ATTRIBUTES) and draw(st.booleans()):
        object.__setattr__(node, "extra", draw(children))  # an attribute holding a subtree
    return node


def trees() -> st.SearchStrategy[Any]:
    kinds = [_tensor(), _tensor(), st.none(), st.integers(-3, 3), st.text(max_size=2)]
    leaves = st.one_of(*kinds, *([_cache()] if cache_utils is not None else []))

    @st.composite
    def node(draw: st.DrawFn, children: st.SearchStrategy[Any]) -> Any:
        return _wrap(draw, children)

    return st.recursive(leaves, node, max_leaves=14)


def tensors_in(obj: Any, kept: tuple[type, ...] = ()) -> list[str]:
    """Where tensors are in ``obj``: items, elements, attributes, slots (not inside ``kept``)."""
    found: list[str] = []
    seen: set[int] = set()
    stack: list[tuple[Any, str]] = [(obj, "out")]
    while stack:
        node, where = stack.pop()
        if isinstance(node, torch.Tensor):
            found.append(where)
            continue
        if id(node) in seen or isinstance(node, (*kept, str, bytes, int)):
            continue
        seen.add(id(node))
        if isinstance(node, dict | types.MappingProxyType):
            stack += [(v, f"{where}[{k!r}]") for k, v in node.items()]
            stack += [(k, f"{where} key") for k in node]
        elif isinstance(node, list | tuple | deque | set | frozenset):
            stack += [(v, f"{where}[{i}]") for i, v in enumerate(node)]
        for name in getattr(type(node), "__slots__", ()):
            if hasattr(node, name):
                stack.append((getattr(node, name), f"{where}.{name}"))
        state = getattr(node, "__dict__", None)
        if isinstance(state, dict):
            stack += [(v, f"{where}.{k}") for k, v in state.items()]
    return found


_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_SETTINGS
@given(trees(), st.sampled_from([None, True]))
def test_no_tensor_survives_to_numpy(tree: Any, copy: bool | None) -> None:
    """Whatever the nesting, the result holds no tensor (deep, through __dict__ and slots)."""
    out = to_numpy(tree, copy=copy)
    assert tensors_in(out) == []


@_SETTINGS
@given(trees())
def test_only_what_is_leaf_keeps_survives(tree: Any) -> None:
    """With is_leaf keeping SimpleNamespace subclasses, tensors survive only inside them."""
    out = to_numpy(tree, is_leaf=lambda x: isinstance(x, NsSub))
    assert tensors_in(out, kept=(NsSub,)) == []


@_SETTINGS
@given(trees(), st.integers(0, 10))
def test_an_object_holding_a_tensor_anywhere_is_refused(tree: Any, where: int) -> None:
    """An opaque object holding a tensor, put at a random place, is refused with its path."""
    leaves = list(tonumpy._tree.flatten(tree)[0])
    leaves.insert(min(where, len(leaves)), Opaque([torch.ones(1)]))
    holder = [*leaves]  # a list of every leaf, one of them the opaque object
    index = min(where, len(leaves) - 1)
    with pytest.raises(UnsupportedLeafError) as info:
        to_numpy({"tree": tree, "leaves": holder})
    assert info.value.path == ("leaves", index)
    kept = to_numpy({"leaves": holder}, is_leaf=lambda x: isinstance(x, Opaque))
    assert tensors_in(kept, kept=(Opaque,)) == []


def _object_array(*items: Any) -> np.ndarray:
    out = np.empty(len(items), dtype=object)
    out[:] = list(items)
    return out


@pytest.mark.parametrize(
    ("make", "inner"),
    [
        (lambda t: _object_array(None, t), "[1]"),
        (lambda t: _object_array(None, t).reshape(1, 2), "[0, 1]"),
        (lambda t: _object_array("a", [1, t]), "[1][1]"),
        (lambda t: {"a": t}.values(), " (its element 0)"),
        (lambda t: {"a": t}.items(), " (its element 0)[1]"),
        (lambda t: {t: 1}.keys(), " (its element 0)"),
        (lambda t: Opaque(_object_array(t)), ".value[0]"),
        (lambda t: Opaque({"a": t}.values()), ".value (its element 0)"),
    ],
    ids=[
        "object-array",
        "2d-object-array",
        "deep",
        "values",
        "items",
        "keys",
        "in-obj-array",
        "in-obj-view",
    ],
)
def test_object_arrays_and_dict_views_holding_tensors_are_refused(make: Any, inner: str) -> None:
    """A tensor inside a NumPy object array or a dict view never comes back unconverted: the
    leaf is refused naming where the tensor is (issue 20.2); is_leaf= keeps it on purpose."""
    leaf = make(torch.ones(2))
    for fn in (
        to_numpy,
        lambda tree: tonumpy.concat([tree]),
        lambda tree: apply(lambda t: t, tree),
    ):
        with pytest.raises(UnsupportedLeafError) as info:
            fn({"x": leaf})
        assert f"tree['x']{inner}" in str(info.value)
        assert info.value.path == ("x",)
    kept = to_numpy({"x": leaf}, is_leaf=lambda x: isinstance(x, type(leaf)))
    assert kept["x"] is leaf


def test_object_arrays_and_dict_views_without_tensors_pass() -> None:
    """Object arrays and dict views that hold no tensor come back as themselves; numeric
    arrays are never looked into."""
    objects, view, numbers = _object_array("a", None, [1, 2]), {"a": 1}.values(), np.ones(3)
    out = to_numpy({"o": objects, "v": view, "n": numbers, "t": torch.ones(1)})
    assert out["o"] is objects
    assert out["v"] is view
    assert out["n"] is numbers
