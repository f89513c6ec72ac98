"""A tree's structure as JSON: containers, keys and their order, plain values, class names.

Writers store every array leaf under a file name made from its key path and the rest of the
tree as JSON; readers rebuild the tree from that JSON
([`decode`][tonumpy._format._structure.decode]), checking every part of it: a tampered structure is
a [`FileFormatError`][tonumpy.FileFormatError], never a crash. The structure is walked with
tonumpy's one walker ([`tonumpy._tree.flatten`][] and [`tonumpy._tree.outline`][]), so a file holds
what [`tonumpy.to_numpy`][] walks: every container it knows (registered with optree in the
``"tonumpy"`` namespace included), stored as a ``dict`` (its keys: mapping keys, namedtuple and
``torch.return_types`` fields, dataclass fields and other attributes), a ``list`` (lists, deques,
``UserList``) or a ``tuple`` (tuples, transformers caches), with its class name.

What a writer outside ``io`` (``Accumulator(directory=)``) uses, the small public API of this
module:

* [`layout(tree, ml_dtypes=..., is_leaf=...)`][tonumpy._format._structure.layout] walks a tree
  once and returns a [`Layout`][tonumpy._format._structure.Layout]: what each leaf is stored as
  and its name in the file. ``Layout.names`` (the unique, safe file name of each array leaf,
  without ``.npy``), ``Layout.paths`` (their key paths), ``Layout.leaves``,
  ``Layout.flat`` (each array leaf's index in [`tonumpy._tree.flatten`][]'s list),
  ``Layout.complete(index, dtype_name, stored)`` (record how array ``index`` is stored: the
  ``ml_dtypes`` name when it holds bits, the stored dtype) and ``Layout.structure_bytes()`` (the
  JSON, once every array is complete).
* [`tonumpy._format._names.unique_names(paths)`][tonumpy._format._names.unique_names]: the file
  names alone.
* ``STRUCTURE`` (from [`tonumpy._format._names`][]): the structure file is ``STRUCTURE + ".json"``
  in a directory, the member ``STRUCTURE + ".npy"`` of a ``.npz``.

Names depend only on the key paths of the array leaves, in order: a writer that grows arrays
over batches lays out the first batch to name its files, and later the tree it holds (its
arrays, and a list of per-batch values where a leaf is a plain value) for the structure; the
names agree. Bits of bfloat16/float8 are stored as unsigned integers of their size
(``uint16``/``uint8``), with the ``ml_dtypes`` name in the node's ``"dtype"``; readers also
accept the signed integers older files hold.

Examples:
    >>> import json, torch
    >>> p = layout({"x": torch.ones(2), "step": 3, "h": [torch.zeros(1)]}, ml_dtypes=False)
    >>> p.names, p.paths
    (['x', 'h.0'], [('x',), ('h', 0)])
    >>> for i in range(len(p.names)):  # as each array is written
    ...     p.complete(i, None, "float32")
    >>> json.loads(p.structure_bytes())["tree"]["v"]
    [{'t': 'array', 'i': 0}, {'t': 'value', 'v': 3}, {'t': 'list', 'v': [{'t': 'array', 'i': 1}]}]
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import json
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from optree import PyTreeSpec

from .. import _dtypes, _tree
from ..errors import ConversionError, FileFormatError
from . import _arrays
from ._fs import one_line, short
from ._names import dotted, unique_names

__all__ = [
    "FORMAT_VERSION",
    "MAX_DEPTH",
    "Layout",
    "Node",
    "Walk",
    "decode",
    "decode_tree",
    "decode_value",
    "layout",
    "meta_error",
    "parse_structure",
    "walk",
]

#: The version of the JSON format written; readers read it and every older one.
FORMAT_VERSION = 1
#: Levels of containers a stored structure holds at most: its JSON nests two levels for each,
#: and Python's JSON codec and the reader recurse, within the interpreter's recursion limit.
MAX_DEPTH = 250


def meta_error(
    file: Path, path: tuple[Any, ...], place: str, leaf: torch.Tensor
) -> FileFormatError:
    """The error for a meta tensor read from ``file``, at ``place`` (the walker's rendering)."""
    return FileFormatError(
        f"{file}: {place} is a meta tensor: the file holds its shape "
        f"{tuple(leaf.shape)} and dtype but no values (it was saved from a model on the 'meta' "
        "device, before its weights were loaded); there is nothing to convert: save the model "
        "again after loading its weights",
        path=path,
    )


# ------------------------------------------------------------------------------ walking


class Node(NamedTuple):
    """One node of a tree as it is stored, as [`tonumpy.io.walk`][] lists them.

    ``path`` holds the stored keys from the root (field names for namedtuples); ``kind`` is
    ``"dict"``, ``"list"`` or ``"tuple"`` for a container, ``"none"`` for ``None`` and
    ``"leaf"`` for any other leaf; ``keys`` a container's stored keys (indices for a list or
    tuple), in the container's order; ``type`` a container's type; ``first`` and ``size`` the
    range of the node's leaves in the flat list.

    Examples:
        >>> from tonumpy.io import walk
        >>> leaves, nodes = walk({"x": [1, 2]})
        >>> nodes[1]
        Node(path=('x',), kind='list', keys=(0, 1), type=<class 'list'>, first=0, size=2)
    """

    path: tuple[Any, ...]
    kind: str
    keys: tuple[Any, ...]
    type: type | None
    first: int
    size: int


@dataclasses.dataclass
class Walk:
    """A tree walked once: its leaves, its treespec and every node, in stored order.

    ``leaves`` and ``spec`` are what [`tonumpy._tree.flatten`][] gives; ``nodes`` lists every
    node, parents first, as [`walk`][tonumpy._format._structure.walk] describes them.
    """

    leaves: list[Any]
    spec: PyTreeSpec
    nodes: list[Node]

    def place(self, index: int) -> str:
        """How a user reads leaf ``index`` of the flat list: ``tree['out'].logits``."""
        return self._places[index]

    @functools.cached_property
    def _places(self) -> list[str]:
        """Every leaf's place, rendered once (one call per leaf would be quadratic)."""
        return [place for _, place in _tree.leaf_paths(self.spec)]


def _container(cls: type, keys: tuple[Any, ...], kinds: dict[type, str]) -> tuple[str, Any]:
    """How a container of type ``cls`` with entries ``keys`` is stored: (kind, stored keys).

    The walker says what kind of container ``cls`` is ([`tonumpy._tree.container_kind`][]);
    this decides how that kind is stored. A stored key of ``None`` marks a child that is not
    stored (a BatchEncoding's encodings).
    """
    kind = kinds.get(cls)
    if kind is None:
        kind = kinds[cls] = _tree.container_kind(cls)
    if kind == "mapping":
        return "dict", keys
    if kind == "state":
        return "dict", tuple(None if isinstance(k, _tree.Attr) else k for k in keys)
    if kind == "fields":
        fields = _tree.field_names(cls)
        return "dict", fields if len(fields) == len(keys) else keys
    sequence = keys == tuple(range(len(keys)))  # no attributes beside the items
    if kind == "sequence":
        return ("list" if sequence else "dict"), keys
    if sequence and (keys or kind == "tuple"):  # a tuple subclass, a cache's layers, ...
        return "tuple", keys
    return "dict", keys  # a dataclass, a namespace, a user's node with named entries


def walk(tree: Any, /, *, is_leaf: Callable[[Any], bool] | None = None) -> Walk:
    """Every node of ``tree`` in stored order, parents first: one pass, O(nodes).

    Examples:
        >>> for node in walk({"b": (1, None), "a": [2]}).nodes:
        ...     print(node.path, node.kind, node.keys, node.first, node.size)
        () dict ('b', 'a') 0 2
        ('b',) tuple (0, 1) 1 1
        ('b', 0) leaf () 1 1
        ('b', 1) none () 2 0
        ('a',) list (0,) 0 1
        ('a', 0) leaf () 0 1

    Raises:
        ConversionError: The tree contains a cycle or is too deep (the message names where).
        UnsupportedLeafError: A leaf tonumpy cannot rebuild holds a tensor.
    """
    leaves, spec = _tree.flatten(tree, is_leaf=is_leaf)
    nodes: list[Node] = []
    frames: list[tuple[tuple[Any, ...], tuple[Any, ...], list[int]]] = []  # one per depth
    kinds: dict[type, str] = {}
    skipping = -1  # the depth of a child that is not stored, while its subtree goes by
    for node in _tree.outline(spec):
        depth = len(node.path)
        if depth:
            if 0 <= skipping < depth:
                continue
            skipping = -1
            del frames[depth:]
            parent_path, parent_keys, seen = frames[depth - 1]
            key = parent_keys[seen[0]]
            seen[0] += 1
            if key is None:
                skipping = depth
                continue
            path = (*parent_path, key)
        else:
            path = ()
        if node.keys is None:
            kind = "none" if leaves[node.first] is None else "leaf"
            keys: tuple[Any, ...] = ()
        elif node.type is None or node.type is type(None):
            kind, keys = "none", ()
        else:
            kind, stored = _container(node.type, node.keys, kinds)
            frames.append((path, stored, [0]))
            keys = tuple(k for k in stored if k is not None)
        nodes.append(Node(path, kind, keys, node.type, node.first, node.size))
    return Walk(leaves, spec, nodes)


# ------------------------------------------------------------------------------ writing


@dataclasses.dataclass
class Layout:
    """A tree ready to write: its structure as JSON, and its array leaves, named.

    Leaves are converted one at a time, as they are written (``array``, ``write``), so
    a writer holds one converted array at once (a widened bfloat16 copy, say), never all of
    them. Converting a leaf completes its node in the structure, which is therefore serialised
    last (``structure_bytes``).

    Attributes:
        structure: The JSON structure (``{"format", "version", "tree"}``).
        names: The file name of each array leaf (unique, safe, without ``.npy``); the
            structure lists them. A ``.safetensors`` writer puts the exact tensor names
            ([`tonumpy._format._names.tensor_name`][]) in their place before it writes.
        leaves: The array leaves, in stored order (the order of ``names``).
        paths: The key path of each array leaf (stored keys: field names for namedtuples).
        flat: The index of each array leaf in the list [`tonumpy._tree.flatten`][] gives.
        nodes: The JSON node of each array leaf (``complete`` adds to it).
        ml_dtypes: bfloat16/float8 tensors are stored as their bits, not widened.
        sources: Key path -> what a leaf was before a reader read it (kept in ``"from"``).
        source_file: The file the tree was read from (for errors about what it holds), if any.
        walked: The walk the plan was made from (it renders places for messages).
        verify: Called with each leaf before its data is used (checks a file's checksums).
    """

    structure: dict[str, Any]
    names: list[str]
    leaves: list[Any]
    paths: list[tuple[Any, ...]]
    flat: list[int]
    nodes: list[dict[str, Any]]
    ml_dtypes: bool
    sources: dict[tuple[Any, ...], dict[str, Any]]
    walked: Walk = dataclasses.field(repr=False)
    source_file: Path | None = None
    verify: Callable[[Any], None] | None = None

    @property
    def nbytes(self) -> int:
        """The bytes of the array leaves as they are in the tree (for progress)."""
        return sum(_arrays.nbytes(leaf) for leaf in self.leaves)

    def place(self, index: int) -> str:
        """How a user reads array leaf ``index`` in the tree (``tree['out'].logits``)."""
        return self.walked.place(self.flat[index])

    def leaf(self, index: int) -> Any:
        """Leaf ``index``, checked before its data is used: no meta tensor, checksums match."""
        leaf = self.leaves[index]
        if self.source_file is not None and isinstance(leaf, torch.Tensor) and leaf.is_meta:
            raise meta_error(self.source_file, self.paths[index], self.place(index), leaf)
        if self.verify is not None:
            self.verify(leaf)
        return leaf

    def array(self, index: int) -> tuple[np.ndarray, str | None]:
        """Leaf ``index`` converted for storing, and the ml_dtypes name if it holds bits."""
        leaf, path = self.leaf(index), self.paths[index]
        array, dtype_name = _arrays.leaf_array(
            leaf, lambda: self.place(index), path, ml_dtypes=self.ml_dtypes
        )
        self.complete(index, dtype_name, str(array.dtype))
        return array, dtype_name

    def write(self, index: int, file: Any) -> None:
        """Write leaf ``index`` to ``file`` in the ``.npy`` format, a chunk at a time.

        A member of a ``.npz`` is copied as it is read; a bfloat16/float8 tensor that is
        widened to float32 is widened as it is written: no copy of a whole leaf is made.
        """
        leaf = self.leaf(index)
        if isinstance(leaf, _arrays.LazyArray):
            bits = leaf.bits
            if (
                self.ml_dtypes
                or bits is None
                or getattr(torch, bits, None) not in _dtypes.ML_DTYPES
            ):  # as stored: bits NumPy has no type for stay bits (unsigned)
                self.complete(index, bits, str(_arrays.write_lazy(file, leaf)))
                return
            leaf = _arrays.from_bits(leaf.array(), bits)  # bfloat16/float8: widened below
        if (
            not self.ml_dtypes
            and type(leaf) in _dtypes.PLAIN
            and leaf.dtype in _dtypes.ML_DTYPES
            and leaf.layout == torch.strided
            and not leaf.is_meta
        ):
            self.complete(index, None, "float32")
            _arrays.write_widened(file, leaf)
            return
        array, _ = self.array(index)
        _arrays.write_array(file, array)

    def complete(self, index: int, dtype_name: str | None, stored: str) -> None:
        """Record in array ``index``'s node how it is stored and what it was.

        ``dtype_name`` is the ``ml_dtypes`` name (``"bfloat16"``) when the array holds the bits
        of such a type, stored as an unsigned integer of its size; ``stored`` the NumPy dtype
        the file holds. What the leaf was (a tensor's dtype and device, ``requires_grad``),
        where it differs, goes into the node's ``"from"``.
        """
        node, path = self.nodes[index], self.paths[index]
        if dtype_name is not None:
            node["dtype"] = dtype_name
        source = _source_of(self.leaves[index], dtype_name or stored, self.sources.get(path, {}))
        if source:
            node["from"] = source

    def structure_bytes(self) -> bytes:
        """The structure as UTF-8 JSON, the leaves' file names included."""
        data = dict(self.structure, arrays=self.names)
        return json.dumps(data, allow_nan=False, separators=(",", ":")).encode("utf-8")


def _source_of(leaf: Any, stored: str, known: dict[str, Any]) -> dict[str, Any]:
    """What a leaf was before it was stored, where that differs from how it is stored."""
    source = dict(known)
    if isinstance(leaf, _arrays.LazyArray) and leaf.bits:
        source.setdefault("dtype", leaf.bits)
    if isinstance(leaf, torch.Tensor):
        source.setdefault("dtype", str(leaf.dtype).removeprefix("torch."))
        source.setdefault("device", str(leaf.device))
        if leaf.requires_grad:
            source["requires_grad"] = True
    if source.get("dtype", stored) == stored:
        source.pop("dtype", None)
    if source.get("device") == "cpu":
        source.pop("device")
    return source


def _class_name(cls: type) -> str:
    module = getattr(cls, "__module__", "") or ""
    qualname = getattr(cls, "__qualname__", cls.__name__)
    return qualname if module == "builtins" else f"{module}.{qualname}"


def _too_deep(spec: PyTreeSpec) -> str:
    """Where ``spec``'s tree goes deeper than ``MAX_DEPTH``: its first 8 steps, rendered."""
    deep = next(node.path for node in _tree.outline(spec) if len(node.path) > MAX_DEPTH)
    return _tree.place(spec, deep[:8])


def layout(
    tree: Any,
    /,
    *,
    ml_dtypes: bool,
    is_leaf: Callable[[Any], bool] | None = None,
    classes: dict[tuple[Any, ...], str] | None = None,
    sources: dict[tuple[Any, ...], dict[str, Any]] | None = None,
    once: bool = True,
) -> Layout:
    """Walk ``tree`` once: its JSON structure, and its array leaves, named (converted later).

    A tensor (or array) at several places in the tree is stored once, every place naming it;
    with ``once=False``, once per place (a format that names every place and shares no data
    between names: ``.safetensors``). ``classes`` and ``sources`` are those a reader recorded
    ([`tonumpy.io.Contents`][]).

    Raises:
        ConversionError: A leaf cannot be stored without pickle (an object array, an
            arbitrary object), the tree has a cycle or is too deep; the message names where.
        UnsupportedLeafError: A leaf tonumpy cannot rebuild holds a tensor.
    """
    walked = walk(tree, is_leaf=is_leaf)
    leaves = walked.leaves
    names_of = classes or {}
    arrays: list[Any] = []
    nodes: list[dict[str, Any]] = []
    paths: list[tuple[Any, ...]] = []
    flat: list[int] = []
    memo: dict[int, dict[str, Any]] = {}  # id(leaf) -> its node: a tensor stored twice, once
    lists: list[list[Any]] = []  # the children of the open container at each depth
    root: Any = None
    for node in walked.nodes:
        depth = len(node.path)
        if depth > MAX_DEPTH:
            raise ConversionError(
                f"cannot store a tree deeper than {MAX_DEPTH} levels (a file's structure holds "
                f"no more): {_too_deep(walked.spec)}... goes deeper; "
                "flatten it first, "
                "or store its deep parts on their own",
                path=node.path,
            )
        out: Any
        if node.kind == "none":
            out = None
        elif node.kind == "leaf":
            leaf = leaves[node.first]
            known = memo.get(id(leaf)) if once else None
            if known is not None:
                out = known  # the same node: "dtype" and "from" hold for every place
            elif _arrays.is_array(leaf):
                if isinstance(leaf, np.ndarray) and leaf.dtype.hasobject:
                    raise ConversionError(
                        f"cannot store {walked.place(node.first)}: an object array needs "
                        "pickle; convert it to a numeric or string array first",
                        path=node.path,
                    )
                out = memo[id(leaf)] = {"t": "array", "i": len(arrays)}
                arrays.append(leaf)
                nodes.append(out)
                paths.append(node.path)
                flat.append(node.first)
            else:
                out = _encode_leaf(leaf, functools.partial(walked.place, node.first), node.path)
        else:
            children: list[Any] = []
            out = {"t": node.kind}
            if node.kind == "dict":
                out["k"] = [_encode_key(k) for k in node.keys]
            out["v"] = children
            name = names_of.get(node.path) if names_of else None
            if name is None and node.type not in (dict, list, tuple) and node.type is not None:
                name = _class_name(node.type)
            if name:
                out["c"] = name
        if depth:
            lists[depth - 1].append(out)
        else:
            root = out
        if node.kind in ("dict", "list", "tuple"):
            del lists[depth:]
            lists.append(out["v"])
    return Layout(
        structure={"format": "tonumpy", "version": FORMAT_VERSION, "tree": root},
        names=unique_names(paths),
        leaves=arrays,
        paths=paths,
        flat=flat,
        nodes=nodes,
        ml_dtypes=ml_dtypes,
        sources=sources or {},
        walked=walked,
    )


# ------------------------------------------------------------------------------ values


def _encode_value(value: Any) -> Any:
    """A plain Python value as JSON (tagged where JSON has no exact form); None if it has none."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else {"float": repr(float(value))}
    if isinstance(value, bytes | bytearray):
        return {"bytes": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, complex):
        return {"complex": [_encode_value(value.real), _encode_value(value.imag)]}
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return {"tuple": [_encode_value(v) for v in value]}
    if isinstance(value, torch.dtype | torch.device):
        return {"repr": str(value)}
    raise TypeError(type(value).__name__)


def decode_value(data: Any) -> Any:
    """A plain value (or a key) as the structure's JSON holds it, decoded."""
    if data is None or isinstance(data, bool | str | int | float):
        return data
    if isinstance(data, dict) and len(data) == 1:
        ((tag, inner),) = data.items()
        if tag == "float" and inner in ("nan", "inf", "-inf"):
            return float(inner)
        if tag == "bytes" and isinstance(inner, str):
            return base64.b64decode(inner, validate=True)
        if tag == "complex" and isinstance(inner, list) and len(inner) == 2:
            return complex(decode_value(inner[0]), decode_value(inner[1]))
        if tag == "tuple" and isinstance(inner, list):
            return tuple(decode_value(v) for v in inner)
        if tag == "repr" and isinstance(inner, str):
            return inner
    raise FileFormatError(f"bad value in the structure: {short(data, 80)}")


def _encode_key(key: Any) -> Any:
    try:
        return _encode_value(key)
    except TypeError:
        return {"repr": repr(key)}


def _encode_leaf(leaf: Any, place: Callable[[], str], path: tuple[Any, ...]) -> Any:
    if isinstance(leaf, set | frozenset):
        try:
            items = [_encode_value(v) for v in leaf]
        except TypeError:
            pass
        else:
            return {"t": "list", "v": [{"t": "value", "v": v} for v in items], "c": "set"}
    try:
        value = _encode_value(leaf)
    except TypeError:
        raise ConversionError(
            f"cannot store {place()} ({type(leaf).__name__}) without pickle: only tensors, arrays, "
            "containers and str/int/float/bool/None/bytes/complex values can be saved; convert "
            "it to one of those or drop it first",
            path=path,
        ) from None
    if isinstance(leaf, tuple):  # torch.Size and other plain tuple subclasses
        return {
            "t": "tuple",
            "v": [{"t": "value", "v": v} for v in value["tuple"]],
            "c": _class_name(type(leaf)),
        }
    return {"t": "value", "v": value}


# ------------------------------------------------------------------------------ reading


def decode(
    raw: bytes,
    source: str,
    get_array: Callable[[str, str | None], Any],
    members: Iterable[str],
    holder: str,
) -> tuple[Any, dict[tuple[Any, ...], str], dict[tuple[Any, ...], dict[str, Any]]]:
    """Rebuild a tree from its stored structure: (tree, classes, sources).

    ``get_array(name, dtype)`` gives the array stored under ``name`` (``dtype``: the
    ``ml_dtypes`` name when it holds bits). ``members`` names every array the file holds: each
    must have a place in the tree, or the file is refused (an array added to a file that
    tonumpy wrote would otherwise be hidden from ``show``, ``load`` and ``convert``). Every
    error names ``source`` (the file); ``holder`` is what holds the structure (``the member
    __tonumpy__``), for the message.
    """
    try:
        data = parse_structure(raw)
        names = data.get("arrays")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise FileFormatError("the structure does not list its arrays")
        placed: set[str] = set()

        def by_index(index: int, dtype: str | None) -> Any:
            if not 0 <= index < len(names):
                raise FileFormatError("the structure names an array that is missing")
            placed.add(names[index])
            return get_array(names[index], dtype)

        classes: dict[tuple[Any, ...], str] = {}
        sources: dict[tuple[Any, ...], dict[str, Any]] = {}
        tree = decode_tree(data.get("tree"), by_index, classes, sources)
        unlisted = sorted(set(members) - placed)
        if unlisted:
            raise _unlisted_error(unlisted, holder)
    except FileFormatError as exc:
        if str(exc).startswith(source):  # an array's own error names its file already
            raise
        raise FileFormatError(f"{source}: {exc}") from None
    except RecursionError:
        raise FileFormatError(f"{source}: the structure is nested too deeply to read") from None
    return tree, classes, sources


def _unlisted_error(unlisted: list[str], holder: str) -> FileFormatError:
    shown = ", ".join(short(name) for name in unlisted[:5])
    more = f" and {len(unlisted) - 5:,} more" if len(unlisted) > 5 else ""
    many = len(unlisted) > 1
    count = f"{len(unlisted):,} array{'s' if many else ''}"
    return FileFormatError(
        f"holds {count} that its tonumpy structure does not list ({shown}{more}): the file was "
        f"changed after tonumpy wrote it, and show, load and convert would not see "
        f"{'them' if many else 'it'}; refused. Remove {holder} to read every array, without "
        "the tree"
    )


def decode_tree(
    data: Any,
    get_array: Callable[[int, str | None], Any],
    classes: dict[tuple[Any, ...], str],
    sources: dict[tuple[Any, ...], dict[str, Any]],
) -> Any:
    """Rebuild a tree from its JSON structure; ``get_array(i, dtype)`` gives array ``i``."""

    def bad(path: tuple[Any, ...], what: str) -> FileFormatError:
        return FileFormatError(f"the structure is damaged at {dotted(path) or 'the root'}: {what}")

    def walk(node: Any, path: tuple[Any, ...]) -> Any:
        if node is None:
            return None
        if not isinstance(node, dict):
            raise bad(path, f"expected a node, got {type(node).__name__}")
        tag = node.get("t")
        if tag == "value":
            return decode_value(node.get("v"))
        if tag == "array":
            index, dtype = node.get("i"), node.get("dtype")
            if not isinstance(index, int) or isinstance(index, bool):
                raise bad(path, "an array without an index")
            if dtype is not None and not isinstance(dtype, str):
                raise bad(path, "an array with a bad dtype")
            source = node.get("from")
            if isinstance(source, dict):
                sources[path] = source
            return get_array(index, dtype)
        values = node.get("v")
        if not isinstance(values, list):
            raise bad(path, "a container without values")
        name = node.get("c")
        if isinstance(name, str):
            classes[path] = name
        if tag in ("list", "tuple"):
            items = []
            for i, value in enumerate(values):  # a loop, not a comprehension: one frame a level
                items.append(walk(value, (*path, i)))
            return items if tag == "list" else tuple(items)
        if tag == "dict":
            keys = node.get("k")
            if not isinstance(keys, list) or len(keys) != len(values):
                raise bad(path, "a mapping whose keys and values do not match")
            out: dict[Any, Any] = {}
            for key_data, value in zip(keys, values, strict=True):
                key = decode_value(key_data)
                try:
                    hash(key)
                except TypeError:  # a list in a tagged tuple, say
                    raise bad(path, "a key that cannot be a dict key") from None
                out[key] = walk(value, (*path, key))
            return out
        raise bad(path, f"unknown node type {str(tag)[:40]!r}")

    return walk(data, ())


def parse_structure(raw: bytes) -> dict[str, Any]:
    """The structure's JSON, checked to be a tonumpy structure this version reads."""
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise FileFormatError(f"the structure is not valid JSON: {one_line(exc)}") from None
    if not isinstance(data, dict) or data.get("format") != "tonumpy":
        raise FileFormatError("the structure is not a tonumpy structure")
    version = data.get("version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise FileFormatError(
            f"the structure has format version {version!r}; this tonumpy reads version "
            f"{FORMAT_VERSION} and older: upgrade tonumpy"
        )
    return data
