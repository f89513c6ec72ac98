"""The tree walker: optree's C++ flatten/unflatten in tonumpy's own registry namespace.

optree already knows dict, OrderedDict, defaultdict, list, tuple, namedtuple, deque and
``torch.return_types`` (PyStructSequence). This module teaches it, lazily and only inside the
``"tonumpy"`` namespace, the containers users hand us without registering anything:

* dataclasses (frozen, ``slots=True`` and ``init=False`` fields included);
* dict subclasses (HF ``ModelOutput`` is an OrderedDict subclass *and* a dataclass);
* ``collections.UserDict`` subclasses (HF ``BatchEncoding``).

Registration happens the first time such a type shows up as a leaf: the leaves' types are
checked after each flatten, and the tree is flattened again if a new node type was registered.
Rebuilding never runs the user's ``__init__``/``__post_init__``: a new instance is made with
``__new__`` and its state set directly, so validation, conversion or side effects in those
methods cannot undo ours, and frozen classes work the same way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import keyword
import operator
import sys
from collections import OrderedDict, UserDict, defaultdict, deque
from collections.abc import Callable, Iterable
from typing import Any

import optree
from optree import PyTreeSpec

from .errors import ConversionError

NAMESPACE = "tonumpy"

# Types already classified: either registered by us as nodes, or known to be leaves.
_seen_types: set[type] = set()


class _NodeMeta:
    """Metadata of a node: compared by (type, keys); also carries what rebuilding needs.

    ``template`` is the original object, used only to copy state that is not converted (extra
    attributes, a defaultdict's factory). It takes no part in equality, so two batches with the
    same structure have equal treespecs.
    """

    __slots__ = ("cls", "keys", "n_items", "template")

    def __init__(self, cls: type, keys: tuple[Any, ...], n_items: int, template: Any) -> None:
        self.cls = cls
        self.keys = keys
        self.n_items = n_items
        self.template = template

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, _NodeMeta)
            and self.cls is other.cls
            and self.keys == other.keys
            and self.n_items == other.n_items
        )

    def __hash__(self) -> int:
        return hash((self.cls, self.keys, self.n_items))

    def __repr__(self) -> str:
        return f"{self.cls.__name__}{list(self.keys)!r}"


def _slot_names(cls: type[Any]) -> tuple[str, ...]:
    """Every slot declared along ``cls``'s MRO (``__dict__``/``__weakref__`` excluded)."""
    names: list[str] = []
    for klass in cls.__mro__:
        slots = klass.__dict__.get("__slots__", ())
        for name in (slots,) if isinstance(slots, str) else slots:
            if name not in ("__dict__", "__weakref__") and name not in names:
                names.append(name)
    return tuple(names)


def _copy_state(
    new: Any, template: Any, skip: Iterable[str], slots: tuple[str, ...] | None = None
) -> None:
    """Copy the attributes of ``template`` that are not in ``skip`` onto ``new`` (unconverted)."""
    skipped = set(skip)
    state = getattr(template, "__dict__", None)
    if state:
        for name, value in state.items():
            if name not in skipped:
                object.__setattr__(new, name, value)
    for name in _slot_names(type(template)) if slots is None else slots:
        if name not in skipped:
            with contextlib.suppress(AttributeError):  # an unset slot stays unset
                object.__setattr__(new, name, object.__getattribute__(template, name))


def _blank(cls: Any) -> Any:
    """A new, empty instance of ``cls``: ``__new__`` only, no ``__init__``/``__post_init__``."""
    return cls.__new__(cls)


def _field_names(cls: type[Any]) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


_MISSING = object()


def _dict_setitem(cls: type[Any]) -> Callable[[Any, Any, Any], None]:
    """The base ``__setitem__`` that stores an item without running a subclass's override."""
    return OrderedDict.__setitem__ if issubclass(cls, OrderedDict) else dict.__setitem__


def _is_data_descriptor(cls: type[Any], name: str) -> bool:
    """Whether ``name`` on ``cls`` is a descriptor with ``__set__`` (a property, a slot, ...)."""
    return hasattr(type(inspect.getattr_static(cls, name, None)), "__set__")


def _inherits_object(cls: type[Any], method: str) -> bool:
    """Whether ``cls`` keeps ``object``'s ``method`` (no class along its MRO overrides it)."""
    return inspect.getattr_static(cls, method, None) is getattr(object, method)


def _compile_builder(cls: type[Any], names: tuple[str, ...]) -> Callable[[Any], Any]:
    """A function that makes a blank ``cls`` and stores its children as the fields ``names``.

    Only for classes whose fields all live in the instance ``__dict__`` (no slot, no descriptor).
    Compiled once per class, as ``dataclasses`` does for ``__init__``: one unpacking
    assignment is several times faster than a ``setattr`` loop or a ``__dict__.update``.
    Attributes are stored directly when the class keeps ``object.__setattr__`` (and the names
    are identifiers); otherwise (frozen classes) the items go into the instance ``__dict__``.
    The generated source holds no user text but the names, as identifiers or ``repr`` literals.
    """
    attrs = _inherits_object(cls, "__setattr__") and all(
        n.isidentifier() and not keyword.iskeyword(n) for n in names
    )
    lines = ["def build(children):", "    new = cls.__new__(cls)"]
    if attrs:
        targets = "".join(f"new.{n}, " for n in names)
    else:
        lines.append('    state = get_dict(new, "__dict__")')
        targets = "".join(f"state[{n!r}], " for n in names)
    lines += [f"    {targets or '()'} = children", "    return new"]
    namespace: dict[str, Any] = {"cls": cls, "get_dict": object.__getattribute__}
    exec("\n".join(lines), namespace)  # noqa: S102 - the names only, see above
    build: Callable[[Any], Any] = namespace["build"]
    return build


def _register_dataclass(cls: type[Any]) -> None:
    """Dataclasses: the children are the fields, in order; other state is kept unconverted.

    A plain instance holds its fields and nothing else (every field set, no other attribute or
    slot). Its metadata is one ``_NodeMeta`` shared by the whole class, without a template, so
    no object is built per node and optree's metadata comparison is an identity hit. Any other
    instance gets its own ``_NodeMeta`` with the instance as template (equal to the shared one
    when the same fields are set), and rebuilding copies the extra state from it.
    """
    names = _field_names(cls)
    field_set = frozenset(names)
    slots = _slot_names(cls)
    extra_slots = tuple(n for n in slots if n not in field_set)
    has_dict = "__dict__" in dir(cls)
    dict_fields = field_set.difference(slots)  # the fields an instance keeps in its __dict__
    # Every field is stored in the instance __dict__ under its own name (no slot, no property).
    in_dict = has_dict and not any(_is_data_descriptor(cls, n) for n in names)
    set_field = setattr if _inherits_object(cls, "__setattr__") else object.__setattr__
    build = _compile_builder(cls, names) if in_dict else None
    common = _NodeMeta(cls, names, 0, None)
    getter = operator.attrgetter(*names) if names else None
    get_dict = object.__getattribute__

    def flatten_any(obj: Any) -> tuple[Any, _NodeMeta, tuple[str, ...]]:
        try:  # usually every field is set
            if getter is None:
                children: Any = ()
            elif len(names) > 1:
                children = getter(obj)
            else:
                children = (getter(obj),)
        except AttributeError:  # init=False fields that were never assigned
            present = tuple(n for n in names if getattr(obj, n, _MISSING) is not _MISSING)
            return [getattr(obj, n) for n in present], _NodeMeta(cls, present, 0, obj), present
        if not extra_slots and (not has_dict or get_dict(obj, "__dict__").keys() == dict_fields):
            return children, common, names
        return children, _NodeMeta(cls, names, 0, obj), names

    flatten = flatten_any
    if in_dict and not extra_slots and len(names) > 1 and _inherits_object(cls, "__getattribute__"):
        item_getter = operator.itemgetter(*names)

        def flatten_plain(obj: Any) -> tuple[Any, _NodeMeta, tuple[str, ...]]:
            state = obj.__dict__
            if len(state) == len(names):  # then no KeyError means: the fields and nothing else
                try:
                    return item_getter(state), common, names
                except KeyError:
                    pass
            return flatten_any(obj)

        flatten = flatten_plain

    def unflatten(meta: Any, children: Iterable[Any]) -> Any:
        if meta is common and build is not None:
            return build(children)
        new = _blank(cls)
        template = meta.template  # None in the shared metadata (or a copy of it)
        if template is not None:
            if has_dict:
                state = get_dict(template, "__dict__")
                if state.keys() - field_set:  # extra, non-field attributes are kept as they are
                    state = {k: v for k, v in state.items() if k not in field_set}
                    get_dict(new, "__dict__").update(state)
            if extra_slots:
                _copy_state(new, template, field_set, extra_slots)
        for name, value in zip(meta.keys, children, strict=True):
            set_field(new, name, value)
        return new

    optree.register_pytree_node(
        cls, flatten, unflatten, path_entry_type=optree.GetAttrEntry, namespace=NAMESPACE
    )


def _register_dict_subclass(cls: type[Any]) -> None:
    """Dict subclasses, including mapping dataclasses such as HF ``ModelOutput``.

    Children are the items in insertion order, then (for a dataclass) the fields that are not
    keys: a ``ModelOutput`` keeps its ``None`` fields out of the mapping, as it had them.
    """
    names = _field_names(cls) if dataclasses.is_dataclass(cls) else ()
    setitem = _dict_setitem(cls)

    def flatten(obj: Any) -> tuple[list[Any], _NodeMeta, tuple[Any, ...]]:
        keys = tuple(dict.keys(obj))
        extra = tuple(
            n for n in names if n not in obj and getattr(obj, n, _MISSING) is not _MISSING
        )
        children = [dict.__getitem__(obj, k) for k in keys]
        children += [getattr(obj, n) for n in extra]
        return children, _NodeMeta(cls, keys + extra, len(keys), obj), keys + extra

    def unflatten(meta: Any, children: Iterable[Any]) -> Any:
        items = dict(zip(meta.keys, children, strict=True))  # the keys, then the extra fields
        new = _blank(cls)
        _copy_state(new, meta.template, names)
        if isinstance(meta.template, defaultdict):
            new.default_factory = meta.template.default_factory
        for key in meta.keys[: meta.n_items]:
            setitem(new, key, items[key])
        for name in names:  # fields that are keys get the converted item, like ModelOutput does
            if name in items:
                object.__setattr__(new, name, items[name])
        return new

    optree.register_pytree_node(
        cls, flatten, unflatten, path_entry_type=optree.MappingEntry, namespace=NAMESPACE
    )


def _register_userdict(cls: type[Any]) -> None:
    def flatten(obj: Any) -> tuple[list[Any], _NodeMeta, tuple[Any, ...]]:
        keys = tuple(obj.data)
        return [obj.data[k] for k in keys], _NodeMeta(cls, keys, len(keys), obj), keys

    def unflatten(meta: Any, children: Iterable[Any]) -> Any:
        new = _blank(cls)
        _copy_state(new, meta.template, ("data",))
        object.__setattr__(new, "data", dict(zip(meta.keys, children, strict=True)))
        return new

    optree.register_pytree_node(
        cls, flatten, unflatten, path_entry_type=optree.MappingEntry, namespace=NAMESPACE
    )


_BUILTIN_NODES = (dict, OrderedDict, defaultdict, list, tuple, deque)


def _classify(cls: type) -> bool:
    """Register ``cls`` as a node type if it is a container we rebuild; True if registered."""
    if cls in _BUILTIN_NODES:
        return False
    try:
        if issubclass(cls, dict):
            _register_dict_subclass(cls)
        elif dataclasses.is_dataclass(cls):
            _register_dataclass(cls)
        elif issubclass(cls, UserDict):
            _register_userdict(cls)
        else:
            return False
    except ValueError:  # already registered in our namespace (e.g. by another thread)
        return False
    return True


def flatten(
    tree: Any,
    /,
    *,
    is_leaf: Callable[[Any], bool] | None = None,
    none_is_leaf: bool = False,
) -> tuple[list[Any], PyTreeSpec]:
    """Flatten ``tree`` in the tonumpy namespace, registering unseen container types lazily.

    Raises:
        ConversionError: The tree contains a cycle or is deeper than optree can walk; the message
            names the path where that happens.
    """
    leaves, spec, _ = flatten_typed(tree, is_leaf=is_leaf, none_is_leaf=none_is_leaf)
    return leaves, spec


def flatten_typed(
    tree: Any,
    /,
    *,
    is_leaf: Callable[[Any], bool] | None = None,
    none_is_leaf: bool = False,
) -> tuple[list[Any], PyTreeSpec, set[type]]:
    """``flatten``, also returning the set of the leaves' types (computed anyway)."""
    while True:
        try:
            leaves, spec = optree.tree_flatten(
                tree, is_leaf, none_is_leaf=none_is_leaf, namespace=NAMESPACE
            )
        except RecursionError:
            raise _recursion_error(tree, is_leaf, none_is_leaf) from None
        kinds = set(map(type, leaves))
        new = kinds - _seen_types
        if not new:
            return leaves, spec, kinds
        registered = False
        for cls in new:
            registered |= _classify(cls)
            _seen_types.add(cls)
        if not registered:
            return leaves, spec, kinds


def unflatten(spec: PyTreeSpec, leaves: Iterable[Any]) -> Any:
    """Rebuild a tree of ``spec``'s structure from ``leaves``."""
    return optree.tree_unflatten(spec, leaves)


def format_path(path: tuple[Any, ...] | None, root: str = "tree") -> str:
    """Render a key path the way a user would index it: ``tree['a'][0]``.

    Examples:
        >>> format_path(("hidden", 2))
        "tree['hidden'][2]"
        >>> format_path(())
        'tree'
    """
    if path is None:
        return root
    return root + "".join(f"[{key!r}]" for key in path)


def leaf_path(spec: PyTreeSpec, index: int, root: str = "tree") -> tuple[tuple[Any, ...], str]:
    """The key path of leaf ``index`` of ``spec`` and its rendering (``tree['a'].field[0]``)."""
    accessor = spec.accessors()[index]
    return tuple(accessor.path), accessor.codify(root)


def _recursion_error(
    tree: Any, is_leaf: Callable[[Any], bool] | None, none_is_leaf: bool
) -> ConversionError:
    """Find where a tree that optree could not walk cycles or gets too deep; name that path."""
    limit = optree.MAX_RECURSION_DEPTH
    stack: list[tuple[Any, tuple[Any, ...], frozenset[int]]] = [(tree, (), frozenset())]
    while stack:
        node, path, ancestors = stack.pop()
        if id(node) in ancestors:
            return ConversionError(
                f"the tree contains a cycle: {format_path(path)} is the same object as one of "
                "its own ancestors; break the cycle (or pass that node as a leaf with is_leaf=)",
                path=path,
            )
        if len(path) >= limit:
            return ConversionError(
                f"the tree is deeper than {limit} levels at {format_path(path[:8])}... "
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
            (child, (*path, entry), inner)
            for child, entry in reversed(list(zip(children, entries, strict=True)))
        )
    return ConversionError(  # pragma: no cover - optree's limit and ours disagree
        f"the tree could not be walked: Python's recursion limit ({sys.getrecursionlimit()}) "
        "was hit while flattening it",
        path=None,
    )
