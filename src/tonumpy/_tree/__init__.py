"""The tree walker: optree's C++ flatten/unflatten in tonumpy's own registry namespace.

Every tonumpy function that takes a tree walks it here. optree knows dict, OrderedDict,
defaultdict, list, tuple, namedtuple, deque and ``torch.return_types``; the other containers
(``_tree._containers``, and what an integration registers through ``_tree._integrations``,
such as the transformers objects of ``tonumpy.integrations``) are registered
lazily, and only inside the ``"tonumpy"`` namespace, the first time one shows up as a leaf: the
leaves' types are checked after each flatten, and the tree is flattened again if a new node type
was registered. Every other leaf type is classified once: *atomic* types (tensors, arrays,
strings, numbers, ``None``, C types with no Python-visible state, ...) cost nothing from then
on; instances of other types are searched, and one that holds a tensor is refused
(``tonumpy._tree._opaque``), so that no tensor leaves tonumpy unconverted unless ``is_leaf`` kept
it.

Threads: classification and registration happen under one lock, and a type is published as a
node only once optree knows it. A flatten that ran while another thread registered (or evicted)
a type it met as a leaf is simply run again, so the loser of a registration race never takes a
container for a leaf. Nothing relies on the GIL: the shared state is replaced, never mutated in
place, outside the lock.

Memory: registering a class keeps it alive (optree holds it). At most ``MAX_NODE_TYPES``
classes stay registered: past that, the oldest registrations are dropped (a class still in use
is registered again when it next shows up). Treespecs made before such a re-registration still
rebuild and compare equal under ``same_structure``.
"""

from __future__ import annotations

import contextlib
import operator
import sys
import threading
import warnings
from collections import OrderedDict, UserList, defaultdict, deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import numpy as np
import optree
import torch
from optree import PyTreeSpec

from ..errors import ConversionError, UnsupportedLeafError
from . import _containers, _integrations, _opaque
from ._containers import NAMESPACE, Attr, NodeError
from ._integrations import Integration, attributes_are_state, register_integration

__all__ = [
    "MAX_NODE_TYPES",
    "NAMESPACE",
    "Attr",
    "Integration",
    "Node",
    "Sketch",
    "attributes_are_state",
    "container_kind",
    "difference_error",
    "field_names",
    "first_difference",
    "flatten",
    "flatten_typed",
    "format_path",
    "is_opaque_type",
    "leaf_path",
    "leaf_paths",
    "outline",
    "place",
    "register_integration",
    "render",
    "require_same",
    "same_structure",
    "sketch",
    "structure_error",
    "unflatten",
]

#: At most this many container classes stay registered (about 10 KiB each, class included).
MAX_NODE_TYPES = 1024
#: Leaf types remembered (atomic or searched) before the memory of them is cleared.
_MAX_LEAF_TYPES = 4096
# A flatten that had to be redone this many times runs under the lock (no eviction meanwhile).
_LOCKED_AFTER = 2

# What a leaf's type is, once classified.
_NODE = "node"  # a container tonumpy registered: a leaf only where is_leaf kept it
_FOREIGN = "foreign"  # optree walks it by itself (builtins, namedtuples, user registrations)
_ATOMIC = "atomic"  # passed through, never searched
_SEARCH = "search"  # passed through once searched for tensors (_opaque)

_BASE_ATOMIC: frozenset[type] = frozenset(
    {
        torch.Tensor,
        torch.nn.Parameter,
        np.ndarray,
        str,
        int,
        float,
        bool,
        complex,
        bytes,
        type(None),
        torch.dtype,
        torch.device,
        torch.Size,
        *(np.dtype(code).type for code in "?bhilqBHILQefdgFDGSU"),
    }
)


class _Snapshot(NamedTuple):
    """The registered node types, and how many evictions happened so far."""

    evictions: int
    nodes: frozenset[type]


