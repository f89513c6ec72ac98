"""Which modules a pattern names: globs over dotted module names, and regular expressions.

The names are those ``module.named_modules()`` gives: segments joined by dots
(``"bert.encoder.layer.10.attention"``), the root module being ``""``. A glob pattern is matched
segment by segment:

* ``*`` matches any run of characters within one segment, ``?`` one character, ``[0-9]`` (and
  ``[!0-9]``) one character of a set, never a dot;
* a segment that is exactly ``**`` matches zero or more whole segments (``**.attention``: every
  module named ``attention`` at any depth; ``encoder.**``: ``encoder`` and everything under it;
  ``**`` alone: every module, the root included);
* the empty pattern ``""`` matches the root module only.

For anything else a compiled regular expression (``re.compile(...)``) is matched against the
whole name (``fullmatch``). Glob patterns are translated to regular expressions once (cached).
"""

from __future__ import annotations

import functools
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeAlias

from ..errors import CaptureError, UnmatchedPatternWarning

__all__ = ["ModulePattern", "choose", "matcher", "patterns"]

#: What ``include=`` and ``exclude=`` take, one or several: a glob over dotted module names, or a
#: compiled regular expression matched against the whole name.
ModulePattern: TypeAlias = "str | re.Pattern[str]"

_SEGMENTS = r"(?:\.[^.]*)*"  # zero or more segments, each after a dot
_LEADING = r"(?:[^.]*\.)*"  # zero or more segments, each before a dot
_REGEX_LOOK = re.compile(r"\\[dswDSW.]|[+(){}|^$]")  # a str written as a regular expression


class _BadGlobError(Exception):
    """A malformed glob; ``patterns`` turns it into a CaptureError naming the option."""


def patterns(value: object, option: str) -> tuple[ModulePattern, ...]:
    """``value`` (one pattern or an iterable of them) as a tuple of checked patterns."""
    items: tuple[object, ...]
    if isinstance(value, (str, re.Pattern)):
        items = (value,)
    elif isinstance(value, Iterable) and not isinstance(value, (bytes, bytearray)):
        items = tuple(value)
    else:
        items = (value,)
    checked: list[ModulePattern] = []
    for item in items:
        if isinstance(item, re.Pattern) and isinstance(item.pattern, str):
            checked.append(item)
            continue
        if not isinstance(item, str):
            raise CaptureError(
                f"{option}= takes glob patterns (str) or compiled regular expressions "
                f"(re.compile(...) of a str) over module names, got {item!r}"
            )
        try:
            _glob(item)
        except _BadGlobError as exc:
            raise CaptureError(f"{option}={item!r}: {exc}") from None
        checked.append(item)
    return tuple(checked)


def matcher(pattern: ModulePattern) -> Callable[[str], bool]:
    """Whether a module name matches ``pattern`` (checked by [`patterns`][] first)."""
    regex = pattern if isinstance(pattern, re.Pattern) else _glob(pattern)
    return lambda name: regex.fullmatch(name) is not None


@functools.lru_cache(maxsize=256)
def _glob(pattern: str) -> re.Pattern[str]:
    """The regular expression of glob ``pattern`` (see the module docstring)."""
    if pattern == "":
        return re.compile("")
    parts: list[str] = []
    for segment in pattern.split("."):
        if segment == "**" and parts and parts[-1] == "**":
            continue  # "**.**" is "**"
        if segment != "**" and "**" in segment:
            raise _BadGlobError(
                "'**' stands for whole segments only ('encoder.**', '**.attention'); within "
                "one segment '*' already matches any run of characters"
            )
        if segment == "":
            raise _BadGlobError(
                "an empty segment (a leading, trailing or doubled dot); module names are "
                "segments joined by single dots, and the root module is ''"
            )
        parts.append(segment)
    if parts == ["**"]:
        return re.compile(r"(?s:.*)")
    regex, dot = "", False
    for index, segment in enumerate(parts):
        if segment == "**":  # whole segments, each with its dot
            regex += _SEGMENTS if index else _LEADING
            dot = index != 0
        else:
            regex += (r"\." if dot else "") + "(?=[^.])" + _segment(segment)
            dot = True
    try:
        return re.compile(regex)
    except re.error as exc:  # e.g. a reversed range "[9-0]"
        raise _BadGlobError(f"not a valid glob pattern ({exc})") from None


