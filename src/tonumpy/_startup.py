"""Ctrl-C while the ``tonumpy`` command starts: one line, no traceback.

Importing torch takes seconds. The package itself imports nothing heavy (``import tonumpy``
loads its submodules on first use), so ``tonumpy.cli`` imports this module before numpy and
torch, and only the command does: when
the process is the ``tonumpy`` command (or ``python -m tonumpy``), an interrupt that escapes
during start-up is reported as ``tonumpy: interrupted``; every other exception, and every other
program that imports tonumpy, is left alone.
"""

from __future__ import annotations

import os
import sys
from types import TracebackType

__all__: list[str] = []


def _is_the_command() -> bool:
    name = os.path.basename(sys.argv[0]) if sys.argv else ""
    if name in ("tonumpy", "tonumpy.exe", "tonumpy-script.py"):
        return True
    original = getattr(sys, "orig_argv", [])
    return len(original) >= 3 and original[1:3] == ["-m", "tonumpy"]


def _hook(
    exc_type: type[BaseException], value: BaseException, traceback: TracebackType | None
) -> None:
    if issubclass(exc_type, KeyboardInterrupt):
        sys.stderr.write("tonumpy: interrupted\n")
        return
    _previous(exc_type, value, traceback)


_previous = sys.excepthook
if _is_the_command():
    sys.excepthook = _hook
