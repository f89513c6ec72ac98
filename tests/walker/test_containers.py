"""Every container kind keeps its type and has its tensors converted, wherever they are held.

Issue 12, "nothing silent": tensors in list/tuple/deque subclasses, UserList, SimpleNamespace,
ChainMap, MappingProxyType and in the extra attributes of dataclasses and dict/UserDict
subclasses are converted; objects tonumpy cannot rebuild that hold a tensor are refused with
the path and the fix; cached properties are not carried over; is_leaf must answer a bool.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import gc
import types
import warnings
import weakref
from collections import ChainMap, OrderedDict, UserDict, UserList, deque
from typing import Any

import numpy as np
import pytest
import torch

import tonumpy
from tonumpy import UnsupportedLeafError, _tree, apply, concat, to_numpy


class Batch(list):  # type: ignore[type-arg]
    """A list subclass with an attribute."""


class Pair(tuple):  # type: ignore[type-arg]
    """A tuple subclass whose __new__ takes two arguments."""

    def __new__(cls, a: Any, b: Any) -> Pair:
        return super().__new__(cls, (a, b))


class Ring(deque):  # type: ignore[type-arg]
    """A deque subclass."""


class Items(UserList):  # type: ignore[type-arg]
    """A UserList subclass."""


class Record(dict):  # type: ignore[type-arg]
    """A dict subclass whose instances carry attributes."""


class Store(UserDict):  # type: ignore[type-arg]
    """A UserDict subclass whose instances carry attributes."""


@dataclasses.dataclass
class Out:
    logits: Any
    loss: Any = None


@dataclasses.dataclass
class Sub(Out):
    """A dataclass subclass that sets an attribute of its own in __post_init__."""

    def __post_init__(self) -> None:
        self.scaled = self.logits * 2


@dataclasses.dataclass(frozen=True, slots=True)
class Frozen:
    x: Any


class Holder:
    """An arbitrary class: tonumpy cannot know how to rebuild it."""

    def __init__(self, value: Any) -> None:
        self.value = value


class Slotted:
    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


def _t(*shape: int) -> torch.Tensor:
    return torch.arange(float(np.prod(shape) or 1)).reshape(shape)


def _is_array(x: Any) -> bool:
    return isinstance(x, np.ndarray)


# ---------------------------------------------------------------------- rebuilt containers


def test_list_tuple_deque_subclasses_keep_type_items_and_attributes() -> None:
    """Subclasses of list, tuple and deque: type, items, maxlen and attributes, all converted."""
    batch = Batch([_t(2), "s"])
    batch.mask = _t(3)  # type: ignore[attr-defined]
    pair = Pair(_t(1), 7)
    pair.extra = {"w": _t(2)}  # type: ignore[attr-defined]
    ring = Ring([_t(1), _t(2)], maxlen=5)
    out = to_numpy({"batch": batch, "pair": pair, "ring": ring})
    assert type(out["batch"]) is Batch
    assert _is_array(out["batch"][0])
    assert out["batch"][1] == "s"
    assert _is_array(out["batch"].mask)
    assert type(out["pair"]) is Pair
    assert _is_array(out["pair"][0])
    assert out["pair"][1] == 7
    assert _is_array(out["pair"].extra["w"])
    assert type(out["ring"]) is Ring
    assert out["ring"].maxlen == 5
    assert all(map(_is_array, out["ring"]))
    assert isinstance(batch[0], torch.Tensor)  # the input is left as it was


def test_userlist_simplenamespace_chainmap_mappingproxy() -> None:
    """UserList, SimpleNamespace, ChainMap and MappingProxyType keep their type."""
    items = Items([_t(2)])
    items.note = _t(1)  # type: ignore[attr-defined]
    tree = {
        "ul": UserList([_t(1), "x"]),
        "items": items,
        "ns": types.SimpleNamespace(a=_t(2), b="text"),
        "cm": ChainMap({"a": _t(1)}, {"a": _t(2), "b": _t(3)}),
        "mp": types.MappingProxyType({"a": _t(1)}),
        "mpo": types.MappingProxyType(OrderedDict(z=_t(1), a=_t(2))),
        "mpu": types.MappingProxyType(Store(k=_t(1))),
    }
    out = to_numpy(tree)
    assert type(out["ul"]) is UserList
    assert _is_array(out["ul"][0])
    assert out["ul"][1] == "x"
    assert type(out["items"]) is Items
    assert _is_array(out["items"][0])
    assert _is_array(out["items"].note)
    assert type(out["ns"]) is types.SimpleNamespace
    assert _is_array(out["ns"].a)
    assert out["ns"].b == "text"
    assert type(out["cm"]) is ChainMap
    assert out["cm"]["a"].shape == (1,)  # lookups still go through the maps in order
    assert out["cm"]["b"].shape == (3,)
    assert all(_is_array(v) for m in out["cm"].maps for v in m.values())
    assert type(out["mp"]) is types.MappingProxyType
    assert _is_array(out["mp"]["a"])
    assert list(out["mpo"]) == ["z", "a"]
    assert type(out["mpo"].copy()) is OrderedDict
    assert type(out["mpu"].copy()) is Store
    assert _is_array(out["mpu"]["k"])
    with pytest.raises(TypeError):
        out["mp"]["a"] = 1  # still read-only


def test_attributes_of_dataclasses_and_mappings_are_converted() -> None:
    """Non-field attributes of dataclasses (and subclasses), dict and UserDict subclasses."""
    out_dc = Out(_t(2))
    out_dc.extra = _t(1)  # type: ignore[attr-defined]
    sub = Sub(_t(3))
    record = Record(a=_t(1))
    record.meta = {"w": _t(2)}  # type: ignore[attr-defined]
    store = Store(a=_t(1))
    store.cache = [_t(4)]  # type: ignore[attr-defined]
    frozen = Frozen(_t(2))
    out = to_numpy([out_dc, sub, record, store, frozen])
    assert _is_array(out[0].extra)
    assert type(out[1]) is Sub
    assert _is_array(out[1].scaled)
    assert type(out[2]) is Record
    assert _is_array(out[2]["a"])
    assert _is_array(out[2].meta["w"])
    assert "meta" not in out[2]  # an attribute stays an attribute, not an item
    assert type(out[3]) is Store
    assert _is_array(out[3]["a"])
    assert _is_array(out[3].cache[0])
    assert type(out[4]) is Frozen
    assert _is_array(out[4].x)


def test_self_dict_mapping_is_rebuilt_as_one() -> None:
    """The ``self.__dict__ = self`` idiom: items and attributes stay one and the same."""

    class AttrDict(dict):  # type: ignore[type-arg]
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.__dict__ = self

    out = to_numpy(AttrDict(a=_t(2)))
    assert type(out) is AttrDict
    assert _is_array(out.a)
    assert out.__dict__ is out


def test_extra_attribute_errors_and_paths_name_the_attribute() -> None:
    """A tensor that cannot be converted, held in an attribute, is named as an attribute."""
    record = Record(a=_t(1))
    record.meta = torch.ones(2, device="meta")  # type: ignore[attr-defined]
    with pytest.raises(UnsupportedLeafError, match=r"tree\['r'\]\.meta") as info:
        to_numpy({"r": record})
    assert info.value.path == ("r", "meta")


def test_paths_of_attributes_render_as_attributes() -> None:
    """format_path renders dataclass fields and extra attributes with a dot."""
    leaves, spec = tonumpy._tree.flatten({"o": Out(_t(1)), "ns": types.SimpleNamespace(x=_t(1))})
    paths = [tonumpy._tree.format_path(p) for p in spec.paths()]
    assert paths == ["tree['ns'].x", "tree['o'].logits"]
    assert len(leaves) == 2


def test_apply_rebuilds_the_new_kinds_too() -> None:
    """apply shares the walker: tensors in the new kinds reach fn."""
    tree = {"ns": types.SimpleNamespace(a=torch.ones(1)), "b": Batch([torch.ones(1)])}
    out = apply(lambda t: t + 1, tree)
    assert out["ns"].a.item() == 2.0
    assert out["b"][0].item() == 2.0
    assert type(out["b"]) is Batch


def test_concat_of_new_kinds() -> None:
    """concat walks the new kinds: a list subclass of batches concatenates leaf by leaf."""
    out = concat([types.SimpleNamespace(x=_t(2, 1)), types.SimpleNamespace(x=_t(3, 1))])
    assert out.x.shape == (5, 1)


# ---------------------------------------------------------------------- refused leaves


def test_object_holding_a_tensor_is_refused_with_path_and_fix() -> None:
    """An arbitrary object with a tensor inside is an UnsupportedLeafError naming both places."""
    tree = {"a": [1, Holder({"k": [2, _t(1)]})]}
    with pytest.raises(UnsupportedLeafError) as info:
        to_numpy(tree)
    message = str(info.value)
    assert "tree['a'][1]" in message
    assert "tree['a'][1].value['k'][1]" in message
    assert "is_leaf=lambda x: isinstance(x, Holder)" in message
    assert 'namespace="tonumpy"' in message
    assert info.value.path == ("a", 1)
    assert isinstance(info.value, TypeError)
    # the same kinds of objects without a tensor are returned as themselves ...
    holder, slotted, items = Holder({"k": ["s", 1.5]}), Slotted(None), {1, "a"}
    out = to_numpy({"h": holder, "s": slotted, "set": items, "t": _t(1)})
    assert out["h"] is holder
    assert out["s"] is slotted
    assert out["set"] is items
    # ... and so is one with a tensor that is_leaf keeps (the user's choice: no search)
    kept = Holder(_t(1))
    out = to_numpy({"h": kept, "t": _t(1)}, is_leaf=lambda x: isinstance(x, Holder))
    assert out["h"] is kept
    assert _is_array(out["t"])


@pytest.mark.parametrize(
    ("leaf", "where", "hint"),
    [
        (Slotted(_t(1)), "tree['x'].value", "is_leaf="),
        ({_t(1)}, "tree['x'] (an element)", "unhashable"),
        (frozenset({_t(1)}), "tree['x'] (an element)", "unhashable"),
        (torch.nn.Linear(2, 2), "tree['x']._parameters['weight']", "state_dict()"),
        (Holder(Holder(Out(_t(1)))), "tree['x'].value.value.logits", "is_leaf="),
    ],
    ids=["slots", "set", "frozenset", "module", "nested"],
)
def test_refused_leaf_kinds(leaf: Any, where: str, hint: str) -> None:
    """Slots, sets, modules and nested objects are searched; the message gives the fix."""
    with pytest.raises(UnsupportedLeafError) as info:
        to_numpy({"x": leaf})
    assert where in str(info.value)
    assert hint in str(info.value)


def test_every_walking_function_refuses() -> None:
    """concat, Accumulator and apply share the walker and refuse the same leaf."""
    tree = {"h": Holder(_t(1))}
    with pytest.raises(UnsupportedLeafError):
        concat([tree, tree])
    with pytest.raises(UnsupportedLeafError):
        tonumpy.Accumulator().append(tree)
    with pytest.raises(UnsupportedLeafError):
        apply(lambda t: t, tree)


def test_object_too_large_to_search_is_passed_on_with_a_warning() -> None:
    """An object holding more objects than the search budget is returned as it is, with an
    UncheckedObjectWarning naming it, not refused: growing never makes a call fail."""
    big = Holder([Holder(i) for i in range(tonumpy._tree._opaque.BUDGET + 10)])
    with pytest.warns(tonumpy.UncheckedObjectWarning, match=r"tree\['big'\] \(Holder\).*is_leaf"):
        assert to_numpy({"big": big})["big"] is big
    assert to_numpy({"big": big}, is_leaf=lambda x: isinstance(x, Holder))["big"] is big


class History:
    """An object that grows as a run goes on: a logger's history, and maybe a tensor of its own."""

    def __init__(self, entries: int, tensor: Any = None) -> None:
        self.history = [{"step": i, "value": Holder(float(i))} for i in range(entries)]
        self.last = tensor


