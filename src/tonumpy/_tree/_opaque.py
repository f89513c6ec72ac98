"""Leaves tonumpy cannot rebuild: find a tensor held inside one, or show there is none.

A leaf of a type tonumpy does not know (not a tensor, array, string, number, ..., and not a
container it rebuilds) is returned as the very same object. That is only safe if the object
holds no tensor: otherwise the tensor would leave ``to_numpy`` unconverted, silently. Such a
leaf is searched, breadth first, through its ``__dict__``, its slots, the builtin containers,
dict views and object arrays it holds, and the objects those hold; one that holds a tensor is
refused with [`UnsupportedLeafError`][] naming where, unless the user keeps it with
``is_leaf=``. NumPy object arrays and dict views (``d.values()``) are searched the same way
wherever they are, also as leaves of the tree themselves.

The search is bounded: it looks at no more than ``BUDGET`` objects (plain containers of plain
values, such as a list of 100,000 floats, count as none). Breadth first, a tensor held directly
(in an attribute or a slot) is always among the first objects looked at. An object too
large to search to its end is passed on as it is, with an [`UncheckedObjectWarning`][]: an
object that grows (a logger's history) never turns a call that worked into one that fails.

Types whose instances can hold nothing visible to Python (no ``__dict__``, no slots: C types
such as ``datetime`` or ``tokenizers.Encoding``) and well-known value types are *atomic*: they
are never searched, and once seen they cost nothing (``_tree`` caches the classification).
"""

from __future__ import annotations

import datetime
import decimal
import enum
import fractions
import functools
import pathlib
import re
import types
import uuid
import weakref
from collections import deque
from typing import Any

import numpy as np
import torch

from ..errors import UncheckedObjectWarning, UnsupportedLeafError
from ._containers import has_instance_dict, slot_names

# Value types (and their subclasses) that never hold a tensor worth finding.
ATOMIC_BASES: tuple[type, ...] = (
    str,
    bytes,
    bytearray,
    int,
    float,
    complex,
    range,
    slice,
    type,
    np.generic,
    np.ndarray,
    np.dtype,
    enum.Enum,
    torch.Size,
    torch.dtype,
    torch.device,
    torch.finfo,
    torch.iinfo,
    types.FunctionType,
    types.BuiltinFunctionType,
    types.MethodType,
    types.ModuleType,
    types.CodeType,
    functools.partial,
    weakref.ref,
    datetime.date,
    datetime.time,
    datetime.timedelta,
    datetime.tzinfo,
    decimal.Decimal,
    fractions.Fraction,
    pathlib.PurePath,
    re.Pattern,
    uuid.UUID,
)

#: A search stops after this many objects; such a leaf is passed on, with a warning.
BUDGET = 100_000

#: Dict views: searched for the tensors of their dict (they cannot be rebuilt with arrays).
DICT_VIEWS: tuple[type, ...] = (type({}.keys()), type({}.values()), type({}.items()))


def is_atomic(cls: type[Any]) -> bool:
    """Whether instances of ``cls`` can be passed through without being searched."""
    if issubclass(cls, ATOMIC_BASES):
        return True
    if issubclass(cls, dict | list | tuple | set | frozenset | deque | types.MappingProxyType):
        return False
    if issubclass(cls, DICT_VIEWS):
        return False
    return not has_instance_dict(cls) and not slot_names(cls)


class TooLargeError(Exception):
    """The search ran out of budget before it could tell whether a leaf holds a tensor."""


def _attributes(node: Any) -> list[tuple[str, Any]]:
    """``node``'s instance attributes as ``(".name", value)``: ``__dict__``, then set slots."""
    out: list[tuple[str, Any]] = []
    cls = type(node)
    if has_instance_dict(cls):
        try:
            state = object.__getattribute__(node, "__dict__")
        except AttributeError:
            state = {}
        out += [(f".{name}", value) for name, value in dict(state).items()]
    for name in slot_names(cls):
        try:
            out.append((f".{name}", object.__getattribute__(node, name)))
        except AttributeError:  # an unset slot
            continue
    return out


def _parts(node: Any) -> list[tuple[str, Any]]:
    """Everything ``node`` holds, each with the text that reads it (``[k]``, ``.name``)."""
    parts: list[tuple[str, Any]] = []
    if isinstance(node, dict | types.MappingProxyType):
        for key, value in list(node.items()):
            parts += [(" (a key)", key), (f"[{key!r}]", value)]
    elif isinstance(node, list | tuple | deque):
        parts += [(f"[{i}]", value) for i, value in enumerate(list(node))]
    elif isinstance(node, set | frozenset):
        parts += [(" (an element)", value) for value in list(node)]
    elif isinstance(node, np.ndarray):  # an object array
        parts += [(_index(index), value) for index, value in np.ndenumerate(node)]
        return parts
    elif isinstance(node, DICT_VIEWS):
        items: list[Any] = list(node)  # type: ignore[call-overload] # a keys/values/items view
        parts += [(f" (its element {i})", value) for i, value in enumerate(items)]
        return parts
    return parts + _attributes(node)