_lock = threading.RLock()
_roles: dict[type, str] = {}  # written under _lock only
_registered: dict[type, None] = {}  # tonumpy's registrations, oldest first (under _lock)
_snapshot = _Snapshot(0, frozenset())  # replaced under _lock, read anywhere
_atomic: frozenset[type] = _BASE_ATOMIC  # replaced under _lock, read anywhere
_NATIVE = (dict, OrderedDict, defaultdict, list, tuple, deque, type(None))


def _decide(cls: type[Any]) -> str:
    """Classify ``cls``, registering it with optree if it is a container tonumpy rebuilds."""
    if (
        cls in _NATIVE
        or optree.is_namedtuple_class(cls)
        or optree.is_structseq_class(cls)
        or optree.register_pytree_node.get(cls, namespace=NAMESPACE) is not None
    ):
        return _FOREIGN
    if issubclass(cls, (torch.Tensor, *_opaque.ATOMIC_BASES)):
        return _ATOMIC
    register = _integrations.registrar(cls) or _containers.registrar(cls)
    if register is None:
        return _ATOMIC if _opaque.is_atomic(cls) else _SEARCH
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # optree warns about some subclasses it knows
            register(cls)
    except ValueError:  # registered in our namespace meanwhile, by the user
        return _FOREIGN
    return _NODE


def _classify(cls: type[Any], protect: set[type]) -> str:
    """The kind of leaf type ``cls``, classified (and registered) once, under the lock.

    ``protect`` holds the node types the calling flatten relies on: they are not evicted.
    """
    role = _roles.get(cls)
    if role is not None:
        return role
    global _atomic, _snapshot  # noqa: PLW0603 - replaced as a whole, under the lock
    with _lock:
        role = _roles.get(cls)
        if role is not None:
            return role
        role = _decide(cls)
        if role is _NODE:
            _registered[cls] = None
            protect.add(cls)
            _roles[cls] = role
            _snapshot = _Snapshot(_snapshot.evictions, _snapshot.nodes | {cls})
            _evict(protect)
            return role
        if len(_roles) - len(_registered) >= _MAX_LEAF_TYPES:
            for known in [k for k, v in _roles.items() if v is not _NODE]:
                del _roles[known]
            _atomic = _BASE_ATOMIC
        _roles[cls] = role
        if role is _ATOMIC:
            _atomic = _atomic | {cls}
        return role


def _evict(protect: set[type]) -> None:
    """Drop the oldest registrations once there are more than ``MAX_NODE_TYPES``."""
    global _snapshot  # noqa: PLW0603 - replaced as a whole, under the lock
    excess = len(_registered) - MAX_NODE_TYPES
    if excess <= 0:
        return
    goal = excess + MAX_NODE_TYPES // 4  # make room for a batch of new types at once
    victims = [cls for cls in _registered if cls not in protect][:goal]
    if not victims:
        return
    # Published before optree forgets them: a flatten that met one as a leaf sees the count.
    _snapshot = _Snapshot(_snapshot.evictions + 1, _snapshot.nodes.difference(victims))
    for cls in victims:
        del _registered[cls]
        del _roles[cls]
        optree.unregister_pytree_node(cls, namespace=NAMESPACE)


_PLAIN_VALUES = frozenset({str, int, float, bool, complex, bytes, type(None)})


def is_opaque_type(cls: type[Any]) -> bool:
    """Whether instances of ``cls`` are leaves tonumpy neither converts nor walks into.

    True for the types tonumpy cannot rebuild (loggers, modules, optimizers) and for values
    such as strings and numbers; False for tensors, arrays and containers. Classified once.
    """
    if cls in _PLAIN_VALUES:
        return True
    if cls in _NATIVE or issubclass(cls, torch.Tensor | np.ndarray | np.generic):
        return False
    role = _roles.get(cls) or _classify(cls, set())
    return role is _ATOMIC or role is _SEARCH


_SEQUENCES = (list, deque, UserList)


