"""How each container kind that optree does not know is flattened and rebuilt.

optree walks ``dict``, ``OrderedDict``, ``defaultdict``, ``list``, ``tuple``, namedtuples,
``deque`` and ``torch.return_types`` itself. ``tonumpy._tree`` registers the kinds below,
lazily and only in the ``"tonumpy"`` namespace, the first time an instance shows up as a leaf:

* dataclasses (frozen, ``slots=True`` and ``init=False`` fields included);
* dict subclasses (HF ``ModelOutput`` is an OrderedDict subclass *and* a dataclass);
* ``collections.UserDict`` and ``collections.UserList`` subclasses;
* list, tuple and deque subclasses;
* ``types.SimpleNamespace``, ``collections.ChainMap``, ``types.MappingProxyType``.

A node's children are its items (or fields), then every other attribute of the instance (its
``__dict__`` entries and set slots): tensors held there are converted too, and the tree's
structure records which attributes there are. The node's metadata, a ``NodeMeta``, holds
names and the container's own configuration (a defaultdict's factory, a deque's ``maxlen``),
never the instance or its values, so a treespec never keeps a batch alive. Values that
``functools.cached_property`` stored in ``__dict__`` are left out: they were computed from the
old data, and the rebuilt object computes them again, from the new data, when asked.

Rebuilding never runs the user's ``__new__``/``__init__``/``__post_init__``: a blank instance is
made with the base type's ``__new__`` (``cls.__new__`` for dataclasses and ``UserDict``) and its
state set directly, so validation, conversion or side effects in those methods cannot undo ours,
and frozen classes work the same way.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import keyword
import operator
import types
from collections import ChainMap, OrderedDict, UserDict, UserList, defaultdict, deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import optree

NAMESPACE = "tonumpy"

_get = object.__getattribute__
_MISSING = object()
# defaultdict's own ``default_factory`` slot, read and written without a subclass's override
_FACTORY: Any = defaultdict.__dict__["default_factory"]
_MAXLEN: Any = deque.__dict__["maxlen"]


class Attr(str):
    """A key-path entry that names an attribute: equal to the plain name, rendered ``.name``."""

    __slots__ = ()


class Method(str):
    """A key-path entry that names a method called without arguments, rendered ``.name()``."""

    __slots__ = ()


def render(node: str, key: Any) -> str:
    """``node`` followed by the access that ``key`` stands for: ``[k]``, ``.name`` or ``.name()``.

    Examples:
        >>> render("tree", "a"), render("tree", Attr("a")), render("tree", Attr("a b"))
        ("tree['a']", 'tree.a', "getattr(tree, 'a b')")
    """
    if isinstance(key, Attr | Method):
        name = str(key)
        if not name.isidentifier() or keyword.iskeyword(name):
            return f"getattr({node}, {name!r})" + ("()" if isinstance(key, Method) else "")
        return f"{node}.{name}()" if isinstance(key, Method) else f"{node}.{name}"
    return f"{node}[{key!r}]"


class Entry(optree.PyTreeEntry):
    """The path entry of every node kind registered here: items, attributes, method calls."""

    __slots__ = ()

    def __call__(self, obj: Any, /) -> Any:
        """The child this entry names in ``obj``."""
        key = self.entry
        if isinstance(key, Method):
            return getattr(obj, key)()
        if isinstance(key, Attr):
            return getattr(obj, key)
        return obj[key]

    def codify(self, /, node: str = "") -> str:
        """Python source that reads this child from ``node``."""
        return render(node, self.entry)


class NodeMeta:
    """Metadata of a node: its type, its keys and extra attribute names, its configuration.

    ``keys`` are the mapping keys or field names of the first children (an ``int``: the number
    of items, for sequences); ``attrs`` the names of the attributes that follow them; ``aux``
    the container's configuration (a defaultdict's factory, a deque's ``maxlen``). All three
    take part in equality, so two batches of one structure have equal treespecs.
    """

    __slots__ = ("attrs", "aux", "cls", "keys")

    def __init__(
        self, cls: type, keys: tuple[Any, ...] | int, attrs: tuple[Any, ...] = (), aux: Any = None
    ) -> None:
        self.cls = cls
        self.keys = keys
        self.attrs = attrs
        self.aux = aux

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, NodeMeta)
            and self.cls is other.cls
            and self.keys == other.keys
            and self.attrs == other.attrs
            and (self.aux is other.aux or bool(self.aux == other.aux))
        )

    def __hash__(self) -> int:
        return hash((self.cls, self.keys, self.attrs))

    def __repr__(self) -> str:
        keys = f"[{self.keys}]" if isinstance(self.keys, int) else repr(list(self.keys))
        attrs = "".join(f", .{a}" for a in self.attrs)
        return f"{self.cls.__name__}{keys}{attrs}"


class NodeError(Exception):
    """Raised by a flatten function that cannot walk ``node``; ``_tree`` adds the key path."""

    def __init__(self, node: Any, reason: str) -> None:
        super().__init__(reason)
        self.node = node
        self.reason = reason


# ------------------------------------------------------------------------------ class facts


def slot_names(cls: type[Any]) -> tuple[str, ...]:
    """Every slot declared along ``cls``'s MRO (``__dict__``/``__weakref__`` excluded)."""
    names: list[str] = []
    for klass in cls.__mro__:
        slots = klass.__dict__.get("__slots__", ())
        for name in (slots,) if isinstance(slots, str) else slots:
            if name not in ("__dict__", "__weakref__") and name not in names:
                names.append(name)
    return tuple(names)