@pytest.mark.parametrize("entries", [10, tonumpy._tree._opaque.BUDGET + 10], ids=["small", "large"])
def test_growth_of_an_unknown_object_does_not_change_the_outcome(entries: int) -> None:
    """Without a tensor the object comes back as itself at every size; with a tensor held
    directly (an attribute) it is refused at every size: the search is breadth first, so what an
    object holds directly is looked at before its history, however long."""
    plain = History(entries)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tonumpy.UncheckedObjectWarning)  # the large case warns
        assert to_numpy({"log": plain, "t": torch.ones(1)})["log"] is plain
    holding = History(entries, torch.ones(2))
    with pytest.raises(UnsupportedLeafError, match=r"tree\['log'\]\.last") as info:
        to_numpy({"log": holding})
    assert info.value.path == ("log",)


def test_large_plain_containers_of_values_are_searched_for_free() -> None:
    """A set of 200,000 ints (or an object holding a huge list of strings) holds no tensor:
    it passes, whatever the budget; one tensor among such values is still found."""
    many = set(range(200_000))
    holder = Holder(["x"] * (tonumpy._tree._opaque.BUDGET + 10))
    out = to_numpy({"many": many, "holder": holder})
    assert out["many"] is many
    assert out["holder"] is holder
    with pytest.raises(UnsupportedLeafError, match=r"tree\['s'\] \(an element\)"):
        to_numpy({"s": {*range(1000), torch.ones(1)}})