def container_kind(cls: type[Any]) -> str:
    """What kind of container the walker takes ``cls`` for, for what stores a tree's shape.

    ``"fields"``: a namedtuple or ``torch.return_types`` class (its entries are named by
    [`field_names`][tonumpy._tree.field_names]); ``"state"``: a class whose attribute
    children are the object's own state, not data (an integration says so: a transformers
    ``BatchEncoding``, whose items are the data); ``"mapping"``; ``"sequence"`` (lists, deques,
    ``UserList``); ``"tuple"``; ``"other"`` (dataclasses, namespaces, a user's registered node).

    Examples:
        >>> import collections
        >>> P = collections.namedtuple("P", "x y")
        >>> [container_kind(c) for c in (P, dict, collections.deque, tuple, object)]
        ['fields', 'mapping', 'sequence', 'tuple', 'other']
    """
    if optree.is_namedtuple_class(cls) or optree.is_structseq_class(cls):
        return "fields"
    if attributes_are_state(cls):
        return "state"
    if issubclass(cls, Mapping):
        return "mapping"
    if issubclass(cls, _SEQUENCES):
        return "sequence"
    return "tuple" if issubclass(cls, tuple) else "other"


def field_names(cls: type[Any]) -> tuple[str, ...]:
    """The field names of a namedtuple or ``torch.return_types`` class, in order.

    Examples:
        >>> import collections
        >>> field_names(collections.namedtuple("P", "x y"))
        ('x', 'y')
    """
    if optree.is_namedtuple_class(cls):
        return tuple(optree.namedtuple_fields(cls))
    return tuple(optree.structseq_fields(cls))


def registered_types() -> tuple[type, ...]:
    """The container classes tonumpy has registered with optree, oldest first."""
    with _lock:
        return tuple(_registered)


# ------------------------------------------------------------------------------ flatten


class _BadAnswerError(Exception):
    """``is_leaf`` returned something other than a bool for ``node``."""

    def __init__(self, node: Any, answer: Any) -> None:
        super().__init__()
        self.node = node
        self.answer = answer


def _strict(is_leaf: Callable[[Any], Any]) -> Callable[[Any], bool]:
    """``is_leaf``, refusing answers that are not ``True``/``False`` (or a NumPy bool)."""

    def check(node: Any) -> bool:
        answer = is_leaf(node)
        if answer is True or answer is False:
            return answer
        if type(answer) is np.bool_:
            return bool(answer)
        raise _BadAnswerError(node, answer)

    return check


def flatten(
    tree: Any,
    /,
    *,
    is_leaf: Callable[[Any], bool] | None = None,
    none_is_leaf: bool = False,
    search: bool = True,
) -> tuple[list[Any], PyTreeSpec]:
    """Flatten ``tree`` in the tonumpy namespace, registering unseen container types lazily.

    ``search=False`` leaves the leaves tonumpy cannot rebuild unsearched (``numpy_args``: they
    are passed on as they are, at a cost independent of their size).

    Raises:
        ConversionError: The tree contains a cycle or is deeper than optree can walk; the message
            names the path where that happens.
        UnsupportedLeafError: A leaf that tonumpy cannot rebuild holds a tensor (and ``is_leaf``
            did not keep it); the message names the path and the fix.
        TypeError: ``is_leaf`` returned something other than ``True`` or ``False``.
    """
    leaves, spec, _ = flatten_typed(tree, is_leaf=is_leaf, none_is_leaf=none_is_leaf, search=search)
    return leaves, spec


def flatten_typed(
    tree: Any,
    /,
    *,
    is_leaf: Callable[[Any], bool] | None = None,
    none_is_leaf: bool = False,
    search: bool = True,
) -> tuple[list[Any], PyTreeSpec, set[type]]:
    """``flatten``, also returning the set of the leaves' types (computed anyway)."""
    check = None if is_leaf is None else _strict(is_leaf)
    protect: set[type] = set()
    attempt = 0
    while True:
        with _lock if attempt >= _LOCKED_AFTER else contextlib.nullcontext():
            snapshot = _snapshot
            leaves, spec = _flatten_once(tree, check, is_leaf, none_is_leaf)
            leaf_types = set(map(type, leaves))
            atomic = _atomic
            if leaf_types <= atomic:  # tensors, arrays, strings, numbers, ...: nothing to do
                if search and _arrays_possible(leaf_types):
                    _refuse_object_arrays(leaves, leaf_types, spec, check, atomic)
                return leaves, spec, leaf_types
            again = opaque = False
            for cls in leaf_types - atomic:
                role = _classify(cls, protect)
                if role is _NODE:
                    protect.add(cls)
                    # a node type met as a leaf: is_leaf kept it, unless it was registered (or
                    # evicted) while this flatten ran
                    if cls not in snapshot.nodes or _snapshot.evictions != snapshot.evictions:
                        again = True
                elif role is _SEARCH:
                    opaque = True
            if not again:
                if opaque and search:
                    _refuse_opaque(leaves, spec, check, protect)
                elif search and _arrays_possible(leaf_types):
                    _refuse_object_arrays(leaves, leaf_types, spec, check, _atomic)
                return leaves, spec, leaf_types
        attempt += 1


