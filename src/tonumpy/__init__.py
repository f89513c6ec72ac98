"""tonumpy: turn any tensor, or any nested structure of tensors, into NumPy, correctly.

The errors are imported eagerly; every other public name loads its module on first use
(``tonumpy.to_numpy`` imports torch then), so that ``import tonumpy`` costs almost nothing
and the ``tonumpy`` command can report Ctrl-C while torch loads.

Examples:
    >>> import torch, tonumpy
    >>> tonumpy.to_numpy({"x": torch.ones(2, requires_grad=True)})
    {'x': array([1., 1.], dtype=float32)}
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
    CaptureError,
    ConversionError,
    DestinationExistsError,
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
    from ._numpy_args import numpy_args
    from .accumulate import Accumulator, concat
    from .asynchronous import PendingTransfer, to_numpy_async
    from .convert import apply, to_numpy, to_torch
    from .distributed import gather
    from .hooks import Activations, capture, module_names
    from .io import load, save
    from .table import column_structure, from_columns, to_columns

__version__ = "0.1.0"

__all__ = [
    "Accumulator",
    "Activations",
    "CaptureError",
    "ConversionError",
    "DestinationExistsError",
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
    "Activations": "hooks",
    "PendingTransfer": "asynchronous",
    "apply": "convert",
    "capture": "hooks",
    "column_structure": "table",
    "concat": "accumulate",
    "from_columns": "table",
    "gather": "distributed",
    "load": "io",
    "module_names": "hooks",
    "numpy_args": "_numpy_args",
    "save": "io",
    "to_columns": "table",
    "to_numpy": "convert",
    "to_numpy_async": "asynchronous",
    "to_torch": "convert",
}


# public modules reachable as attributes after a bare ``import tonumpy`` (``tonumpy.io.read``);
# ``cli`` is left out: importing it installs the command's start-up hook
_SUBMODULES = frozenset(
    {"accumulate", "asynchronous", "convert", "distributed", "hooks", "io", "lightning", "table"}
)


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    module = _LAZY.get(name)
    if module is None:
        msg = f"module 'tonumpy' has no attribute {name!r}"
        raise AttributeError(msg)
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
