"""The host staging pool: pinned blocks the transfer engine copies into, reused and bounded.

Pinning memory is slow (a ``pin_memory()`` costs far more than the copy it serves) and
page-locked memory is scarce, so blocks are kept and lent again, in power-of-two sizes; a block
comes back when the last array built on it is gone, and is reused only once the copies into it
have landed. [`set_pinned_pool_limit`][] bounds the idle bytes kept; [`empty_pinned_pool`][]
releases them.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import numpy as np
import torch

from ..errors import OptionError

__all__ = ["POOL", "empty_pinned_pool", "set_pinned_pool_limit"]


class _Pool:
    """Host staging blocks, reused across transfers, with a bound on the idle bytes kept.

    Blocks come in power-of-two sizes (from 64 KiB), like torch's own caching host allocator,
    which rounds pinned requests the same way. A block is lent out as a NumPy array (the
    *lease*); the arrays a transfer returns keep the lease alive through their ``.base``, and
    when the last of them is gone the block comes back here. A block whose copies may still
    be in flight (its transfer was dropped before ``result()``) is reused only once its
    events have completed. Idle blocks beyond ``limit_bytes`` are released (pinned memory is
    page-locked and scarce), and torch's cache of pinned memory is emptied after that (at the
    next lease), so the bound holds for the process, not just for this pool.
    """

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self._free: dict[tuple[bool, int], list[tuple[torch.Tensor, list[Any]]]] = {}
        self._idle = 0
        self._trimmed = False  # a pinned block was dropped: torch's host cache holds it now
        # Reentrant: a lease collected by the cyclic GC while this thread holds the lock (any
        # allocation may run a collection) calls _give_back, which takes the lock again.
        self._lock = threading.RLock()

    @staticmethod
    def size_class(nbytes: int) -> int:
        return max(1 << 16, 1 << (nbytes - 1).bit_length())

    def lease(self, nbytes: int, *, pinned: bool) -> tuple[torch.Tensor, np.ndarray, list[Any]]:
        """``nbytes`` bytes of host memory, as a tensor and as an array, and their guard.

        The tensor is for the copies; the array is the lease: every array built on the block
        must be a view of it (its ``.base``), and the block comes back to the pool when the
        lease is garbage. (The tensor cannot be the lease: ``Tensor.numpy()`` sets an alias
        of the tensor, not the tensor itself, as the array's base.) The guard is a list of
        events that must complete before the block is reused; it is empty once waited for.
        """
        size = self.size_class(nbytes)
        block = None
        if self._trimmed:
            self._trimmed = False
            _empty_host_cache()
        with self._lock:
            free = self._free.get((pinned, size))
            if free:
                for i, (candidate, events) in enumerate(free):
                    if all(e.query() for e in events):
                        block = candidate
                        del free[i]
                        self._idle -= size
                        break
        if block is None:
            block = self._allocate(size, pinned=pinned)
        guard: list[Any] = []
        tensor = block[:nbytes]
        lease = tensor.numpy()
        weakref.finalize(lease, self._give_back, block, pinned, guard).atexit = False
        return tensor, lease, guard

    def _allocate(self, size: int, *, pinned: bool) -> torch.Tensor:
        if pinned:
            try:
                return torch.empty(size, dtype=torch.uint8, pin_memory=True)
            except RuntimeError:  # out of page-locked memory: drop what is idle, try again
                self.clear()
                try:
                    return torch.empty(size, dtype=torch.uint8, pin_memory=True)
                except RuntimeError:  # still none: pageable memory, the copy just blocks
                    pass
        return torch.empty(size, dtype=torch.uint8)

    def _give_back(self, block: torch.Tensor, pinned: bool, events: list[Any]) -> None:
        size = block.numel()
        with self._lock:
            if self._idle + size <= self.limit_bytes:
                self._free.setdefault((pinned, size), []).append((block, list(events)))
                self._idle += size
                return
        # Dropped. The block is still referenced until this callback returns, so torch's host
        # cache can only be emptied later: at the next lease (or clear).
        self._trimmed = self._trimmed or pinned

    def clear(self) -> None:
        """Release every idle block."""
        with self._lock:
            pinned = self._trimmed or any(key[0] for key in self._free)
            self._free.clear()
            self._idle = 0
            self._trimmed = False
        if pinned:
            _empty_host_cache()

    @property
    def idle_bytes(self) -> int:
        return self._idle


def _empty_host_cache() -> None:
    empty = getattr(torch._C, "_host_emptyCache", None)  # noqa: SLF001 - CUDA builds only
    if empty is not None:
        empty()


#: The process-wide staging pool. At most 2 GiB of idle host blocks are kept.
POOL = _Pool(2 << 30)


def set_pinned_pool_limit(nbytes: int, /) -> int:
    """Set how many bytes of idle pinned staging buffers are kept for reuse (default 2 GiB).

    Buffers still referenced by returned arrays do not count and are never freed early.
    Lowering the limit below what is idle releases the idle buffers now.

    Examples:
        >>> old = set_pinned_pool_limit(256 << 20)
        >>> set_pinned_pool_limit(old) == 256 << 20
        True

    Returns:
        The previous limit.

    Raises:
        OptionError: ``nbytes`` is not an int >= 0.
    """
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        msg = f"set_pinned_pool_limit({nbytes!r}): the limit is a number of bytes, an int >= 0"
        raise OptionError(msg)
    old, POOL.limit_bytes = POOL.limit_bytes, nbytes
    if POOL.idle_bytes > nbytes:
        POOL.clear()
    return old


def empty_pinned_pool() -> None:
    """Release every idle pinned staging buffer now (and torch's cache of pinned memory).

    Blocks held by returned arrays stay alive.

    Examples:
        >>> empty_pinned_pool()
    """
    POOL.clear()