def _flatten_once(
    tree: Any,
    check: Callable[[Any], bool] | None,
    is_leaf: Callable[[Any], Any] | None,
    none_is_leaf: bool,
) -> tuple[list[Any], PyTreeSpec]:
    try:
        return optree.tree_flatten(tree, check, none_is_leaf=none_is_leaf, namespace=NAMESPACE)
    except RecursionError:
        raise _recursion_error(tree, check, none_is_leaf) from None
    except _BadAnswerError as bad:
        raise _answer_error(tree, bad, is_leaf, none_is_leaf) from None
    except NodeError as bad:
        raise _node_error(tree, bad, check, none_is_leaf) from None


_ONLY_ARRAYS = {np.ndarray}
_IS_ARRAY: Callable[[Any], bool] = np.ndarray.__instancecheck__  # isinstance(x, np.ndarray), in C
_DTYPE = operator.attrgetter("dtype")


def _arrays_possible(leaf_types: set[type]) -> bool:
    """Whether some leaf may be a NumPy array (the leaves to look at for object arrays)."""
    return np.ndarray in leaf_types or not leaf_types <= _BASE_ATOMIC


def _refuse_object_arrays(
    leaves: list[Any],
    leaf_types: set[type],
    spec: PyTreeSpec,
    check: Callable[[Any], bool] | None,
    atomic: Any,
) -> None:
    """Raise for the first NumPy array of Python objects that holds a tensor.

    Numeric arrays are never looked into: their dtypes (collected in C) say they hold no object.
    """
    arrays = leaves if leaf_types == _ONLY_ARRAYS else filter(_IS_ARRAY, leaves)
    if not any(dtype.hasobject for dtype in set(map(_DTYPE, arrays))):
        return
    searchable = _opaque.searchable_array
    for index, leaf in enumerate(leaves):
        if searchable(leaf) and not (check is not None and check(leaf)):
            _search(leaf, index, spec, atomic)


def _search(leaf: Any, index: int, spec: PyTreeSpec, atomic: Any) -> None:
    """Raise if ``leaf`` holds a tensor; warn if it is too large to tell."""
    try:
        inner = _opaque.find_tensor(leaf, atomic)
    except _opaque.TooLargeError:
        warnings.warn(_opaque.unchecked(leaf, leaf_path(spec, index)[1]), stacklevel=5)
        return
    if inner is not None:
        path, place = leaf_path(spec, index)
        raise _opaque.refusal(leaf, place, path, inner)


def _refuse_opaque(
    leaves: list[Any], spec: PyTreeSpec, check: Callable[[Any], bool] | None, protect: set[type]
) -> None:
    """Raise for the first leaf tonumpy cannot rebuild (or object array) that holds a tensor."""
    atomic = _atomic
    searchable = _opaque.searchable_array
    for index, leaf in enumerate(leaves):
        cls = type(leaf)
        if searchable(leaf):
            pass
        elif cls in atomic or _classify(cls, protect) is not _SEARCH:
            continue
        if check is not None and check(leaf):
            continue
        _search(leaf, index, spec, atomic)


def unflatten(spec: PyTreeSpec, leaves: Iterable[Any]) -> Any:
    """Rebuild a tree of ``spec``'s structure from ``leaves``."""
    return optree.tree_unflatten(spec, leaves)


