"""Names of the array leaves of a tree: safe file names, and exact tensor names.

A file name (a ``.npz`` member, a ``.npy`` file of a directory) is the leaf's key path joined by
dots, reduced to ``A-Z a-z 0-9 . _ -``, never hidden, never ``.``/``..``, never a Windows device
name, at most ``MAX_NAME`` bytes (a hash of the full path ends a name that was cut), and unique
even on case-insensitive file systems (``~2``, ``~3``, ... suffixes). A tensor name (in a
``.safetensors`` file, which allows any UTF-8 name) is the key path joined by dots, unchanged:
a state dict's keys are its tensors' names. The structure maps every name back to its real key
path, so readers never need to parse a name.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

__all__ = ["MAX_NAME", "ROOT", "STRUCTURE", "dotted", "is_safe_name", "tensor_name", "unique_names"]

#: Name of the member (``.npz``) or file (``.json`` in a directory) that holds the structure.
STRUCTURE = "__tonumpy__"
#: The name of an array that is the whole tree (it has no key path).
ROOT = "root"
#: Bytes of a sanitised leaf name before ``.npy`` (file systems allow 255).
MAX_NAME = 120
_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._~-]*")


def _key_text(key: Any) -> str:
    return key if isinstance(key, str) else repr(key)


def dotted(path: tuple[Any, ...]) -> str:
    """The display name of a key path: keys joined by dots (``output.hidden_states.0``).

    Examples:
        >>> dotted(("output", "hidden_states", 0))
        'output.hidden_states.0'
    """
    return ".".join(_key_text(k) for k in path)


def tensor_name(path: tuple[Any, ...]) -> str:
    """The name of the tensor at ``path`` in a ``.safetensors`` file: its keys joined by dots.

    Keys are kept as they are (a ``str`` key unchanged, any other key as its ``repr``): the
    keys of a flat dict are its tensors' names, nested keys read as torch and Hugging Face
    name weights. The array that is the whole tree is named ``root``.

    Examples:
        >>> tensor_name(("_orig_mod.layer.weight",)), tensor_name(("dense/kernel:0",))
        ('_orig_mod.layer.weight', 'dense/kernel:0')
        >>> tensor_name(("model", "layers", 0, "weight")), tensor_name(())
        ('model.layers.0.weight', 'root')
    """
    return dotted(path) if path else ROOT


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
    """Whether ``name`` is one [`unique_names`][tonumpy._format._names.unique_names] could make.

    Such a name is one plain file inside the directory: no separator, no ``..``, not hidden.

    Examples:
        >>> is_safe_name("out.logits"), is_safe_name("../etc"), is_safe_name(".hidden")
        (True, False, False)
    """
    return bool(_SAFE_NAME.fullmatch(name)) and ".." not in name and len(name) <= MAX_NAME + 8


def unique_names(paths: list[tuple[Any, ...]]) -> list[str]:
    """The file name (without ``.npy``) of the array at each key path, in order.

    Keys joined by dots, sanitised (see docs/cli.md, "Names in each format"), unique even
    on case-insensitive file systems (``~2`` suffixes), never the structure's own name.

    Examples:
        >>> unique_names([("out", "logits"), ("../etc",), ("A",), ("a",), ()])
        ['out.logits', 'etc', 'A', 'a~2', 'root']
    """
    used = {STRUCTURE.casefold()}
    out = []
    for path in paths:
        base = _sanitise(dotted(path)) if path else ROOT
        name, n = base, 1
        while name.casefold() in used:
            n += 1
            name = f"{base}~{n}"
        used.add(name.casefold())
        out.append(name)
    return out
