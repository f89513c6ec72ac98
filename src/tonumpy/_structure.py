"""A tree's structure as JSON: containers, keys and their order, plain values, class names.

Writers store every array leaf under a file name made from its key path and the rest of the
tree as JSON (``plan``); readers rebuild the tree from that JSON (``decode_tree``),
checking every part of it: a tampered structure is a [`FileFormatError`][], never a crash.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import math
import re
from collections import UserDict, deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import _arrays, _dtypes, _tree
from ._fs import FileFormatError, one_line, short
from .errors import ConversionError

__all__ = [
    "STRUCTURE",
    "Plan",
    "decode",
    "decode_tree",
    "dotted",
    "is_safe_name",
    "leaves",
    "meta_error",
    "parse_structure",
    "plan",
]

#: Name of the member (``.npz``) or file (``.json`` in a directory) that holds the structure.
STRUCTURE = "__tonumpy__"
FORMAT_VERSION = 1
MAX_NAME = 120  # bytes of a sanitised leaf name before ".npy"; file systems allow 255
_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._~-]*")


def leaves(tree: Any) -> Iterator[Any]:
    """The leaves of a tree as readers build it (containers are dicts, lists and tuples)."""
    stack = [tree]
    while stack:
        x = stack.pop()
        if isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, list | tuple):
            stack.extend(x)
        else:
            yield x


def meta_error(file: Path, path: tuple[Any, ...], leaf: torch.Tensor) -> FileFormatError:
    """The error for a meta tensor read from ``file``: it has no values to convert."""
    return FileFormatError(
        f"{file}: {_tree.format_path(path)} is a meta tensor: the file holds its shape "
        f"{tuple(leaf.shape)} and dtype but no values (it was saved from a model on the 'meta' "
        "device, before its weights were loaded); there is nothing to convert: save the model "
        "again after loading its weights",
        path=path,
    )


@dataclasses.dataclass
class Plan:
    """A tree ready to write: its structure as JSON, and its array leaves, named.

    Leaves are converted one at a time, as they are written (``array``, ``write``), so
    a writer holds one converted array at once (a widened bfloat16 copy, say), never all of
    them. Converting a leaf completes its node in the structure, which is therefore serialised
    last (``structure_bytes``).
    """

    structure: dict[str, Any]
    names: list[str]
    leaves: list[Any]
    paths: list[tuple[Any, ...]]
    nodes: list[dict[str, Any]]
    ml_dtypes: bool
    sources: dict[tuple[Any, ...], dict[str, Any]]
    #: The file the tree was read from (for errors about what it holds), if any.
    source_file: Path | None = None
    #: Called with each leaf before its data is used (checks a file's checksums).
    verify: Callable[[Any], None] | None = None

    @property
    def nbytes(self) -> int:
        """The bytes of the array leaves as they are in the tree (for progress)."""
        return sum(_arrays.nbytes(leaf) for leaf in self.leaves)

    def where(self, index: int) -> str:
        """The key path of leaf ``index``, for messages."""
        return _tree.format_path(self.paths[index])

    def leaf(self, index: int) -> Any:
        """Leaf ``index``, checked before its data is used: no meta tensor, checksums match."""
        leaf = self.leaves[index]
        if self.source_file is not None and isinstance(leaf, torch.Tensor) and leaf.is_meta:
            raise meta_error(self.source_file, self.paths[index], leaf)
        if self.verify is not None:
            self.verify(leaf)
        return leaf

    def array(self, index: int) -> tuple[np.ndarray, str | None]:
        """Leaf ``index`` converted for storing, and the ml_dtypes name if it holds bits."""
        leaf, path = self.leaf(index), self.paths[index]
        converted = _arrays.leaf_array(leaf, self.where(index), path, ml_dtypes=self.ml_dtypes)
        if converted is None:  # pragma: no cover - only array leaves are listed
            raise AssertionError(path)
        array, dtype_name = converted
        self.complete(index, dtype_name, dtype_name or str(array.dtype))
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
            ):
                self.complete(index, bits, bits or str(leaf.dtype))
                _arrays.write_lazy(file, leaf)  # as stored: bits NumPy has no type for stay bits
                return
            leaf = _arrays.from_bits(leaf.array(), bits)  # bfloat16/float8: widened below
        if (
            not self.ml_dtypes
            and type(leaf) in (torch.Tensor, torch.nn.Parameter)
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
        """Record in leaf ``index``'s node how it is stored and what it was."""
        node, path = self.nodes[index], self.paths[index]
        if dtype_name is not None:
            node["dtype"] = dtype_name
        source = _source_of(self.leaves[index], stored, self.sources.get(path, {}))
        if source:
            node["from"] = source

    def structure_bytes(self) -> bytes:
        """The structure as UTF-8 JSON, the leaves' file names included."""
        data = dict(self.structure, arrays=self.names)
        return json.dumps(data, allow_nan=False, separators=(",", ":")).encode("utf-8")