def _shape(spec: PyTreeSpec) -> Any:
    """``spec``'s structure as nested tuples of node types and node data."""
    walk: Any = spec.walk  # optree's stub types the leaves and results as one type
    return walk(
        [None] * spec.num_leaves,
        lambda node_type, data, children: (node_type, data, tuple(children)),
        lambda _: None,
    )


def same_structure(a: PyTreeSpec, b: PyTreeSpec) -> bool:
    """Whether ``a`` and ``b`` describe one structure.

    Equal treespecs do; so do treespecs whose only difference is that a container type was
    registered again in between (optree compares registrations by identity). Use this, not
    ``==``, to compare treespecs made at different times.
    """
    if a == b:
        return True
    return (
        a.num_leaves == b.num_leaves
        and a.num_nodes == b.num_nodes
        and a.none_is_leaf == b.none_is_leaf
        and a.namespace == b.namespace
        and _shape(a) == _shape(b)
    )


# ------------------------------------------------------------------------------ key paths


def render(steps: tuple[optree.PyTreeEntry, ...], root: str = "tree") -> str:
    """The one rendering of a place in a tree, from optree's path entries: ``tree['p'].y``.

    Fields and namedtuple entries read as attributes (``.y``, as users read them), mapping
    and sequence items by subscript, tonumpy's attribute and method nodes as ``.name`` and
    ``.name()``. [`place`][tonumpy._tree.place] and the walker's errors render through it;
    [`format_path`][tonumpy._tree.format_path] is for a key path whose containers are gone.

    Examples:
        >>> import collections
        >>> P = collections.namedtuple("P", "x y")
        >>> tree = {"p": P(1, 2)}
        >>> render(tuple(optree.tree_accessors(tree)[1]))
        "tree['p'].y"
    """
    return optree.PyTreeAccessor(steps).codify(root)


def _steps(node: Any, keys: Any, none_is_leaf: bool) -> list[Any]:
    """The path entries of ``node``'s children (``.y`` for a namedtuple's), one per key.

    Falls back to the keys themselves where optree cannot name them one by one.
    """
    try:
        spec = optree.tree_structure(
            node, lambda x: x is not node, none_is_leaf=none_is_leaf, namespace=NAMESPACE
        )
        steps = [accessor[0] for accessor in spec.accessors()]
    except Exception:  # noqa: BLE001 - a node optree cannot walk on its own: its keys
        steps = []
    if len(steps) != len(keys):
        return [_KeyStep(key, object, optree.PyTreeKind.CUSTOM) for key in keys]
    return steps


class _KeyStep(optree.PyTreeEntry):
    """A path entry known only by its key: rendered as ``format_path`` renders one."""

    __slots__ = ()

    def codify(self, /, node: str = "") -> str:
        """``node`` followed by this key's access."""
        return _containers.render(node, self.entry)


def format_path(path: tuple[Any, ...] | None, root: str = "tree") -> str:
    """A bare key path (no treespec at hand) through [`render`][tonumpy._tree.render]: by keys.

    Each key reads as the walker would read it alone: ``tree['a'][0]``. Where a treespec is at
    hand, [`place`][tonumpy._tree.place] names the same node as the tree spells it (a
    namedtuple's field as ``.y``); messages use it.

    Examples:
        >>> format_path(("hidden", 2))
        "tree['hidden'][2]"
        >>> format_path(())
        'tree'
    """
    if path is None:
        return root
    return render(tuple(_KeyStep(key, object, optree.PyTreeKind.CUSTOM) for key in path), root)


def leaf_path(spec: PyTreeSpec, index: int, root: str = "tree") -> tuple[tuple[Any, ...], str]:
    """The key path of leaf ``index`` of ``spec`` and its rendering (``tree['a'].field[0]``)."""
    accessor = spec.accessors()[index]
    return tuple(accessor.path), accessor.codify(root)