def _index(index: tuple[int, ...]) -> str:
    return f"[{', '.join(map(str, index))}]"


def searchable_array(leaf: Any) -> bool:
    """Whether ``leaf`` is a NumPy array of Python objects (the only arrays searched)."""
    return isinstance(leaf, np.ndarray) and leaf.dtype.hasobject


_PLAIN_CONTAINERS = (list, tuple, set, frozenset, deque)


def _only_values(node: Any, values: frozenset[type]) -> bool:
    """Whether ``node`` is a plain builtin container of ``values`` only (checked in C).

    Such a container (a set of 200,000 ints, a list of strings) holds no tensor and nothing
    to search, however large: it costs no search budget.
    """
    cls = type(node)
    if cls in _PLAIN_CONTAINERS or cls in DICT_VIEWS:
        types = set(map(type, node))
    elif cls is np.ndarray:
        types = set(map(type, node.flat))
    elif cls is dict:
        types = set(map(type, node)) | set(map(type, node.values()))
    else:
        return False
    return types <= values


def find_tensor(obj: Any, atomic: frozenset[type]) -> str | None:
    """Where inside ``obj`` a tensor is held (``.cache['k'][0]``), or None if there is none.

    Breadth first: what ``obj`` holds directly, then what that holds, and so on. ``atomic`` are
    types known not to need a search. Raises ``TooLargeError`` when the objects to look at
    (plain containers of values such as a set of ints do not count) are more than ``BUDGET``.
    """
    seen = {id(obj)}
    queue: deque[tuple[Any, str]] = deque([(obj, "")])
    budget = BUDGET
    known: dict[type, bool] = {}
    values = frozenset(cls for cls in atomic if not issubclass(cls, torch.Tensor))
    while queue:
        node, place = queue.popleft()
        if _only_values(node, values):
            continue
        for access, child in _parts(node):
            budget -= 1
            if budget < 0:
                raise TooLargeError
            cls = type(child)
            if cls in atomic and cls is not np.ndarray:
                if isinstance(child, torch.Tensor):
                    return place + access
                continue
            if isinstance(child, torch.Tensor):
                return place + access
            if isinstance(child, np.ndarray):
                skip = not child.dtype.hasobject
            else:
                known_skip = known.get(cls)
                if known_skip is None:
                    known_skip = known[cls] = is_atomic(cls)
                skip = known_skip
            if skip or id(child) in seen:
                continue
            seen.add(id(child))
            queue.append((child, place + access))
    return None


def _hint(leaf: Any) -> str:
    name = type(leaf).__name__
    if isinstance(leaf, torch.nn.Module):
        return (
            f"pass its weights instead ({name}.state_dict() converts to a dict of arrays), or "
            f"is_leaf=lambda x: isinstance(x, torch.nn.Module) to keep the module as it is"
        )
    if isinstance(leaf, np.ndarray):
        return (
            "an array of Python objects is returned as it is: convert its elements first "
            "(tonumpy.to_numpy(arr.tolist()) gives nested lists of arrays), or pass "
            "is_leaf=lambda x: isinstance(x, np.ndarray) to keep it as it is"
        )
    if isinstance(leaf, DICT_VIEWS):
        return (
            f"a {name} is a view of a dict, which tonumpy cannot rebuild: convert the dict "
            "itself (or list(view)) instead"
        )
    if isinstance(leaf, set | frozenset):
        return (
            "arrays cannot be set elements (they are unhashable): put the tensors in a list or "
            "tuple, or pass is_leaf= to keep the set as it is"
        )
    return (
        f"pass is_leaf=lambda x: isinstance(x, {name}) to keep it as it is (tensors and all), "
        f"or teach tonumpy to rebuild it: optree.register_pytree_node({name}, flatten, "
        'unflatten, namespace="tonumpy")'
    )


def refusal(leaf: Any, place: str, path: tuple[Any, ...], inner: str) -> Exception:
    """The error for a leaf that holds a tensor at ``inner``."""
    name = "object array" if isinstance(leaf, np.ndarray) else type(leaf).__name__
    article = "an" if name[0] in "aeiou" else "a"
    return UnsupportedLeafError(
        f"cannot convert {place} ({name}): it holds a tensor at {place}{inner}, and tonumpy "
        f"cannot rebuild {article} {name} with arrays in it; {_hint(leaf)}",
        path=path,
    )


def unchecked(leaf: Any, place: str) -> UncheckedObjectWarning:
    """The warning for a leaf too large to search to its end: it is passed on as it is."""
    name = type(leaf).__name__
    return UncheckedObjectWarning(
        f"{place} ({name}) holds more than {BUDGET:,} objects, too many to check that none of "
        f"them is a tensor; it is passed on as it is. Pass is_leaf=lambda x: isinstance(x, "
        f"{name}) to keep it without a search (and without this warning)"
    )