def _key_text(key: Any) -> str:
    return key if isinstance(key, str) else repr(key)


def dotted(path: tuple[Any, ...]) -> str:
    """The display name of a key path: keys joined by dots (``output.hidden_states.0``).

    Examples:
        >>> dotted(("output", "hidden_states", 0))
        'output.hidden_states.0'
    """
    return ".".join(_key_text(k) for k in path)


_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
_DOTS = re.compile(r"\.{2,}")
_RESERVED = frozenset(
    ["con", "prn", "aux", "nul"] + [f"{p}{i}" for p in ("com", "lpt") for i in range(1, 10)]
)


def _sanitise(text: str) -> str:
    r"""A file name made of ``[A-Za-z0-9._-]`` only, never ``.``/``..``, hidden or too long.

    Examples:
        >>> _sanitise("../../etc/passwd"), _sanitise("/abs/path"), _sanitise("a\x00b")
        ('etc_passwd', 'abs_path', 'a_b')
    """
    name = _UNSAFE_CHARS.sub("_", text)
    name = _DOTS.sub(".", name).strip("._-") or "_"
    if name.split(".", 1)[0].lower() in _RESERVED:  # Windows device names
        name = "_" + name
    if len(name) > MAX_NAME:
        digest = hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:10]  # noqa: S324 - a name, not security
        name = f"{name[: MAX_NAME - 11]}~{digest}"
    return name


def is_safe_name(name: str) -> bool:
    """A name ``_unique_names`` could have made: one plain file inside the directory."""
    return bool(_SAFE_NAME.fullmatch(name)) and ".." not in name and len(name) <= MAX_NAME + 8


def _unique_names(paths: list[tuple[Any, ...]]) -> list[str]:
    """Sanitised names, unique even on case-insensitive file systems (``~2`` suffixes)."""
    used = {STRUCTURE.casefold()}
    out = []
    for path in paths:
        base = _sanitise(dotted(path)) if path else "root"
        name, n = base, 1
        while name.casefold() in used:
            n += 1
            name = f"{base}~{n}"
        used.add(name.casefold())
        out.append(name)
    return out


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


def _decode_value(data: Any) -> Any:
    if data is None or isinstance(data, bool | str | int | float):
        return data
    if isinstance(data, dict) and len(data) == 1:
        ((tag, inner),) = data.items()
        if tag == "float" and inner in ("nan", "inf", "-inf"):
            return float(inner)
        if tag == "bytes" and isinstance(inner, str):
            return base64.b64decode(inner, validate=True)
        if tag == "complex" and isinstance(inner, list) and len(inner) == 2:
            return complex(_decode_value(inner[0]), _decode_value(inner[1]))
        if tag == "tuple" and isinstance(inner, list):
            return tuple(_decode_value(v) for v in inner)
        if tag == "repr" and isinstance(inner, str):
            return inner
    raise FileFormatError(f"bad value in the structure: {short(data, 80)}")


def _class_name(cls: type) -> str:
    module = getattr(cls, "__module__", "") or ""
    qualname = getattr(cls, "__qualname__", cls.__name__)
    return qualname if module == "builtins" else f"{module}.{qualname}"


_MISSING = object()


def _children(x: Any) -> tuple[str, list[Any], list[Any], str | None] | None:
    """How a container is stored: (tag, keys, values, class name); None for a leaf.

    Mappings keep insertion order; namedtuples, ``torch.return_types``, dataclasses and
    ``UserDict``s become mappings of their fields. A dataclass that is also a dict (HF
    ``ModelOutput``) adds, after its items, the fields that are not keys.
    """
    cls = type(x)
    name = None if cls in (dict, list, tuple) else _class_name(cls)
    if isinstance(x, dict):
        keys = list(x.keys())
        values = [dict.__getitem__(x, k) for k in keys]
        if dataclasses.is_dataclass(cls):
            for field in dataclasses.fields(cls):
                value = getattr(x, field.name, _MISSING)
                if field.name not in x and value is not _MISSING:
                    keys.append(field.name)
                    values.append(value)
        return "dict", keys, values, name
    if isinstance(x, list | deque):
        return "list", [], list(x), name
    if isinstance(x, tuple):
        fields = getattr(cls, "_fields", None) or getattr(cls, "__match_args__", None)
        if isinstance(fields, tuple) and len(fields) == len(x):
            return "dict", list(fields), list(x), name
        if cls is tuple:
            return "tuple", [], list(x), None
        return None  # torch.Size and other tuple subclasses: stored as values
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        present = [f.name for f in dataclasses.fields(x) if hasattr(x, f.name)]
        return "dict", present, [getattr(x, n) for n in present], name
    if isinstance(x, UserDict):
        keys = list(x.data.keys())
        return "dict", keys, [x.data[k] for k in keys], name
    return None


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