def leaf_paths(spec: PyTreeSpec, root: str = "tree") -> list[tuple[tuple[Any, ...], str]]:
    """[`leaf_path`][tonumpy._tree.leaf_path] of every leaf of ``spec``, in leaf order."""
    return [(tuple(a.path), a.codify(root)) for a in spec.accessors()]


def place(spec: PyTreeSpec, path: tuple[Any, ...] | None, root: str = "tree") -> str:
    """How a user reads the node at key path ``path`` of ``spec``'s tree: ``tree['o'].logits``.

    The one rendering of places in a tree: fields read as attributes, namedtuple entries by
    their names, mapping items and sequence items by subscript (optree's accessors). A node
    with no leaf under it (an empty container) is rendered from its keys alone.
    """
    if path is None:
        return root
    for accessor in spec.accessors():
        if tuple(accessor.path[: len(path)]) == path:
            return render(tuple(accessor)[: len(path)], root)
    return format_path(path, root)


class Node(NamedTuple):
    """One node of a tree, as [`outline`][tonumpy._tree.outline] lists them.

    ``keys`` are a container's keys (dict keys, field and attribute names, indices) in the
    order the container holds them (a dict's insertion order, not optree's sorted one), or
    ``None`` for a leaf; ``type`` the container's type (``NoneType`` for ``None``, which has
    no leaf); ``first`` and ``size`` the range of its leaves in the flat list.
    """

    path: tuple[Any, ...]
    keys: tuple[Any, ...] | None
    type: type | None
    first: int
    size: int


_DICTS = (dict, OrderedDict, defaultdict)  # optree sorts their keys; insertion order is kept


def outline(spec: PyTreeSpec) -> list[Node]:
    """Every node of ``spec``'s tree, containers and leaves, parents first, in stored order.

    For what walks a tree's containers rather than its leaves alone (the structure a file
    stores, the rows ``tonumpy show`` prints): one pass, O(nodes), over what
    [`flatten`][tonumpy._tree.flatten] made of the tree. A container's children come in the
    order the container holds them; each node's leaves are one range of the flat list.

    Examples:
        >>> leaves, spec = flatten({"b": [1, 2], "a": None})
        >>> for node in outline(spec):
        ...     print(node.path, node.keys, node.first, node.size)
        () ('b', 'a') 0 2
        ('b',) (0, 1) 0 2
        ('b', 0) None 0 1
        ('b', 1) None 1 1
        ('a',) () 0 0
    """
    nodes: list[Node] = []
    stack: list[tuple[PyTreeSpec, tuple[Any, ...], int]] = [(spec, (), 0)]
    while stack:
        node, path, first = stack.pop()
        if node.is_leaf():
            nodes.append(Node(path, None, None, first, 1))
            continue
        entries = node.entries()
        keys = entries
        if node.type in _DICTS:  # optree sorted the keys: take the order the dict had
            one_level = node.one_level()
            assert one_level is not None  # noqa: S101 - a container has one
            keys = list(one_level.unflatten([0] * node.num_children))
        nodes.append(Node(path, tuple(keys), node.type, first, node.num_leaves))
        if node.num_nodes == node.num_children + 1 == node.num_leaves + 1:
            # every child is a leaf (the common case at the bottom of a tree): no child spec
            index = {entry: first + i for i, entry in enumerate(entries)}
            nodes.extend(Node((*path, key), None, None, index[key], 1) for key in keys)
            continue
        by_entry = {}
        offset = first
        for entry, child in zip(entries, node.children(), strict=True):
            by_entry[entry] = (child, offset)
            offset += child.num_leaves
        for key in reversed(keys):
            child, start = by_entry[key]
            stack.append((child, (*path, key), start))
    return nodes


