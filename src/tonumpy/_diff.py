"""Where two tree structures first differ, in words a user can act on.

Used wherever trees that must share one structure meet: the batches of ``concat`` and
``Accumulator``, the trees ``apply`` maps over together.
"""

from __future__ import annotations

from typing import Any

from optree import PyTreeSpec

from ._tree import format_path
from .errors import ConversionError

__all__ = ["first_difference", "structure_error"]


def _node_text(spec: PyTreeSpec) -> str:
    if spec.is_leaf():
        return "a leaf"
    if spec.type is type(None):
        return "None"
    entries = list(spec.entries())
    name = spec.type.__name__ if spec.type is not None else "node"
    if spec.type in (list, tuple) or (isinstance(spec.type, type) and issubclass(spec.type, list)):
        return f"a {name} of {len(entries)} items"
    return f"a {name} with keys {entries!r}"


def first_difference(
    a: PyTreeSpec, b: PyTreeSpec, path: tuple[Any, ...] = ()
) -> tuple[tuple[Any, ...], str, str]:
    """The first place where ``a`` and ``b`` differ: ``(path, what a has, what b has)``.

    Only called on specs known to differ; the search goes depth first, in leaf order.
    """
    if a.is_leaf() or b.is_leaf() or a.type is not b.type:
        return path, _node_text(a), _node_text(b)
    entries_a, entries_b = list(a.entries()), list(b.entries())
    sequence = entries_a == list(range(len(entries_a)))
    if entries_a != entries_b and sequence:
        return path, _node_text(a), _node_text(b)
    if entries_a != entries_b:
        for entry in entries_a:
            if entry not in entries_b:
                return (*path, entry), "a value", "nothing (the key is missing)"
        for entry in entries_b:
            if entry not in entries_a:
                return (*path, entry), "nothing (no such key)", "a value"
        return path, _node_text(a), f"the same keys in another order: {entries_b!r}"
    for entry, child_a, child_b in zip(entries_a, a.children(), b.children(), strict=True):
        if child_a != child_b:
            return first_difference(child_a, child_b, (*path, entry))
    return path, f"{_node_text(a)} ({a.one_level()})", f"another {_node_text(b)} ({b.one_level()})"


def structure_error(
    first: PyTreeSpec, other: PyTreeSpec, first_name: str, other_name: str, *, hint: str
) -> ConversionError:
    """The error for ``other`` not having ``first``'s structure; ``.path`` is where they part.

    ``hint`` ends the message: what the caller needs and how to get there.
    """
    path, has_a, has_b = first_difference(first, other)
    return ConversionError(
        f"{other_name} does not have the structure of {first_name}: at {format_path(path)}, "
        f"{first_name} has {has_a} but {other_name} has {has_b}; {hint}",
        path=path,
    )
