"""tonumpy: turn any tensor, or any nested structure of tensors, into NumPy, correctly.

Example:
    >>> import torch, tonumpy
    >>> tonumpy.to_numpy({"x": torch.ones(2, requires_grad=True)})
    {'x': array([1., 1.], dtype=float32)}
"""

from .accumulate import Accumulator, concat
from .asynchronous import PendingTransfer, to_numpy_async
from .capture import Activations, CaptureError, capture, numpy_args
from .convert import apply, to_numpy, to_torch
from .distributed import gather
from .errors import ConversionError, TonumpyError, UnsupportedLeafError
from .io import load, save

__version__ = "0.1.0"

__all__ = [
    "Accumulator",
    "Activations",
    "CaptureError",
    "ConversionError",
    "PendingTransfer",
    "TonumpyError",
    "UnsupportedLeafError",
    "__version__",
    "apply",
    "capture",
    "concat",
    "gather",
    "load",
    "numpy_args",
    "save",
    "to_numpy",
    "to_numpy_async",
    "to_torch",
]