def _path_to(
    tree: Any, target: Any, is_leaf: Callable[[Any], Any] | None, none_is_leaf: bool
) -> tuple[tuple[Any, ...] | None, str]:
    """The key path of the node ``target`` (found by identity) in ``tree``, and its rendering.

    ``(None, "tree")`` when ``target`` is not found.
    """
    stack: list[tuple[Any, tuple[Any, ...], tuple[optree.PyTreeEntry, ...]]] = [(tree, (), ())]
    seen: set[int] = set()
    while stack:
        node, path, steps = stack.pop()
        if node is target:
            return path, render(steps)
        if id(node) in seen:
            continue
        seen.add(id(node))
        try:
            if is_leaf is not None and is_leaf(node):
                continue
            children, _, entries, _ = optree.tree_flatten_one_level(
                node, none_is_leaf=none_is_leaf, namespace=NAMESPACE
            )
        except Exception:  # noqa: BLE001, S112 - a leaf, or a node that cannot be walked
            continue
        stack.extend(
            (child, (*path, entry), (*steps, step))
            for child, entry, step in reversed(
                list(zip(children, entries, _steps(node, entries, none_is_leaf), strict=True))
            )
        )
    return None, "tree"


def _answer_error(
    tree: Any, bad: _BadAnswerError, is_leaf: Callable[[Any], Any] | None, none_is_leaf: bool
) -> TypeError:
    def keeps(node: Any) -> bool:
        return is_leaf is not None and bool(is_leaf(node))

    _, at = _path_to(tree, bad.node, keeps, none_is_leaf)
    return TypeError(
        f"is_leaf must return True or False, but it returned {bad.answer!r} "
        f"({type(bad.answer).__name__}) for {at} ({type(bad.node).__name__}); "
        "return a bool (wrap the expression in bool(...) if its truthiness is what you mean)"
    )


def _node_error(
    tree: Any, bad: NodeError, check: Callable[[Any], bool] | None, none_is_leaf: bool
) -> UnsupportedLeafError:
    path, at = _path_to(tree, bad.node, check, none_is_leaf)
    name = type(bad.node).__name__
    return UnsupportedLeafError(
        f"cannot convert {at} ({name}): {bad.reason}; pass "
        f"is_leaf=lambda x: isinstance(x, {name}) to keep it as it is, or leave it out (for a "
        "model's cache: use_cache=False)",
        path=path,
    )


def _recursion_error(
    tree: Any, is_leaf: Callable[[Any], bool] | None, none_is_leaf: bool
) -> ConversionError:
    """Find where a tree that optree could not walk cycles or gets too deep; name that path."""
    limit = optree.MAX_RECURSION_DEPTH
    stack: list[tuple[Any, tuple[Any, ...], tuple[optree.PyTreeEntry, ...], frozenset[int]]]
    stack = [(tree, (), (), frozenset())]
    while stack:
        node, path, steps, ancestors = stack.pop()
        if id(node) in ancestors:
            return ConversionError(
                f"the tree contains a cycle: {render(steps)} is the same object as one of "
                "its own ancestors; break the cycle (or pass that node as a leaf with is_leaf=)",
                path=path,
            )
        if len(path) >= limit:
            return ConversionError(
                f"the tree is deeper than {limit} levels at {render(steps[:8])}... "
                f"(depth {len(path)}); flatten it first or pass deep parts as leaves with is_leaf=",
                path=path,
            )
        if is_leaf is not None and is_leaf(node):
            continue
        try:
            children, _, entries, _ = optree.tree_flatten_one_level(
                node, is_leaf, none_is_leaf=none_is_leaf, namespace=NAMESPACE
            )
        except ValueError:  # a leaf
            continue
        inner = ancestors | {id(node)}
        stack.extend(
            (child, (*path, entry), (*steps, step), inner)
            for child, entry, step in reversed(
                list(zip(children, entries, _steps(node, entries, none_is_leaf), strict=True))
            )
        )
    return ConversionError(  # pragma: no cover - optree's limit and ours disagree
        f"the tree could not be walked: Python's recursion limit ({sys.getrecursionlimit()}) "
        "was hit while flattening it",
        path=None,
    )


# ------------------------------------------------------------------------------ differences


#: A tree's structure as plain, picklable data: ``None`` for a leaf, else ``(type name, entries,
#: children)``; what ranks exchange when their structures differ (``gather``).
Sketch = tuple[str, tuple[Any, ...], tuple[Any, ...]] | None


