"""tonumpy: turn any tensor, or any nested structure of tensors, into NumPy, correctly.

The conversion functions and the errors are imported eagerly; the modules behind the logging
hooks, ``concat``, ``Accumulator``, ``gather``, ``save`` and ``load`` load on first use, so that
``import tonumpy`` costs little more than ``import torch``.

Examples:
    >>> import torch, tonumpy
    >>> tonumpy.to_numpy({"x": torch.ones(2, requires_grad=True)})
    {'x': array([1., 1.], dtype=float32)}
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import _startup  # noqa: F401 - first: Ctrl-C while the command imports torch
from .asynchronous import PendingTransfer, to_numpy_async
from .convert import apply, to_numpy, to_torch
from .errors import (
    CaptureError,
    ConversionError,
    FileFormatError,
    MissingDependencyError,
    OptionError,
    TonumpyError,
    TonumpyWarning,
    UncheckedObjectWarning,
    UnmatchedPatternWarning,
    UnsafeFileError,
    UnsupportedLeafError,
)

if TYPE_CHECKING:
    from ._activations import Activations
    from ._numpy_args import numpy_args
    from .accumulate import Accumulator, concat
    from .distributed import gather
    from .hooks import capture, module_names
    from .io import load, save
    from .table import column_structure, from_columns, to_columns

__version__ = "0.1.0"

__all__ = [
    "Accumulator",
    "Activations",
    "CaptureError",
    "ConversionError",
    "FileFormatError",
    "MissingDependencyError",
    "OptionError",
    "PendingTransfer",
    "TonumpyError",
    "TonumpyWarning",
    "UncheckedObjectWarning",
    "UnmatchedPatternWarning",
    "UnsafeFileError",
    "UnsupportedLeafError",
    "__version__",
    "apply",
    "capture",
    "column_structure",
    "concat",
    "from_columns",
    "gather",
    "load",
    "module_names",
    "numpy_args",
    "save",
    "to_columns",
    "to_numpy",
    "to_numpy_async",
    "to_torch",
]

_LAZY = {
    "Accumulator": "accumulate",
    "Activations": "_activations",
    "capture": "hooks",
    "module_names": "hooks",
    "numpy_args": "_numpy_args",
    "concat": "accumulate",
    "gather": "distributed",
    "load": "io",
    "save": "io",
    "column_structure": "table",
    "from_columns": "table",
    "to_columns": "table",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        msg = f"module 'tonumpy' has no attribute {name!r}"
        raise AttributeError(msg)
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
