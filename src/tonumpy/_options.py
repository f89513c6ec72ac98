"""Checks of the options public functions take, made before any work is done.

Each check accepts exactly the documented values and raises [`OptionError`][]
(a ``TypeError`` and a ``ValueError``) naming the function, the parameter, what was passed and
what is accepted. ``True`` is not an axis and ``0`` is not a ``copy=`` mode here, although
Python would let both through: a silently reinterpreted option gives wrong results, not errors.

The checks on hot paths (``to_numpy`` on one small tensor) are written inline by their callers
as identity tests, and call ``bad_flags`` only once something is wrong.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, NoReturn, TypeAlias

import numpy as np

from .errors import OptionError

__all__ = [
    "Copy",
    "bad_flags",
    "check_axis",
    "check_callable_signature",
    "check_copy",
    "check_directory",
    "check_flag",
    "check_flags",
    "check_num_items",
]


#: What ``copy=`` accepts: ``None`` (share memory where possible), ``True`` (always copy) or
#: ``False`` (never copy: raise instead).
Copy: TypeAlias = Literal[True, False] | None


def _shown(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def check_copy(copy: Any, caller: str) -> None:
    """Raise unless ``copy`` is exactly ``None``, ``True`` or ``False``.

    Examples:
        >>> check_copy(None, "to_numpy")
        >>> check_copy(0, "to_numpy")
        Traceback (most recent call last):
        ...
        tonumpy.errors.OptionError: to_numpy(copy=0 (int)): copy= takes None (share memory ...
    """
    if copy is None or copy is True or copy is False:
        return
    raise OptionError(
        f"{caller}(copy={_shown(copy)}): copy= takes None (share memory where possible), True "
        "(always copy) or False (never copy: raise instead); nothing else, not 0, 1 or a string"
    )


def check_flag(value: Any, name: str, caller: str) -> None:
    """Raise unless ``value`` is exactly ``True`` or ``False`` (not 0, 1 or ``np.True_``).

    Examples:
        >>> check_flag("yes", "ml_dtypes", "to_numpy")
        Traceback (most recent call last):
        ...
        tonumpy.errors.OptionError: to_numpy(ml_dtypes='yes' (str)): ml_dtypes= takes True or ...
    """
    if value is True or value is False:
        return
    raise OptionError(f"{caller}({name}={_shown(value)}): {name}= takes True or False")


def check_flags(caller: str, /, **flags: Any) -> None:
    """``check_flag`` for each keyword argument."""
    for name, value in flags.items():
        check_flag(value, name, caller)


def bad_flags(caller: str, /, *, copy: Any = None, **flags: Any) -> NoReturn:
    """Raise for whichever of ``copy`` and the boolean ``flags`` is wrong (one is).

    Callers test the options inline (a few identity comparisons) and call this only when one
    of them is not exactly what is accepted; it finds which and says so.
    """
    check_copy(copy, caller)
    check_flags(caller, **flags)
    raise AssertionError(f"{caller}: bad_flags called with valid options")  # pragma: no cover


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


def check_axis(axis: Any, caller: str) -> int:
    """``axis`` as a Python int, or an error if it is not an integer (``True`` is not).

    Examples:
        >>> check_axis(np.int64(-1), "concat")
        -1
        >>> check_axis(1.5, "concat")
        Traceback (most recent call last):
        ...
        tonumpy.errors.OptionError: concat(axis=1.5 (float)): axis= takes an int: the index ...
    """
    if _is_int(axis):
        return int(axis)
    raise OptionError(
        f"{caller}(axis={_shown(axis)}): axis= takes an int: the index of the dimension to "
        "concatenate along (negative counts from the end)"
    )


def check_num_items(num_items: Any, caller: str) -> int | None:
    """``num_items`` as a Python int (``>= 0``), or ``None``; an error for anything else.

    Examples:
        >>> check_num_items(2.5, "result")
        Traceback (most recent call last):
        ...
        tonumpy.errors.OptionError: result(num_items=2.5 (float)): num_items= takes None or ...
    """
    if num_items is None:
        return None
    if _is_int(num_items) and num_items >= 0:
        return int(num_items)
    raise OptionError(
        f"{caller}(num_items={_shown(num_items)}): num_items= takes None or a number of rows, "
        "an int >= 0"
    )


def check_callable_signature(fn: Callable[..., Any], args: tuple[Any, ...], what: str) -> None:
    """Raise if ``fn`` cannot be called with ``args`` (positionally); ``what`` names the option.

    Callables whose signature Python cannot read (some builtins) are accepted unchecked.
    """
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    try:
        signature.bind(*args)
    except TypeError as exc:
        raise OptionError(
            f"{what}; {getattr(fn, '__qualname__', repr(fn))} has the signature {signature}, "
            f"which does not accept that ({exc})"
        ) from None


def check_directory(directory: str | os.PathLike[str], caller: str) -> Path:
    """``directory`` as a Path, or an error if it is, or lies below, something not a directory.

    A directory that does not exist yet is fine (it is created when needed), as long as the
    nearest existing ancestor is a directory.
    """
    if not isinstance(directory, str | os.PathLike):
        raise OptionError(
            f"{caller}(directory={_shown(directory)}): directory= takes a path (str or "
            "os.PathLike) or None"
        )
    path = Path(directory)
    probe = path
    while True:
        if probe.exists():
            if not probe.is_dir():
                whose = "is" if probe == path else f"lies below {str(probe)!r}, which is"
                raise OptionError(
                    f"{caller}(directory={str(path)!r}): the path {whose} a file, not a "
                    "directory; pass a directory (existing, or one that can be created)"
                )
            return path
        if probe.parent == probe:
            return path
        probe = probe.parent