# ---------------------------------------------------------------------- cached properties


@dataclasses.dataclass
class WithCache:
    x: Any

    @functools.cached_property
    def doubled(self) -> Any:
        return self.x * 2


def test_cached_property_value_is_not_carried_over() -> None:
    """A cached value computed from the old data is dropped; the new object computes its own."""
    obj = WithCache(torch.tensor([1.0, 2.0]))
    assert isinstance(obj.doubled, torch.Tensor)  # cached in obj.__dict__
    out = to_numpy(obj)
    assert "doubled" not in vars(out)
    assert isinstance(out.doubled, np.ndarray)
    moved = apply(lambda t: t + 10, obj)  # Lightning's apply_to_collection test, ported
    assert "doubled" not in vars(moved)
    assert moved.doubled.tolist() == [22.0, 24.0]


def test_cached_property_on_other_containers() -> None:
    """The same for a dict subclass and a SimpleNamespace-like class with a cached property."""

    class Scores(dict):  # type: ignore[type-arg]
        @functools.cached_property
        def total(self) -> Any:
            return sum(self.values())

    scores = Scores(a=torch.tensor(1.0), b=torch.tensor(2.0))
    assert scores.total.item() == 3.0
    out = apply(lambda t: t * 10, scores)
    assert "total" not in vars(out)
    assert out.total.item() == 30.0