def _segment(segment: str) -> str:
    """The regular expression of one glob segment (``*``, ``?``, ``[...]``; never a dot)."""
    out: list[str] = []
    i, n = 0, len(segment)
    while i < n:
        char = segment[i]
        i += 1
        if char == "*":
            out.append("[^.]*")
        elif char == "?":
            out.append("[^.]")
        elif char == "[":
            end = i + (i < n and segment[i] == "!")
            end += end < n and segment[end] == "]"  # a "]" first in the set is a member
            end = segment.find("]", end)
            if end < 0:
                out.append(re.escape(char))
                continue
            members = segment[i:end].replace("\\", "\\\\")
            members = re.sub(r"([&~|\[])", r"\\\1", members)
            if members.startswith("!"):
                members = "^" + members[1:]
            elif members.startswith("^"):
                members = "\\" + members
            out.append(rf"(?!\.)[{members}]")
            i = end + 1
        else:
            out.append(re.escape(char))
    return "".join(out)


def choose(
    names: Sequence[str],
    include: tuple[ModulePattern, ...],
    exclude: tuple[ModulePattern, ...],
    *,
    owner: str,
    stacklevel: int = 2,
) -> list[str]:
    """The ``names`` that match a pattern of ``include`` and none of ``exclude``, in order.

    Raises:
        CaptureError: None is left; the message lists the names and suggests patterns.
    """
    wanted = [matcher(p) for p in include]
    unwanted = [matcher(p) for p in exclude]
    included = [name for name in names if any(match(name) for match in wanted)]
    chosen = [name for name in included if not any(match(name) for match in unwanted)]
    if not chosen:
        raise _nothing_error(names, include, exclude, included, owner)
    warn_options = {"owner": owner, "stacklevel": stacklevel + 1}
    _warn_unmatched(names, include, wanted, "include", **warn_options)
    _warn_unmatched(included, exclude, unwanted, "exclude", **warn_options)
    return chosen


def _warn_unmatched(
    names: Sequence[str],
    given: tuple[ModulePattern, ...],
    matchers: list[Callable[[str], bool]],
    option: str,
    *,
    owner: Any,
    stacklevel: Any,
) -> None:
    """Warn about the patterns of ``option`` that match none of ``names``, naming them all."""
    missing = [
        _text(pattern)
        for pattern, match in zip(given, matchers, strict=True)
        if not any(match(name) for name in names)
    ]
    if not missing:
        return
    several = len(missing) > 1
    among = "module of" if option == "include" else "included module of"
    warnings.warn(
        UnmatchedPatternWarning(
            f"{option}={', '.join(missing)}: "
            f"{'these patterns match' if several else 'the pattern matches'} no {among} {owner}; "
            f"{'they are' if several else 'it is'} ignored "
            "(tonumpy.module_names(model, include=...) lists what a pattern matches)"
        ),
        stacklevel=stacklevel + 1,
    )


def _shown(names: Sequence[str], limit: int) -> str:
    text = ", ".join(repr(n) for n in names[:limit])
    return text + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _nothing_error(
    names: Sequence[str],
    include: tuple[ModulePattern, ...],
    exclude: tuple[ModulePattern, ...],
    included: list[str],
    owner: str,
) -> CaptureError:
    def listed(items: tuple[ModulePattern, ...]) -> str:
        return "[" + ", ".join(_text(p) for p in items) + "]"

    if included:
        return CaptureError(
            f"include={listed(include)} matches {len(included)} module(s) of {owner} "
            f"({_shown(included, 6)}) but exclude={listed(exclude)} leaves none of them"
        )
    hints = [
        "in a pattern '*' matches within one dotted segment of a name and a '**' segment "
        "any number of segments"
    ]
    for pattern in include:
        if not isinstance(pattern, str) or pattern.startswith("**") or pattern == "":
            continue
        wider = "**." + pattern
        found = [name for name in names if matcher(wider)(name)]
        if found:
            hints.append(f"{wider!r} matches {len(found)}: {_shown(found, 4)}")
        if _REGEX_LOOK.search(pattern):
            hints.append(
                f"{pattern!r} is read as a glob: for a regular expression pass "
                f"re.compile({pattern!r})"
            )
    return CaptureError(
        f"no module of {owner} matches include={listed(include)}; "
        + "; ".join(hints)
        + f". Its {len(names)} module names are: {_shown(names, 24)} (the root module is ''; "
        "tonumpy.module_names(model) lists them all)"
    )


def _text(pattern: ModulePattern) -> str:
    return f"re.compile({pattern.pattern!r})" if isinstance(pattern, re.Pattern) else repr(pattern)
