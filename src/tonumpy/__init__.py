"""tonumpy: turn any tensor, or any nested structure of tensors, into NumPy, correctly.

Example:
    >>> import torch, tonumpy
    >>> tonumpy.to_numpy({"x": torch.ones(2, requires_grad=True)})
    {'x': array([1., 1.], dtype=float32)}
"""

from .convert import apply, to_numpy, to_torch
from .errors import ConversionError, TonumpyError, UnsupportedLeafError

__version__ = "0.1.0"

__all__ = [
    "ConversionError",
    "TonumpyError",
    "UnsupportedLeafError",
    "__version__",
    "apply",
    "to_numpy",
    "to_torch",
]