def plan(
    tree: Any,
    /,
    *,
    ml_dtypes: bool,
    classes: dict[tuple[Any, ...], str] | None = None,
    sources: dict[tuple[Any, ...], dict[str, Any]] | None = None,
) -> Plan:
    """Walk ``tree``: its JSON structure, and its array leaves, named (converted later).

    ``classes`` and ``sources`` are those a reader recorded ([`tonumpy.io.Contents`][]).
    """
    classes = classes or {}
    leaves: list[Any] = []
    nodes: list[dict[str, Any]] = []
    paths: list[tuple[Any, ...]] = []
    memo: dict[int, int] = {}  # id(leaf) -> array index: a tensor stored twice is stored once
    active: set[int] = set()

    def leaf_node(leaf: Any, path: tuple[Any, ...]) -> Any:
        if id(leaf) in memo:
            return {"t": "array", "i": memo[id(leaf)]}
        if not _arrays.is_array(leaf):
            return _encode_leaf(leaf, _tree.format_path(path), path)
        if isinstance(leaf, np.ndarray) and leaf.dtype.hasobject:
            raise ConversionError(
                f"cannot store {_tree.format_path(path)}: an object array needs pickle; convert "
                "it to a numeric or string array first",
                path=path,
            )
        memo[id(leaf)] = len(leaves)
        node: dict[str, Any] = {"t": "array", "i": len(leaves)}
        leaves.append(leaf)
        nodes.append(node)
        paths.append(path)
        return node

    def walk(x: Any, path: tuple[Any, ...]) -> Any:
        if x is None:
            return None
        parts = _children(x)
        if parts is None:
            return leaf_node(x, path)
        if id(x) in active:
            raise ConversionError(
                f"the tree contains a cycle: {_tree.format_path(path)} is the same object as "
                "one of its own ancestors; break the cycle before saving",
                path=path,
            )
        tag, keys, values, name = parts
        active.add(id(x))
        try:
            if tag == "dict":
                children = [walk(v, (*path, k)) for k, v in zip(keys, values, strict=True)]
                out: dict[str, Any] = {
                    "t": "dict",
                    "k": [_encode_key(k) for k in keys],
                    "v": children,
                }
            else:
                out = {"t": tag, "v": [walk(v, (*path, i)) for i, v in enumerate(values)]}
        finally:
            active.discard(id(x))
        name = classes.get(path, name)
        if name:
            out["c"] = name
        return out

    try:
        structure = walk(tree, ())
    except RecursionError:
        raise ConversionError(
            "the tree is nested too deeply to save; flatten it first", path=None
        ) from None
    return Plan(
        structure={"format": "tonumpy", "version": FORMAT_VERSION, "tree": structure},
        names=_unique_names(paths),
        leaves=leaves,
        paths=paths,
        nodes=nodes,
        ml_dtypes=ml_dtypes,
        sources=sources or {},
    )


def _encode_key(key: Any) -> Any:
    try:
        return _encode_value(key)
    except TypeError:
        return {"repr": repr(key)}


def _encode_leaf(leaf: Any, where: str, path: tuple[Any, ...]) -> Any:
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
            f"cannot store {where} ({type(leaf).__name__}) without pickle: only tensors, arrays, "
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


def decode(
    raw: bytes, where: str, get_array: Callable[[str, str | None], Any]
) -> tuple[Any, dict[tuple[Any, ...], str], dict[tuple[Any, ...], dict[str, Any]]]:
    """Rebuild a tree from its stored structure: (tree, classes, sources).

    ``get_array(name, dtype)`` gives the array stored under ``name`` (``dtype``: the
    ``ml_dtypes`` name when it holds bits). Every error names ``where`` (the file).
    """
    try:
        data = parse_structure(raw)
        names = data.get("arrays")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise FileFormatError("the structure does not list its arrays")

        def by_index(index: int, dtype: str | None) -> Any:
            if not 0 <= index < len(names):
                raise FileFormatError("the structure names an array that is missing")
            return get_array(names[index], dtype)

        classes: dict[tuple[Any, ...], str] = {}
        sources: dict[tuple[Any, ...], dict[str, Any]] = {}
        tree = decode_tree(data.get("tree"), by_index, classes, sources)
    except FileFormatError as exc:
        if str(exc).startswith(where):  # an array's own error names its file already
            raise
        raise FileFormatError(f"{where}: {exc}") from None
    except RecursionError:
        raise FileFormatError(f"{where}: the structure is nested too deeply to read") from None
    return tree, classes, sources


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
            return _decode_value(node.get("v"))
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
            items = [walk(v, (*path, i)) for i, v in enumerate(values)]
            return items if tag == "list" else tuple(items)
        if tag == "dict":
            keys = node.get("k")
            if not isinstance(keys, list) or len(keys) != len(values):
                raise bad(path, "a mapping whose keys and values do not match")
            out: dict[Any, Any] = {}
            for key_data, value in zip(keys, values, strict=True):
                key = _decode_value(key_data)
                try:
                    out[key] = walk(value, (*path, key))
                except TypeError:  # an unhashable key
                    raise bad(path, "a key that cannot be a dict key") from None
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