def blank(cls: Any) -> Any:
    """A new, empty instance of ``cls``: its ``__new__`` only, no ``__init__``."""
    return cls.__new__(cls)


def has_instance_dict(cls: type[Any]) -> bool:
    """Whether instances of ``cls`` have a ``__dict__``."""
    return bool(getattr(cls, "__dictoffset__", 0))


def cached_names(cls: type[Any]) -> frozenset[str]:
    """The names of the ``functools.cached_property`` attributes along ``cls``'s MRO."""
    return frozenset(
        name
        for klass in cls.__mro__
        for name, value in vars(klass).items()
        if isinstance(value, functools.cached_property)
    )


class _Layout:
    """Where an instance of a class keeps state other than its items or fields."""

    __slots__ = ("has_dict", "skip", "slot_set", "slots")

    def __init__(self, cls: type[Any], skip: Iterable[str] = ()) -> None:
        skip = frozenset(skip) | cached_names(cls)
        self.has_dict = has_instance_dict(cls)
        self.slots = tuple(n for n in slot_names(cls) if n not in skip)
        self.slot_set = frozenset(self.slots)
        self.skip = skip

    def extras(self, obj: Any) -> tuple[tuple[Any, ...], list[Any]]:
        """The names and values of ``obj``'s other attributes (``__dict__``, then set slots)."""
        names: list[Any] = []
        values: list[Any] = []
        if self.has_dict:
            state = _get(obj, "__dict__")
            skip = self.skip
            for name, value in state.items():
                if name not in skip:
                    names.append(name)
                    values.append(value)
        for name in self.slots:
            try:
                value = _get(obj, name)
            except AttributeError:  # an unset slot stays unset
                continue
            names.append(name)
            values.append(value)
        return tuple(names), values

    def restore(self, new: Any, names: tuple[Any, ...], values: Sequence[Any]) -> None:
        """Set the attributes ``names`` of ``new`` (a blank instance) to ``values``."""
        state = None
        for name, value in zip(names, values, strict=True):
            if name in self.slot_set:
                object.__setattr__(new, name, value)
            else:
                if state is None:
                    state = _get(new, "__dict__")
                state[name] = value


def attr_entries(names: tuple[Any, ...]) -> tuple[Any, ...]:
    """The key-path entries of attributes: ``Attr`` for names that are strings."""
    return tuple(Attr(n) if isinstance(n, str) else n for n in names)


def register(
    cls: type[Any], flatten: Callable[[Any], Any], unflatten: Callable[[Any, Any], Any]
) -> None:
    """Register ``cls`` in tonumpy's namespace, with ``Entry`` key-path entries."""
    optree.register_pytree_node(cls, flatten, unflatten, path_entry_type=Entry, namespace=NAMESPACE)


# ------------------------------------------------------------------------------ dataclasses