def sketch(spec: PyTreeSpec) -> Sketch:
    """``spec``'s structure as a [`Sketch`][tonumpy._tree.Sketch] (keys as they compare).

    Examples:
        >>> sketch(flatten({"a": [1, 2]})[1])
        ('dict', ('a',), (('list', (0, 1), (None, None)),))
    """
    if spec.is_leaf():
        return None
    name = spec.type.__name__ if spec.type is not None else "node"
    return name, tuple(spec.entries()), tuple(sketch(child) for child in spec.children())


def _node_text(node: Sketch) -> str:
    if node is None:
        return "a leaf"
    name, entries, _ = node
    if name == "NoneType":
        return "None"
    if entries == tuple(range(len(entries))):
        return f"a {name} of {len(entries)} items"
    return f"a {name} with keys {list(entries)!r}"


def first_difference(
    a: Sketch, b: Sketch, path: tuple[Any, ...] = ()
) -> tuple[tuple[Any, ...], str, str]:
    """The first place where ``a`` and ``b`` differ: ``(path, what a has, what b has)``.

    Only called on structures known to differ; the search goes depth first, in leaf order.
    """
    if a is None or b is None or a[0] != b[0]:
        return path, _node_text(a), _node_text(b)
    (_, entries_a, children_a), (_, entries_b, children_b) = a, b
    sequence = entries_a == tuple(range(len(entries_a)))
    if entries_a != entries_b and sequence:
        return path, _node_text(a), _node_text(b)
    if entries_a != entries_b:
        for entry in entries_a:
            if entry not in entries_b:
                return (*path, entry), "a value", "nothing (the key is missing)"
        for entry in entries_b:
            if entry not in entries_a:
                return (*path, entry), "nothing (no such key)", "a value"
        return path, _node_text(a), f"the same keys in another order: {list(entries_b)!r}"
    for entry, child_a, child_b in zip(entries_a, children_a, children_b, strict=True):
        if child_a != child_b:
            return first_difference(child_a, child_b, (*path, entry))
    # same types and keys all the way down: the containers' settings differ (a maxlen, a
    # defaultdict's factory, a class of the same name from another module...)
    return path, f"{_node_text(a)} with other settings", f"another {_node_text(b)}"


def require_same(
    first: PyTreeSpec,
    other: PyTreeSpec,
    first_name: str,
    other_name: str,
    *,
    hint: str,
    root: str = "tree",
) -> None:
    """Raise unless ``other`` has ``first``'s structure: trees that are joined or mapped together.

    Batches, captured calls, ``apply``'s rests; the error is
    [`structure_error`][tonumpy._tree.structure_error]'s.
    """
    if not same_structure(first, other):
        raise structure_error(first, other, first_name, other_name, hint=hint, root=root)


def structure_error(
    first: PyTreeSpec,
    other: PyTreeSpec,
    first_name: str,
    other_name: str,
    *,
    hint: str,
    root: str = "tree",
) -> ConversionError:
    """The error for ``other`` not having ``first``'s structure; ``.path`` is where they part.

    The one reporter of structure differences: ``concat``, ``Accumulator``, ``apply``,
    ``Activations.concat`` and ``gather`` all name the first differing path this way.
    ``hint`` ends the message: what the caller needs and how to get there; ``root`` names
    the trees in the path (``tree['a']``).
    """
    return difference_error(
        sketch(first), sketch(other), first_name, other_name, hint=hint, spec=first, root=root
    )


def difference_error(
    first: Sketch,
    other: Sketch,
    first_name: str,
    other_name: str,
    *,
    hint: str,
    spec: PyTreeSpec | None = None,
    root: str = "tree",
) -> ConversionError:
    """[`structure_error`][tonumpy._tree.structure_error], from sketches.

    ``spec``, the structure of a tree that has the place, renders its path.
    """
    path, has_a, has_b = first_difference(first, other)
    at = place(spec, path, root) if spec is not None else format_path(path, root)
    return ConversionError(
        f"{other_name} does not have the structure of {first_name}: at {at}, "
        f"{first_name} has {has_a} but {other_name} has {has_b}; {hint}",
        path=path,
    )
