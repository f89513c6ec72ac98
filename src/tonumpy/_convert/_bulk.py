"""The measured CPU passes: a whole flat list of plain CPU tensors converted at once.

Per leaf, the careful converter (``tonumpy._convert._leaf``) costs several torch calls; most trees
are made of plain CPU tensors for which one call is the whole conversion. [`convert`][] tries that
in one list comprehension (or one ``map``), and declines (returns ``None``) for anything it does
not handle, so that the router's per-leaf loop converts the leaves instead, with errors that name
the path. A CPU ``to_numpy`` has eight routes; the careful converter serves every input, and
each of the seven others (and each variant inside a route) is kept because it is measurably
faster on the inputs it serves than what would serve them without it (that route disabled in a
copy of the code, the two timed alternately, the minimum and the median per call, by
``benchmarks/routes.py``; 2026-12-06, a 2-core shared machine under load, ``--clock cpu``
(this thread's CPU time), 21-31 rounds; ``W`` are the workloads of ``benchmarks/run.py``):

1. **lone tensor** (``tonumpy.convert.to_numpy``: a CPU tensor that is the whole tree, no
   walk): W5 (a (64,) float32 tensor) 1.1 µs vs 5.1 µs without (the walk, the bulk pass): 4.7x;
2. **the numpy pass**: ``t.numpy()`` skips the ``cpu``/``resolve_conj``/``resolve_neg``
   dispatcher round trips that ``force=True`` adds: W1 12.8 ms vs 16.2 ms without (the force
   pass): 1.26x; W2 9.0 vs 11.7 ms: 1.31x; W4 8.1 vs 10.2 ms: 1.26x. Where every leaf is a
   tensor (W1, W4) it is one ``map`` of the unbound ``Tensor.numpy``, no bytecode per leaf:
   W1 10.9 vs 12.5 ms with the comprehension, 1.15x (medians 1.08x); W4 7.0 vs 7.4 ms, 1.06x
   (1.08x). It refuses tensors that require grad, so a tree whose first tensor requires grad
   (W3: they usually all do) starts with
3. **the grad pass**, ``t.numpy()`` with grad turned off (``torch.no_grad()``, a thread's own
   mode, restored on the way out) in one comprehension: ``numpy()`` then accepts tensors that
   require grad and detaches them itself, without the ``cpu``/``resolve_conj``/``resolve_neg``
   round trips of ``force=True`` (conj/neg bits still refuse: the low-precision pass takes
   them). The views of tensors that require grad are made read-only in it (``read_only``'s
   rule applied inline, ``tonumpy._convert._leaf.SET_FLAGS``: a Python call per leaf cost W3
   about 5%): W3 11.7 vs 13.5 ms without (the low-precision pass's dtype dispatch): 1.16x
   (medians 1.18x; 31 rounds, 2026-12-06). Against the ``numpy(force=True)`` comprehension it
   replaced, 0.95x the time (min and median, 30 alternating rounds). W3 is the training-loop
   case, and issue 22's target for it is tight;
4. **the low-precision pass, widening** (``_upcast_bf16``): bfloat16 leaves of one shape
   stacked and widened with one cast: W6 upcast 1.6 vs 18.3 ms without (per leaf): 11.4x;
5. **the same-bits pass** (``_same_bits``, ``ml_dtypes=True``, the first tensor
   bfloat16/float8): the dtypes and grad flags read by ``map``, the views made by three
   ``map`` calls: W6 ml_dtypes 1.77 vs 2.30 ms without (the bit-view pass): 1.30x. From 32
   leaves on, the integer views are taken in inference mode (``_integer_views``): 1.77 vs
   1.87 ms without, 1.06x (medians 1.04x); below, entering inference mode costs more than it
   saves (at 8 leaves 1.09x slower, at 32 even);
6. **the bit-view pass** (``_bit_views``, ``ml_dtypes=True``, other trees with such leaves):
   a float32 leaf then W6's 1,000 bfloat16 leaves: 2.2 vs 16.0 ms without (per leaf): 7.2x;
7. **per leaf, quick** (``tonumpy.convert._per_leaf``: ``numpy(force=True)`` first, for trees
   the passes decline): W2 with one tensor repeated: 12.4 vs 27.2 ms without (the careful
   converter for every leaf): 2.2x;
8. **per leaf, careful** (``tonumpy._convert._leaf``): everything else, each refusal an error naming
   the path.

With ``copy=True`` every array that is a view of a tensor is copied in the same comprehension.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from itertools import repeat
from typing import Any

import numpy as np
import torch

from .. import _dtypes
from .._dtypes import PLAIN
from ._leaf import SET_FLAGS, LeafError, read_only

__all__ = ["to_arrays"]


def to_arrays(
    leaves: list[Any], leaf_types: set[type], *, copy: bool, ml_dtypes: bool, cuda_possible: bool
) -> list[Any] | None:
    """Convert distinct plain CPU tensors (other leaves kept) in bulk, or decline with None.

    ``leaf_types`` is the set of the leaves' types. ``copy``: every array must own its memory (the
    caller's ``copy=True``). ``cuda_possible``: a tensor may be on a GPU (CUDA is
    initialised); such a tree is declined once the first pass meets one, since the router
    moves CUDA tensors together through the transfer engine. Declined too: tensor subclasses,
    arrays to copy, and any leaf a pass refuses (sparse, meta, float4, ...).
    """
    plain = PLAIN
    if any(cls not in plain and issubclass(cls, torch.Tensor) for cls in leaf_types):
        return None
    if copy and np.ndarray in leaf_types:  # input arrays must be copied: the per-leaf loop does it
        return None
    first = next((leaf for leaf in leaves if type(leaf) in plain), None)
    if first is None:
        return list(leaves)
    if ml_dtypes and not copy and first.dtype in _dtypes.ML_DTYPES and leaf_types <= PLAIN:
        try:  # a tree of bfloat16/float8 tensors (W6): straight to the bit views
            return _same_bits(leaves, first.dtype)
        except Exception:  # noqa: BLE001, S110 - neg bit, a device, ...: the passes below
            pass
    if not first.requires_grad and not copy:  # copies: the grad pass below makes them
        try:  # no tensor requires grad, none has a conj/neg bit (evaluation, logging)
            if leaf_types <= plain:  # tensors only (W1, W4): no bytecode per leaf
                return list(map(_NUMPY, leaves))
            return [leaf.numpy() if type(leaf) in plain else leaf for leaf in leaves]
        except Exception:  # noqa: BLE001, S110 - grad, a dtype NumPy lacks, a device, ...
            pass
    if cuda_possible and any(type(leaf) in plain and leaf.is_cuda for leaf in leaves):
        return None
    try:
        # with grad off, numpy() takes tensors that require grad and detaches them itself
        # (the array's base is the detached tensor: the graph is not kept alive), without
        # force=True's round trips; conj/neg bits still refuse (the low-precision pass below).
        # Copies of every tree are made here: they own their memory, grad or not.
        with torch.no_grad():
            if copy:
                return [leaf.numpy().copy() if type(leaf) in plain else leaf for leaf in leaves]
            # read-only views of tensors that require grad (read_only's rule, inline)
            set_flags = SET_FLAGS
            return [
                ((arr := leaf.numpy()), leaf.requires_grad and set_flags(arr, False))[0]
                if type(leaf) in plain
                else leaf
                for leaf in leaves
            ]
    except Exception:  # noqa: BLE001, S110 - a dtype NumPy lacks, conj/neg bits, a refusal
        pass
    try:
        return _low_precision(leaves, copy=copy, ml_dtypes=ml_dtypes)
    except Exception:  # noqa: BLE001 - float4, sparse, ml_dtypes missing, ...: per leaf
        return None


def _protect(leaves: list[Any], out: list[Any]) -> list[Any]:
    """Make the views of the tensors among ``leaves`` that require grad read-only; ``out``.

    ``out[i]`` must be the array of ``leaves[i]`` wherever that is a plain tensor.
    """
    plain = PLAIN
    for leaf, arr in zip(leaves, out, strict=True):
        if type(leaf) in plain and leaf.requires_grad:
            read_only(arr)
    return out


_PENDING = object()  # a bf16 leaf whose float32 array is made after the first pass


def _low_precision(leaves: list[Any], *, copy: bool, ml_dtypes: bool) -> list[Any]:
    """Plain CPU leaves, some bfloat16/float8: ``ml_dtypes`` bit views, or a bulk bf16 upcast.

    One comprehension dispatches on the dtype; bfloat16 leaves are set aside and widened to
    float32 together by ``_upcast_bf16``. Anything else raises, and the caller declines.
    """
    if ml_dtypes:
        return _bit_views(leaves, copy=copy)
    pending: list[torch.Tensor] = []
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor  # noqa: SLF001 - no public check

    def native(t: torch.Tensor) -> Any:
        arr = t.numpy(force=True)
        if copy:
            return arr.copy()
        return read_only(arr) if t.requires_grad else arr

    def upcast(t: torch.Tensor) -> Any:
        if wrapped(t) or not t.is_contiguous():  # keep .float()'s strides: per leaf
            raise LeafError("not for the bulk upcast", unsupported=False)
        pending.append(t)
        return _PENDING

    table: dict[torch.dtype, Callable[[torch.Tensor], Any]] = dict.fromkeys(_dtypes.NATIVE, native)
    table[torch.bfloat16] = upcast
    plain = PLAIN
    out = [table[leaf.dtype](leaf) if type(leaf) in plain else leaf for leaf in leaves]
    widened = iter(_upcast_bf16(pending))  # new arrays that own their memory: never copied
    return [next(widened) if item is _PENDING else item for item in out]


def _same_bits(leaves: list[Any], dtype: torch.dtype) -> list[Any]:
    """Plain CPU tensors, mostly of the ``ml_dtypes`` dtype ``dtype``: ``ml_dtypes`` bit views.

    The W6 case, below the cost of the bare ``t.view(int16).numpy().view(bfloat16)`` map: the
    leaves' dtypes and grad flags are read by ``map`` (no bytecode per leaf), and where every
    leaf has ``dtype`` three C-level maps make the views, the integer views of the tensors
    taken in inference mode (``_integer_views``); otherwise each leaf's dtype is checked (a
    leaf of another dtype goes through ``_one_view``). Views of leaves that require grad are
    made read-only (see ``_protect``). A negative bit, a device other than the CPU, and
    anything else ``view``/``numpy`` refuses raise: the caller tries its other passes.
    """
    bits, np_dtype = _dtypes.BITS[dtype.itemsize], _dtypes.ml_numpy_dtype(dtype)
    if set(map(_DTYPE, leaves)) == {dtype}:
        arrays = map(_NUMPY, _integer_views(leaves, bits))
        out = list(map(_ARRAY_VIEW, arrays, repeat(np_dtype)))
    else:
        other = _one_view
        out = [
            leaf.view(bits).numpy().view(np_dtype) if leaf.dtype is dtype else other(leaf)
            for leaf in leaves
        ]
    if any(map(_REQUIRES_GRAD, leaves)):
        for leaf, arr in zip(leaves, out, strict=True):
            if leaf.requires_grad:
                read_only(arr)
    return out


# from about this many leaves on, entering inference mode (~2 us) costs less than it saves
_INFERENCE_FROM = 32


def _integer_views(leaves: list[torch.Tensor], bits: torch.dtype) -> list[torch.Tensor]:
    """``t.view(bits)`` for every tensor of ``leaves``, in inference mode for many of them.

    A view taken in inference mode skips autograd's view bookkeeping (W6: about 200 of the
    480 ns per leaf). Such a view is an inference tensor; it is only the hidden owner of its
    array's memory (``numpy()``, called outside inference mode, still refuses what it refused,
    and the input tensors are untouched). A bit view is not differentiable anyway, and the
    views of tensors that require grad are made read-only by the caller.
    """
    if len(leaves) < _INFERENCE_FROM:
        return list(map(_TORCH_VIEW, leaves, repeat(bits)))
    with torch.inference_mode():
        return list(map(_TORCH_VIEW, leaves, repeat(bits)))


_DTYPE = operator.attrgetter("dtype")
_REQUIRES_GRAD = operator.attrgetter("requires_grad")
# unbound methods, mapped over the leaves (plain tensors only: a subclass may override them)
_NUMPY: Callable[[torch.Tensor], np.ndarray] = torch.Tensor.numpy
_TORCH_VIEW: Callable[[torch.Tensor, torch.dtype], torch.Tensor] = torch.Tensor.view
_ARRAY_VIEW: Callable[[np.ndarray, np.dtype[Any]], np.ndarray] = np.ndarray.view


def _one_view(leaf: torch.Tensor) -> np.ndarray:
    """One leaf of ``_same_bits`` of another dtype: a bit view, or ``numpy(force=True)``."""
    if leaf.dtype in _dtypes.ML_DTYPES:
        return (
            leaf.view(_dtypes.BITS[leaf.dtype.itemsize])
            .numpy()
            .view(_dtypes.ml_numpy_dtype(leaf.dtype))
        )
    arr: np.ndarray = leaf.numpy(force=True)
    return arr


def _bit_views(leaves: list[Any], *, copy: bool) -> list[Any]:
    """bfloat16/float8 leaves as ``ml_dtypes`` arrays over the same bytes, others as usual.

    The dtype dispatch is inlined in the comprehension (a function call per leaf costs ~10%
    here). Leaves ``numpy(force=True)`` refuses (float4, complex32, negative views, ...) raise,
    and the caller declines.
    """
    plain = PLAIN
    views = {
        dtype: (_dtypes.BITS[dtype.itemsize], _dtypes.ml_numpy_dtype(dtype))
        for dtype in _dtypes.ML_DTYPES
    }
    out = [
        (
            leaf.numpy(force=True)
            if (pair := views.get(leaf.dtype)) is None
            else leaf.view(pair[0]).numpy().view(pair[1])
        )
        if type(leaf) in plain
        else leaf
        for leaf in leaves
    ]
    if copy:
        return [
            arr.copy() if type(leaf) in plain else arr
            for leaf, arr in zip(leaves, out, strict=True)
        ]
    return _protect(leaves, out)


# bf16 leaves of one shape are stacked, widened and split in blocks of at most this many
# elements: torch's grain size, so each block is cast on one thread (no OpenMP wake-ups, which
# cost milliseconds on a busy machine), and the temporaries (128 KiB) stay in the cache
_STACK_BLOCK = 32_768


def _upcast_bf16(tensors: list[torch.Tensor]) -> list[np.ndarray]:
    """Widen contiguous CPU bfloat16 tensors to float32 arrays, each owning its memory.

    Per leaf, ``t.float().numpy()`` costs two torch calls and a torch allocation. Here leaves
    that share a shape are stacked into one block (``torch.stack``), widened with one cast and
    split into rows that are copied into arrays of their own (``ndarray.copy``: a NumPy
    allocation, cheap to fill), so a block of k leaves costs three torch calls in all. The
    remaining leaves (a shape seen once, 0-d, or more than a block) get NumPy-allocated float32
    arrays filled by one ``torch._foreach_copy_``. Values are those of ``t.float()``, bit for
    bit (the same widening kernel).
    """
    out: list[Any] = [None] * len(tensors)
    by_shape: dict[torch.Size, list[int]] = {}
    for index, t in enumerate(tensors):
        by_shape.setdefault(t.shape, []).append(index)
    singles: list[int] = []
    with torch.no_grad():
        for shape, indices in by_shape.items():
            numel = shape.numel()
            if len(indices) < 2 or not shape or numel > _STACK_BLOCK // 2:
                singles += indices
                continue
            step = _STACK_BLOCK // max(numel, 1)
            for start in range(0, len(indices), step):
                part = indices[start : start + step]
                block = torch.stack([tensors[i] for i in part]).float().numpy()
                for i, row in zip(part, block, strict=True):
                    out[i] = row.copy()
        if singles:
            targets = []
            for i in singles:
                arr = out[i] = np.empty(tensors[i].shape, np.float32)
                targets.append(torch.from_numpy(arr))
            torch._foreach_copy_(targets, [tensors[i] for i in singles])
    return out