def _field_names(cls: type[Any]) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


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
    namespace: dict[str, Any] = {"cls": cls, "get_dict": _get}
    exec("\n".join(lines), namespace)  # noqa: S102 - the names only, see above
    build: Callable[[Any], Any] = namespace["build"]
    return build


def register_dataclass(cls: type[Any]) -> None:
    """Dataclasses: the children are the fields, in order, then any other attribute.

    A plain instance holds its fields and nothing else (every field set, no other attribute or
    slot but cached properties). Its metadata is one ``NodeMeta`` shared by the whole
    class, so no object is built per node and optree's metadata comparison is an identity hit;
    rebuilding it is one compiled function call. Any other instance gets its own metadata
    naming the fields it has and its extra attributes (equal to the shared one when it has
    all the fields and nothing else).
    """
    names = _field_names(cls)
    entries = attr_entries(names)
    field_set = frozenset(names)
    layout = _Layout(cls, field_set)
    has_dict = layout.has_dict
    # Every field is stored in the instance __dict__ under its own name (no slot, no property).
    in_dict = has_dict and not any(_is_data_descriptor(cls, n) for n in names)
    set_field = setattr if _inherits_object(cls, "__setattr__") else object.__setattr__
    build = _compile_builder(cls, names) if in_dict else None
    common = NodeMeta(cls, names)
    getter = operator.attrgetter(*names) if names else None

    def flatten_any(obj: Any) -> tuple[Any, NodeMeta, tuple[Any, ...]]:
        present, keys = names, entries
        try:  # usually every field is set
            if getter is None:
                children: Any = []
            elif len(names) > 1:
                children = list(getter(obj))
            else:
                children = [getter(obj)]
        except AttributeError:  # init=False fields that were never assigned
            present = tuple(n for n in names if getattr(obj, n, _MISSING) is not _MISSING)
            keys = attr_entries(present)
            children = [getattr(obj, n) for n in present]
        extra, values = layout.extras(obj)
        if not extra and present is names:
            return children, common, entries
        meta = NodeMeta(cls, present, extra)
        return children + values, meta, keys + attr_entries(extra)

    flatten = flatten_any
    plain = in_dict and not layout.slots and len(names) > 1
    if plain and _inherits_object(cls, "__getattribute__"):
        item_getter = operator.itemgetter(*names)

        def flatten_plain(obj: Any) -> tuple[Any, NodeMeta, tuple[Any, ...]]:
            state = obj.__dict__
            if len(state) == len(names):  # then no KeyError means: the fields and nothing else
                try:
                    return item_getter(state), common, entries
                except KeyError:
                    pass
            return flatten_any(obj)

        flatten = flatten_plain

    def unflatten(meta: NodeMeta, children: tuple[Any, ...]) -> Any:
        if meta is common and build is not None:
            return build(children)
        new = blank(cls)
        fields = meta.keys
        assert isinstance(fields, tuple)  # noqa: S101 - dataclass keys are field names
        for name, value in zip(fields, children, strict=False):
            set_field(new, name, value)
        layout.restore(new, meta.attrs, children[len(fields) :])
        return new

    register(cls, flatten, unflatten)


# ------------------------------------------------------------------------------ mappings


def _dict_setitem(cls: type[Any]) -> Callable[[Any, Any, Any], None]:
    """The base ``__setitem__`` that stores an item without running a subclass's override."""
    return OrderedDict.__setitem__ if issubclass(cls, OrderedDict) else dict.__setitem__


def _dict_new(cls: type[Any]) -> Any:
    """A blank instance of the dict subclass ``cls`` (its own ``__new__`` if it takes no args)."""
    try:
        return blank(cls)
    except TypeError:  # a __new__ that wants arguments: the base one is enough for a dict
        return dict.__new__(cls)


