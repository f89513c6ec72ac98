"""``to_numpy_async``: start a tree's device-to-host copies now, take the arrays later.

The synchronous [`tonumpy.to_numpy`][] already moves all CUDA leaves of a tree with one
wait (see the transfer guide); this module gives the same engine without the wait, so a
training loop or a logging hook can enqueue the copies of step ``n``'s outputs and keep
computing while they cross the bus.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import _options, _tree
from ._convert._staging import empty_pinned_pool, set_pinned_pool_limit
from ._convert._transfer import PendingTransfer
from ._options import Copy
from .convert import start

__all__ = ["PendingTransfer", "empty_pinned_pool", "set_pinned_pool_limit", "to_numpy_async"]


def to_numpy_async(
    tree: Any,
    /,
    *,
    copy: Copy = None,
    ml_dtypes: bool = False,
    scalars: bool = False,
    is_leaf: Callable[[Any], bool] | None = None,
) -> PendingTransfer:
    """Enqueue the conversion of a nested structure to NumPy and return without waiting.

    CUDA tensors are copied to host staging memory on their device's current stream (packed
    together when small, with one event per device); everything else is converted right
    away. ``to_numpy_async(tree, **options).result()`` returns exactly what
    ``to_numpy(tree, **options)`` returns. The copies see the tensors as they are in stream
    order at the time of this call: later kernels on the same stream may overwrite them.

    Examples:
        >>> import torch
        >>> pending = to_numpy_async({"logits": torch.ones(2, requires_grad=True), "step": 3})
        >>> # ... more work on the GPU here, overlapping the copies ...
        >>> pending.result()
        {'logits': array([1., 1.], dtype=float32), 'step': 3}

    Args:
        tree: A tensor, or any nesting of containers holding tensors, as for
            [`tonumpy.to_numpy`][].
        copy: ``None``: arrays from CUDA tensors are views into a pooled host buffer shared
            by the whole transfer (kept alive by the arrays); ``True``: compact arrays that
            own their memory; ``False``: raise for the first leaf that needs a copy (any
            leaf not on the CPU).
        ml_dtypes: Return bfloat16/float8 as ``ml_dtypes`` arrays, bit-exact.
        scalars: Return 0-d tensors as Python scalars.
        is_leaf: Called on each node; a node it returns True for is treated as a leaf.

    Returns:
        A [`PendingTransfer`][]: ``.done()`` tells, without blocking, whether the copies
        have arrived; ``.result()`` waits for them and returns the converted tree.

    Raises:
        ConversionError: As [`tonumpy.to_numpy`][], for leaves converted right away.
        UnsupportedLeafError: As [`tonumpy.to_numpy`][].
        OptionError: As [`tonumpy.to_numpy`][]: ``copy``, ``ml_dtypes`` or ``scalars`` is
            not one of the values it takes.
    """
    _options.check_copy(copy, "to_numpy_async")
    _options.check_flags("to_numpy_async", ml_dtypes=ml_dtypes, scalars=scalars)
    leaves, spec, leaf_types = _tree.flatten_typed(tree, is_leaf=is_leaf)
    return start(
        leaves, spec, copy=copy, ml_dtypes=ml_dtypes, scalars=scalars, leaf_types=leaf_types
    )