# ---------------------------------------------------------------------- is_leaf answers


@pytest.mark.parametrize("answer", ["yes", None, 1, torch.tensor(True), [True]])
def test_is_leaf_must_return_a_bool(answer: Any) -> None:
    """A non-bool answer is a TypeError naming is_leaf, the value and the path."""
    tree = {"a": {"b": [torch.ones(1)]}}

    def is_leaf(x: Any) -> Any:
        return answer if isinstance(x, list) else False

    with pytest.raises(TypeError, match=r"is_leaf must return True or False") as info:
        to_numpy(tree, is_leaf=is_leaf)
    assert "tree['a']['b']" in str(info.value)
    assert repr(answer) in str(info.value)
    # NumPy's bool is a bool: accepted
    out = to_numpy(tree, is_leaf=lambda x: np.bool_(isinstance(x, str)))
    assert _is_array(out["a"]["b"][0])


# ---------------------------------------------------------------------- nothing kept alive


def test_accumulator_keeps_no_batch_alive() -> None:
    """After append, neither the batch nor its tensors (and autograd graph) are kept alive."""
    weight = torch.ones(3, 3, requires_grad=True)

    def batch() -> Any:
        logits = torch.ones(2, 3) @ weight
        out_dc = Out(logits, logits.sum())
        out_dc.note = "n"  # type: ignore[attr-defined]  # an instance with extra state
        record = Record(logits=logits * 2)
        record.step = 1  # type: ignore[attr-defined]
        return {"dc": out_dc, "rec": record, "store": Store(x=logits * 3)}

    acc = tonumpy.Accumulator()
    for _ in range(2):
        tree = batch()
        refs = [weakref.ref(tree["dc"]), weakref.ref(tree["dc"].logits), weakref.ref(tree["rec"])]
        refs.append(weakref.ref(tree["store"]))
        acc.append(tree)
        del tree
        gc.collect()
        assert [r() for r in refs] == [None] * len(refs)
    result = acc.result()
    assert result["dc"].logits.shape == (4, 3)
    assert result["dc"].note == ["n", "n"]


@pytest.mark.parametrize(
    ("cls", "kind"),
    [
        (collections.namedtuple("P", "x y"), "fields"),
        (type(torch.max(torch.ones(2), dim=0)), "fields"),
        (OrderedDict, "mapping"),
        (ChainMap, "mapping"),
        (types.MappingProxyType, "mapping"),
        (UserDict, "mapping"),
        (Batch, "sequence"),
        (Ring, "sequence"),
        (UserList, "sequence"),
        (Pair, "tuple"),
        (types.SimpleNamespace, "other"),
    ],
)
def test_the_walker_names_each_container_kind(cls: type, kind: str) -> None:
    """container_kind classifies containers in the walker, for the file format to store."""
    assert _tree.container_kind(cls) == kind


def test_field_names_come_from_namedtuples_and_return_types() -> None:
    """field_names gives a namedtuple's fields and a torch.return_types class's, in order."""
    assert _tree.field_names(collections.namedtuple("P", "x y")) == ("x", "y")
    assert _tree.field_names(type(torch.max(torch.ones(2), dim=0))) == ("values", "indices")