def register_dict_subclass(cls: type[Any]) -> None:
    """Dict subclasses, including mapping dataclasses such as HF ``ModelOutput``.

    Children are the items in insertion order, then (for a dataclass) the fields that are not
    keys (a ``ModelOutput`` keeps its ``None`` fields out of the mapping, as it had them), then
    the other attributes. An instance whose ``__dict__`` is the mapping itself (the
    ``self.__dict__ = self`` idiom) is rebuilt the same way.
    """
    fields = _field_names(cls) if dataclasses.is_dataclass(cls) else ()
    layout = _Layout(cls, fields)
    setitem = _dict_setitem(cls)
    with_factory = issubclass(cls, defaultdict)
    contains = dict.__contains__

    def flatten(obj: Any) -> tuple[list[Any], NodeMeta, tuple[Any, ...]]:
        keys = tuple(dict.keys(obj))
        children = [dict.__getitem__(obj, k) for k in keys]
        self_dict = layout.has_dict and _get(obj, "__dict__") is obj
        names: tuple[Any, ...] = tuple(
            n for n in fields if not contains(obj, n) and getattr(obj, n, _MISSING) is not _MISSING
        )
        children += [getattr(obj, n) for n in names]
        if not self_dict:
            extra, values = layout.extras(obj)
            names += extra
            children += values
        aux = None
        if with_factory or self_dict:
            aux = (_FACTORY.__get__(obj) if with_factory else None, self_dict)
        return children, NodeMeta(cls, keys, names, aux), keys + attr_entries(names)

    def unflatten(meta: NodeMeta, children: tuple[Any, ...]) -> Any:
        keys = meta.keys
        assert isinstance(keys, tuple)  # noqa: S101 - mapping keys
        new = _dict_new(cls)
        factory, self_dict = meta.aux if meta.aux is not None else (None, False)
        if with_factory:
            _FACTORY.__set__(new, factory)
        for key, value in zip(keys, children, strict=False):
            setitem(new, key, value)
        if self_dict:
            object.__setattr__(new, "__dict__", new)
        layout.restore(new, meta.attrs, children[len(keys) :])
        for name in fields:  # fields that are keys get the converted item, like ModelOutput does
            if contains(new, name):
                object.__setattr__(new, name, dict.__getitem__(new, name))
        return new

    register(cls, flatten, unflatten)


def register_userdict(
    cls: type[Any],
    *,
    wrap: Callable[[Any, list[Any]], None] | None = None,
    unwrap: Callable[[Any, Any], None] | None = None,
    config: tuple[str, ...] = (),
) -> None:
    """``collections.UserDict`` subclasses: the items of ``.data``, then other attributes.

    ``config`` names attributes kept in the metadata (compared, never converted); ``wrap`` may
    replace extra attribute values by leaves of its own before the walk (it gets the names and
    the values list) and ``unwrap`` turns them back on the rebuilt instance: the hooks
    ``tonumpy.integrations._transformers`` uses for ``BatchEncoding``'s per-row state.
    """
    layout = _Layout(cls, ("data", *config))

    def flatten(obj: Any) -> tuple[list[Any], NodeMeta, tuple[Any, ...]]:
        data = obj.data
        keys = tuple(data)
        extra, values = layout.extras(obj)
        if wrap is not None:
            wrap(extra, values)
        state = _get(obj, "__dict__") if config else {}
        aux = tuple(state.get(n, _MISSING) for n in config) if config else None
        meta = NodeMeta(cls, keys, extra, aux)
        return [data[k] for k in keys] + values, meta, keys + attr_entries(extra)

    def unflatten(meta: NodeMeta, children: tuple[Any, ...]) -> Any:
        keys = meta.keys
        assert isinstance(keys, tuple)  # noqa: S101 - mapping keys
        new = blank(cls)
        state = _get(new, "__dict__")
        state["data"] = dict(zip(keys, children, strict=False))
        for name, value in zip(config, meta.aux or (), strict=False):
            if value is not _MISSING:
                state[name] = value
        layout.restore(new, meta.attrs, children[len(keys) :])
        if unwrap is not None:
            unwrap(new, meta)
        return new

    register(cls, flatten, unflatten)


def register_chainmap(cls: type[Any]) -> None:
    """``collections.ChainMap`` (and subclasses): the list ``.maps``, then attributes."""
    layout = _Layout(cls, ("maps",))

    def flatten(obj: Any) -> tuple[list[Any], NodeMeta, tuple[Any, ...]]:
        extra, values = layout.extras(obj)
        meta = NodeMeta(cls, ("maps",), extra)
        return [list(obj.maps), *values], meta, (Attr("maps"), *attr_entries(extra))

    def unflatten(meta: NodeMeta, children: tuple[Any, ...]) -> Any:
        new = blank(cls)
        _get(new, "__dict__")["maps"] = children[0]
        layout.restore(new, meta.attrs, children[1:])
        return new

    register(cls, flatten, unflatten)


