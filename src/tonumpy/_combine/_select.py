"""Key-path patterns, and the ``exclude=`` and ``reduce=`` options built on them.

A **key-path pattern** names a place in a tree, in the same forms everywhere an option is given
per leaf (``pad_value``'s mappings, ``reduce``, ``exclude``):

* a key path: the tuple of keys, indices and field names that ``optree.tree_paths`` gives
  (``("hidden_states", 2)``); it covers the node there and every leaf under it;
* a bare key: anything that is not a tuple stands for the 1-tuple, ``"labels"`` is
  ``("labels",)`` (a key at the top of the tree, not anywhere in it);
* ``()``: the whole tree.

A leaf is covered by a pattern when the pattern is its key path or a prefix of it; where several
patterns of a mapping cover a leaf, the longest wins ([`lookup`][tonumpy._combine._select.lookup]).

[`Selection`][tonumpy._combine._select.Selection] applies ``exclude=`` (the nodes the patterns name
are replaced by ``None``, as if the model had returned nothing there) and then ``reduce=`` (a
function runs on each tensor a pattern covers, on its device, before anything is converted) to each
batch, for ``concat``, ``Accumulator`` and ``gather``. It records what each pattern matched, and
warns ([`UnmatchedPatternWarning`][tonumpy.UnmatchedPatternWarning]) once, with the first tree,
about every pattern that matched nothing in it: every tree must share the first one's structure
(what ``exclude`` leaves of it), so a pattern that matches nothing there matches nothing later.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeAlias

import numpy as np
import optree
import torch
from optree import PyTreeSpec

from .. import _tree
from .._options import check_callable_signature
from ..errors import OptionError, UnmatchedPatternWarning

__all__ = [
    "Pattern",
    "Selection",
    "as_path",
    "check_exclude",
    "check_reduce",
    "lookup",
    "lookup_key",
]

#: A key-path pattern: a key path (a tuple), or a bare key standing for the 1-tuple.
Pattern: TypeAlias = Any

_TENSORS = (torch.Tensor, np.ndarray)


def as_path(pattern: Pattern) -> tuple[Any, ...]:
    """The key path a pattern stands for: a tuple as it is, a bare key as the 1-tuple.

    Examples:
        >>> as_path("labels"), as_path(("hidden", 2)), as_path(())
        (('labels',), ('hidden', 2), ())
    """
    return pattern if isinstance(pattern, tuple) else (pattern,)


def lookup(mapping: Mapping[Any, Any], path: tuple[Any, ...]) -> Any:
    """The value of the longest key of ``mapping`` that covers ``path`` (see the module), or None.

    Examples:
        >>> lookup({"labels": -100, (): 0}, ("labels",)), lookup({(): 0}, ("x", 1))
        (-100, 0)
        >>> lookup({("hidden",): 1.0}, ("logits",)) is None
        True
    """
    for end in range(len(path), -1, -1):
        prefix = path[:end]
        if prefix in mapping:
            return mapping[prefix]
        if end == 1 and path[0] in mapping and not isinstance(path[0], tuple):
            return mapping[path[0]]
    return None


def lookup_key(mapping: Mapping[Any, Any], path: tuple[Any, ...]) -> Any:
    """The key of ``mapping`` that [`lookup`][tonumpy._combine._select.lookup] takes the value of.

    ``_MISSING`` when none covers ``path``.
    """
    for end in range(len(path), -1, -1):
        prefix = path[:end]
        if prefix in mapping:
            return prefix
        if end == 1 and path[0] in mapping and not isinstance(path[0], tuple):
            return path[0]
    return _MISSING


_MISSING = object()


def _hashable(pattern: Any) -> bool:
    try:
        hash(pattern)
    except TypeError:
        return False
    return True


def check_exclude(exclude: Any, caller: str) -> frozenset[tuple[Any, ...]]:
    """``exclude=`` as a set of key paths; an [`OptionError`][] for anything else.

    ``exclude`` is one pattern (a str or a key-path tuple) or a list or set of patterns.

    Examples:
        >>> sorted(check_exclude(["cache", ("out", "past_key_values")], "Accumulator"))
        [('cache',), ('out', 'past_key_values')]
        >>> check_exclude([["cache"]], "Accumulator")
        Traceback (most recent call last):
        ...
        tonumpy.errors.OptionError: Accumulator(exclude=...): ['cache'] is not a key-path ...
    """
    if exclude is None:
        return frozenset()
    patterns: Iterable[Any]
    if isinstance(exclude, str | tuple):
        patterns = [exclude]
    elif isinstance(exclude, list | set | frozenset):
        patterns = exclude
    else:
        raise OptionError(
            f"{caller}(exclude={exclude!r}): exclude= takes a key-path pattern (a key such as "
            "'cache', or a key path tuple such as ('out', 'cache')) or a list of them"
        )
    paths = set()
    for pattern in patterns:
        if not _hashable(pattern):
            raise OptionError(
                f"{caller}(exclude=...): {pattern!r} is not a key-path pattern; pass a key "
                "('cache') or a key path tuple (('out', 'cache'))"
            )
        path = as_path(pattern)
        if path == ():
            raise OptionError(
                f"{caller}(exclude=...): the pattern () covers the whole tree, which would "
                "leave nothing; name the parts to leave out"
            )
        paths.add(path)
    return frozenset(paths)


def check_reduce(reduce: Any, caller: str) -> dict[Any, Callable[[Any], Any]]:
    """``reduce=`` as a mapping from pattern to function; an [`OptionError`][] for anything else.

    Examples:
        >>> check_reduce({"logits": len}, "Accumulator")
        {'logits': <built-in function len>}
        >>> check_reduce({"logits": 3}, "Accumulator")
        Traceback (most recent call last):
        ...
        tonumpy.errors.OptionError: Accumulator(reduce=...): the value for 'logits' is 3 (int); ...
    """
    if reduce is None:
        return {}
    if not isinstance(reduce, Mapping):
        raise OptionError(
            f"{caller}(reduce={reduce!r}): reduce= takes a mapping from key-path pattern to a "
            "function of one tensor, e.g. {'logits': lambda t: t.argmax(-1)}"
        )
    for pattern, fn in reduce.items():
        if not callable(fn):
            raise OptionError(
                f"{caller}(reduce=...): the value for {pattern!r} is {fn!r} "
                f"({type(fn).__name__}); each value must be a function of one tensor"
            )
        check_callable_signature(
            fn,
            (torch.empty(0),),
            f"{caller}(reduce=...): the function for {pattern!r} is called with one tensor",
        )
    return dict(reduce)


class _Resolved:
    """What a selection does to trees of one structure.

    The nodes to cut, the leaves to reduce, and what each pattern matched there (pattern as
    given -> key paths).
    """

    __slots__ = ("cuts", "matched", "reductions", "spec")

    def __init__(
        self,
        spec: PyTreeSpec,
        cuts: list[tuple[Any, ...]],
        reductions: list[tuple[int, Callable[[Any], Any]]],
        matched: dict[Any, list[tuple[Any, ...]]],
    ) -> None:
        self.spec = spec
        self.cuts = cuts
        self.reductions = reductions
        self.matched = matched


class Selection:
    """``exclude=`` and ``reduce=`` of one call, applied to each tree before it is converted.

    ``flatten`` replaces ``_tree.flatten_typed``: the tree's excluded nodes are replaced by
    ``None`` and its reduced leaves by what their function returns (run under
    ``torch.no_grad()``, on the tensor as it is, on its device), and the result is flattened.
    Without either option it is ``flatten_typed`` itself. What a structure needs is computed once
    and kept for the next tree of that structure (batches usually share one).
    """

    __slots__ = (
        "_exclude",
        "_last",
        "_lock",
        "_matched",
        "_patterns",
        "_reduce",
        "_reported",
        "caller",
        "first",
        "stacklevel",
    )

    def __init__(
        self, exclude: Any, reduce: Any, caller: str, *, first: str = "batch 0", stacklevel: int = 4
    ) -> None:
        self._exclude = check_exclude(exclude, caller)
        self._reduce = check_reduce(reduce, caller)
        self.caller = caller
        self.first = first  # how warnings name the first tree
        self.stacklevel = stacklevel  # of the warnings: the user's call
        self._last: tuple[_Resolved | None, _Resolved | None] = (None, None)  # (exclude, reduce)
        self._lock = threading.Lock()
        # the patterns as given (a bare key stays bare), for what they matched
        self._patterns = _given_patterns(exclude)
        self._matched: dict[str, dict[Any, dict[tuple[Any, ...], None]]] = {
            "exclude": {pattern: {} for pattern in self._patterns},
            "reduce": {pattern: {} for pattern in self._reduce},
        }
        self._reported = False

    @property
    def active(self) -> bool:
        """Whether anything is excluded or reduced."""
        return bool(self._exclude or self._reduce)

    def matched(self) -> dict[str, dict[Any, list[tuple[Any, ...]]]]:
        """What each pattern matched so far, by option, pattern as given.

        ``{"exclude": {pattern: [key path, ...]}, "reduce": {pattern: [key path, ...]}}``: an
        exclude pattern lists the node it names, a reduce pattern the leaves it reduces.
        """
        with self._lock:
            return {
                option: {pattern: list(paths) for pattern, paths in found.items()}
                for option, found in self._matched.items()
            }

    def flatten(
        self, tree: Any, /, *, is_leaf: Callable[[Any], bool] | None
    ) -> tuple[list[Any], PyTreeSpec, set[type]]:
        """Flatten ``tree`` with its excluded nodes cut and its reduced leaves reduced."""
        leaves, spec, leaf_types = _tree.flatten_typed(tree, is_leaf=is_leaf)
        if self._exclude:
            cuts = self._resolved(spec, 0).cuts
            if cuts:
                tree = _cut(tree, cuts, is_leaf)
                leaves, spec, leaf_types = _tree.flatten_typed(tree, is_leaf=is_leaf)
        if not self._reduce:
            if self._exclude and not self._reported:
                self._report(spec)
            return leaves, spec, leaf_types
        reductions = self._resolved(spec, 1).reductions
        if not self._reported:
            self._report(spec)
        if not reductions:
            return leaves, spec, leaf_types
        leaves = list(leaves)
        plain = True
        with torch.no_grad():
            for index, fn in reductions:
                leaf = leaves[index]
                if not isinstance(leaf, _TENSORS):
                    continue
                try:
                    out = fn(leaf)
                except Exception as exc:
                    if hasattr(exc, "add_note"):  # Python 3.11+
                        exc.add_note(
                            f"tonumpy.{self.caller}(reduce=...): raised by the function for "
                            f"{_tree.leaf_path(spec, index)[1]} ({_describe(leaf)})"
                        )
                    raise
                plain = plain and type(out) in (torch.Tensor, np.ndarray)
                leaves[index] = out
        if plain:
            return leaves, spec, set(map(type, leaves))
        # a function returned a container (t.topk(k) gives values and indices) or None
        return _tree.flatten_typed(_tree.unflatten(spec, leaves), is_leaf=is_leaf)

    def _resolved(self, spec: PyTreeSpec, which: int) -> _Resolved:
        last = self._last[which]
        if last is not None and last.spec == spec:
            return last
        if which == 0:
            resolved = _Resolved(
                spec, _cuts(spec, self._exclude), [], _exclude_matches(spec, self._patterns)
            )
        else:
            reductions, matched = _reductions(spec, self._reduce)
            resolved = _Resolved(spec, [], reductions, matched)
        with self._lock:  # replaced whole: other threads see the old pair or the new one
            pair = list(self._last)
            pair[which] = resolved
            self._last = (pair[0], pair[1])
            found = self._matched["exclude" if which == 0 else "reduce"]
            for pattern, paths in resolved.matched.items():
                found[pattern].update(dict.fromkeys(paths))
        return resolved

    def _report(self, spec: PyTreeSpec) -> None:
        """Warn, once, about the patterns that matched nothing in the first tree.

        ``spec`` is that tree's structure after ``exclude`` (what ``reduce`` sees).
        """
        with self._lock:
            if self._reported:
                return
            self._reported = True
            unmatched = {
                option: [pattern for pattern, paths in found.items() if not paths]
                for option, found in self._matched.items()
            }
        leaves = [place for _, place in _tree.leaf_paths(spec)]
        shown = ", ".join(leaves[:6]) + (
            f", ... ({len(leaves) - 6} more)" if len(leaves) > 6 else ""
        )
        for option, what in (("exclude", "node"), ("reduce", "leaf")):
            missing = unmatched[option]
            if not missing:
                continue
            names = ", ".join(map(repr, missing))
            several = len(missing) > 1
            warnings.warn(
                UnmatchedPatternWarning(
                    f"{self.caller}({option}=...): the pattern{'s' if several else ''} {names} "
                    f"match{'' if several else 'es'} no {what} of {self.first} (its leaves: "
                    f"{shown or 'none'}); {'they are' if several else 'it is'} ignored"
                ),
                stacklevel=self.stacklevel,
            )


def _describe(leaf: Any) -> str:
    shape = tuple(getattr(leaf, "shape", ()))
    device = getattr(leaf, "device", "cpu")
    return f"{type(leaf).__name__} {getattr(leaf, 'dtype', '')} {shape} on {device}"


def _cuts(spec: PyTreeSpec, exclude: frozenset[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """The paths of the nodes to cut: those ``exclude`` names that hold leaves, outermost only."""
    cuts: list[tuple[Any, ...]] = []
    for node in _tree.outline(spec):  # parents first
        inside = any(node.path[: len(cut)] == cut for cut in cuts)
        if node.size and node.path in exclude and not inside:
            cuts.append(node.path)
    return cuts


def _given_patterns(exclude: Any) -> list[Any]:
    """The patterns of a checked ``exclude=`` as the user gave them, without repeats."""
    if exclude is None:
        return []
    given = [exclude] if isinstance(exclude, str | tuple) else list(exclude)
    return list(dict.fromkeys(given))


def _exclude_matches(spec: PyTreeSpec, patterns: list[Any]) -> dict[Any, list[tuple[Any, ...]]]:
    """For each exclude pattern, the node of ``spec`` it names (a list of one path, or none)."""
    nodes = {node.path for node in _tree.outline(spec)}
    return {
        pattern: [as_path(pattern)] if as_path(pattern) in nodes else [] for pattern in patterns
    }


def _reductions(
    spec: PyTreeSpec, reduce: Mapping[Any, Callable[[Any], Any]]
) -> tuple[list[tuple[int, Callable[[Any], Any]]], dict[Any, list[tuple[Any, ...]]]]:
    """``(leaf index, function)`` for every leaf a pattern of ``reduce`` covers.

    Also the leaf paths each pattern takes (the longest pattern covering a leaf takes it).
    """
    found = []
    matched: dict[Any, list[tuple[Any, ...]]] = {pattern: [] for pattern in reduce}
    for index, raw in enumerate(spec.paths()):
        path = tuple(raw)
        key = lookup_key(reduce, path)
        if key is not _MISSING:
            found.append((index, reduce[key]))
            matched[key].append(path)
    return found, matched


def _cut(tree: Any, cuts: list[tuple[Any, ...]], is_leaf: Callable[[Any], bool] | None) -> Any:
    """``tree`` with the nodes at ``cuts`` replaced by None; only their ancestors are rebuilt."""
    trie: dict[Any, Any] = {}
    for path in cuts:
        node = trie
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = None  # None: cut here
    return _rebuild(tree, trie, is_leaf)


def _rebuild(node: Any, trie: dict[Any, Any], is_leaf: Callable[[Any], bool] | None) -> Any:
    children, meta, entries, unflatten = optree.tree_flatten_one_level(
        node, is_leaf, namespace=_tree.NAMESPACE
    )
    new: list[Any] = list(children)
    for position, entry in enumerate(entries):
        if entry in trie:
            below = trie[entry]
            new[position] = None if below is None else _rebuild(new[position], below, is_leaf)
    return unflatten(meta, new)