def register_mappingproxy(cls: type[Any]) -> None:
    """``types.MappingProxyType``: a new read-only view of a new mapping.

    A view of a ``dict`` or ``OrderedDict`` is walked item by item (its keys are the path);
    a view of any other mapping has one child, that mapping's ``copy()``.
    """

    def flatten(obj: Any) -> tuple[list[Any], NodeMeta, tuple[Any, ...]]:
        base = obj.copy()
        base_type = type(base)
        if base_type is dict or base_type is OrderedDict:
            keys = tuple(base)
            return [base[k] for k in keys], NodeMeta(cls, keys, (), base_type), keys
        return [base], NodeMeta(cls, (), ()), (Method("copy"),)

    def unflatten(meta: NodeMeta, children: tuple[Any, ...]) -> Any:
        keys = meta.keys
        assert isinstance(keys, tuple)  # noqa: S101 - mapping keys
        if meta.aux is None:
            return types.MappingProxyType(children[0])
        return types.MappingProxyType(meta.aux(zip(keys, children, strict=True)))

    register(cls, flatten, unflatten)


# ------------------------------------------------------------------------------ sequences


def register_sequence(cls: type[Any]) -> None:
    """Subclasses of list, tuple and deque, and ``collections.UserList`` (and subclasses).

    Children are the items, then the other attributes; a deque keeps its ``maxlen``.
    """
    if issubclass(cls, UserList):
        base: type[Any] = UserList
    else:
        base = next(b for b in (list, tuple, deque) if issubclass(cls, b))
    layout = _Layout(cls, ("data",) if base is UserList else ())
    items: Callable[[Any], Iterable[Any]] = (
        operator.attrgetter("data") if base is UserList else base.__iter__
    )

    def flatten(obj: Any) -> tuple[list[Any], NodeMeta, tuple[Any, ...]]:
        children = list(items(obj))
        n = len(children)
        extra, values = layout.extras(obj)
        aux = _MAXLEN.__get__(obj) if base is deque else None
        meta = NodeMeta(cls, n, extra, aux)
        return children + values, meta, (*range(n), *attr_entries(extra))

    def unflatten(meta: NodeMeta, children: tuple[Any, ...]) -> Any:
        n = meta.keys
        assert isinstance(n, int)  # noqa: S101 - sequences count their items
        if base is tuple:
            new = tuple.__new__(cls, children[:n])
        elif base is list:
            new = list.__new__(cls)
            list.extend(new, children[:n])
        elif base is deque:
            new = deque.__new__(cls)
            deque.__init__(new, children[:n], meta.aux)
        else:
            new = blank(cls)
            _get(new, "__dict__")["data"] = list(children[:n])
        layout.restore(new, meta.attrs, children[n:])
        return new

    register(cls, flatten, unflatten)


def register_namespace(cls: type[Any]) -> None:
    """``types.SimpleNamespace`` (and subclasses): every attribute is a child."""
    layout = _Layout(cls)

    def flatten(obj: Any) -> tuple[list[Any], NodeMeta, tuple[Any, ...]]:
        names, values = layout.extras(obj)
        return values, NodeMeta(cls, (), names), attr_entries(names)

    def unflatten(meta: NodeMeta, children: tuple[Any, ...]) -> Any:
        new = types.SimpleNamespace.__new__(cls)
        layout.restore(new, meta.attrs, children)
        return new

    register(cls, flatten, unflatten)


def registrar(cls: type[Any]) -> Callable[[type[Any]], None] | None:
    """The function that registers ``cls``'s kind of container, or None if it is none of them.

    Called for types optree does not walk itself (namedtuples and the builtins are excluded
    by the caller).
    """
    if issubclass(cls, dict):
        return register_dict_subclass
    if dataclasses.is_dataclass(cls):
        return register_dataclass
    if issubclass(cls, UserDict):
        return register_userdict
    if issubclass(cls, UserList | list | tuple | deque):
        return register_sequence
    if issubclass(cls, types.SimpleNamespace):
        return register_namespace
    if issubclass(cls, ChainMap):
        return register_chainmap
    if cls is types.MappingProxyType:
        return register_mappingproxy
    return None
