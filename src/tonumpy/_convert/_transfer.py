"""Batched device-to-host transfer: one sync per tree instead of one per leaf.

``t.cpu()`` stops the host until the copy is done, once per leaf. For a model output of
thousands of small CUDA tensors those stops, not the bytes, are the cost. This engine moves a
whole flat list of leaves in one go:

1. Leaves are grouped by source device (one group per GPU).
2. On the device, each leaf is detached (the work runs under ``no_grad``), its
   conjugate/negative bits are resolved and it is made contiguous (pytorch/pytorch#146286: an
   async copy of a flagged tensor gives wrong values).
3. Small leaves (at most ``SMALL_BYTES``) are packed into one contiguous byte buffer per
   device with a single ``torch.cat`` per dtype plus one over the dtype groups (chunked at
   ``CHUNK_BYTES`` so packing never doubles a huge output in device memory). Leaves are
   packed in decreasing item size, so every leaf lands at an offset that is a multiple of its
   item size and the host views are aligned without any padding.
4. The packed buffers and the large leaves are copied with ``non_blocking=True`` into ONE host
   block per device, taken from a pool of reused, bounded, pinned buffers (C19: a non-blocking
   copy into pageable memory blocks anyway, and pinning is slow, so pinned blocks are reused).
5. One CUDA event is recorded per source device, on that device's current stream, after its
   last copy (C21).
6. [`PendingTransfer.result`][] waits for every event before it builds a single array
   (C17: reading a non-blocking copy before a sync returns garbage); the arrays are NumPy
   views into the host block. bfloat16 crosses the bus as 2 bytes and is widened on the host
   by an exact 16-bit shift; float8 crosses as 1 byte and is widened by a 256-entry table
   computed by torch itself. ``ml_dtypes=True`` views the bits instead.

This module is the engine only: the router in [`tonumpy.convert`][] decides which leaves come
here. Only CUDA tensors (ROCm reports itself as CUDA) do; MPS and every other device take the
careful, blocking per-leaf converter (``tonumpy._convert._leaf``; C18: MPS races both ways). Leaves
the engine does not handle (sparse, quantized, nested, float4, subclasses, ...) are listed in
the batch's ``careful`` and converted by that converter too, so the results are always the
ones [`tonumpy.to_numpy`][] gives.

Nothing here touches CUDA at import time, or at all when no CUDA tensor is passed in.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from optree import PyTreeSpec

from .. import _dtypes, _tree
from .._options import Copy
from ._staging import POOL

__all__ = [
    "CHUNK_BYTES",
    "CUDA",
    "SMALL_BYTES",
    "CudaEngine",
    "PendingTransfer",
    "enqueue",
    "finish",
]

# Leaves of at most this many bytes are packed; larger ones get a copy of their own.
#
# No GPU was available when this was written, so the value rests on published figures, and
# benchmarks/transfer.py measures both sides of the trade-off (t0 and BW) on real hardware:
# * A separate device-to-host copy costs a fixed t0 on top of its bytes: the
#   cudaMemcpyAsync launch (about 2-5 us of host time), the DMA setup and the completion;
#   NVIDIA's bandwidthTest and "How to Optimize Data Transfers in CUDA C/C++" put small
#   pinned copies at 5-10 us, i.e. a 4 KiB copy runs at well under 1 GB/s.
# * Packing a leaf costs one extra read and write of its bytes in device memory: HBM runs at
#   1.6-2 TB/s (A100), 3.35 TB/s (H100), 4.8 TB/s (H200), so 2 x 1 MiB takes about 1 us.
# * The bus moves 1 MiB in about 40 us (PCIe 4 x16, ~25 GB/s pinned) or 20 us (PCIe 5).
# So at 1 MiB packing adds at most 2.5-5% of the leaf's bus time and saves one t0 (12-25% of
# it); for 4-64 KiB leaves the saved t0 is most of the cost. Above 1 MiB the saving shrinks
# below ~10% while the packed copy needs device memory, so large leaves go alone.
SMALL_BYTES = 1 << 20

# Packed buffers are built and copied in chunks of at most this size, so packing holds about
# one chunk of extra device memory at a time (a chunk is freed once its copy is enqueued, and
# the caching allocator reuses it in stream order for the next one), while a chunk is large
# enough for t0 not to matter: 64 MiB take 1-3 ms on the bus against a t0 of ~10 us.
CHUNK_BYTES = 64 << 20

# Host offsets of packed chunks and large leaves are rounded up to this (a cache line).
_ALIGN = 64

# How each dtype crosses the bus: (NumPy dtype of the bytes on the host, host finishing step).
# "view": the bytes are the array; "bf16": 16-bit shift to float32 (or ml_dtypes view);
# "f8": 256-entry table to float32 (or ml_dtypes view). complex32 is widened on the device.
_NATIVE_WIRE: dict[torch.dtype, np.dtype[Any]] = {
    d: np.dtype(str(d).removeprefix("torch.")) for d in _dtypes.NATIVE
}
_WIRE: dict[torch.dtype, tuple[np.dtype[Any], str]] = {
    **{d: (w, "view") for d, w in _NATIVE_WIRE.items()},
    **{
        d: (np.dtype(f"u{d.itemsize}"), "bf16" if d == torch.bfloat16 else "f8")
        for d in _dtypes.ML_DTYPES
    },
    torch.complex32: (np.dtype(np.complex64), "view"),
}

# dtypes packed with their own ``torch.cat`` kernel; the others (float8, uint16/32/64, whose
# cat kernels are not guaranteed on every backend) are packed as integers of the same size.
_CAT_NATIVE = frozenset(
    {
        torch.bool,
        torch.uint8,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.float16,
        torch.bfloat16,
        torch.float32,
        torch.float64,
        torch.complex64,
        torch.complex128,
    }
)

_is_functorch_wrapped: Callable[[torch.Tensor], bool] = (
    torch._C._functorch.is_functorch_wrapped_tensor  # noqa: SLF001 - no public check
)

_transforms_active: Callable[[], bool] = torch._C._are_functorch_transforms_active  # noqa: SLF001


def _never(t: torch.Tensor) -> bool:
    return False


# ------------------------------------------------------------------------------- planning


class CudaEngine:
    """The device side of the engine: which tensors it takes, and how it copies them.

    [`enqueue`][] reads from it, so that every caller passes the device side in explicitly:
    ``takes_cpu`` (whether CPU tensors are sent too: the router then skips the CPU bulk
    pass), ``takes(t)`` (a C-level getter: does this tensor go through the engine),
    ``device_of(t)`` (the source device a leaf is grouped by), ``copy(dst, src, device)`` (one
    device-to-host copy), ``small_bytes`` and ``chunk_bytes`` (the packing limits),
    ``pinned`` (whether the host blocks are page-locked) and ``record(device)`` (the event
    waited for before the arrays are built, recorded after that device's last copy on its
    current stream). ``active()`` says whether the engine may hold anything at all: false
    until the first CUDA tensor exists, so a CPU-only program never touches CUDA.

    Only CUDA tensors (ROCm reports itself as CUDA) are taken. The test suite passes a double
    that takes CPU tensors, to run the grouping, packing, staging and unpacking without a GPU.
    """

    __slots__ = ()

    takes_cpu = False
    pinned = True
    #: Leaves of at most this many bytes are packed ([`SMALL_BYTES`][]).
    small_bytes = SMALL_BYTES
    #: Packed buffers are built and copied in chunks of at most this size ([`CHUNK_BYTES`][]).
    chunk_bytes = CHUNK_BYTES
    takes: Callable[[torch.Tensor], bool] = operator.attrgetter("is_cuda")
    device_of: Callable[[torch.Tensor], torch.device] = operator.attrgetter("device")
    active: Callable[[], bool] = staticmethod(torch.cuda.is_initialized)

    @staticmethod
    def copy(dst: torch.Tensor, src: torch.Tensor, device: torch.device) -> None:
        """Enqueue the copy of ``src`` (bytes on ``device``) into the host block ``dst``."""
        dst.copy_(src, non_blocking=True)

    @staticmethod
    def record(device: torch.device) -> Any:
        """Record an event on ``device``'s current stream, after the copies enqueued there."""
        event = torch.cuda.Event()  # type: ignore[no-untyped-call]
        event.record(torch.cuda.current_stream(device))
        return event


#: The engine every public entry point uses.
CUDA = CudaEngine()


def _device_form(t: torch.Tensor) -> torch.Tensor:
    """Resolve the flags (and widen complex32) on the device; called under ``no_grad``."""
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = _dtypes.resolve_neg(t)  # float8 too, which torch cannot negate
    if t.dtype == torch.complex32:
        t = t.to(torch.complex64)
    return t


def _flat_bytes(t: torch.Tensor) -> torch.Tensor:
    # as_strided, not view(-1): a contiguous tensor with one element may have any stride
    return t.contiguous().as_strided((t.numel(),), (1,)).view(torch.uint8)


def _pack_runs(run_tensors: list[list[torch.Tensor]]) -> torch.Tensor:
    """One contiguous byte buffer from runs of same-dtype tensors (in the order given)."""
    flats = []
    for run in run_tensors:
        if run[0].dtype not in _CAT_NATIVE:
            run = [t.view(_dtypes.BITS[t.itemsize]) for t in run]  # noqa: PLW2901
        if len(run) == 1:  # flatten_dense_tensors returns a lone tensor as it is
            flats.append(_flat_bytes(run[0]))
        else:
            flat = torch._C._nn.flatten_dense_tensors(run)  # noqa: SLF001 - cat of .view(-1)s
            flats.append(flat.view(torch.uint8))
    return flats[0] if len(flats) == 1 else torch.cat(flats)


def _align(n: int) -> int:
    return (n + _ALIGN - 1) & -_ALIGN


class _Batch:
    """What one call enqueued, as parallel lists indexed by engine leaf (cheap per leaf).

    ``positions[i]`` is where leaf ``i`` goes in the output, ``dtypes``/``shapes``/``nbytes``
    describe its device form, ``blocks[i]``/``offsets[i]`` where its bytes land (block -1:
    no bytes, the leaf is empty). ``dups`` maps further positions of a repeated leaf to it.
    """

    __slots__ = (
        "blocks",
        "careful",
        "dtypes",
        "dups",
        "events",
        "guards",
        "leases",
        "nbytes",
        "offsets",
        "positions",
        "shapes",
        "sources",
    )

    def __init__(self) -> None:
        self.positions: list[int] = []
        self.dtypes: list[torch.dtype] = []
        self.shapes: list[tuple[int, ...]] = []
        self.nbytes: list[int] = []
        self.offsets: list[int] = []
        self.blocks: list[int] = []
        self.dups: list[tuple[int, int]] = []
        self.leases: list[np.ndarray | None] = []
        self.guards: list[list[Any]] = []
        self.events: list[Any] = []
        self.sources: list[torch.Tensor] = []  # kept alive until the copies have landed
        self.careful: list[int] = []  # positions the engine left to the careful path


class _DeviceJob:
    """Everything one source device sends: small leaves by dtype, and large leaves."""

    __slots__ = ("buckets", "device", "large")

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.buckets: dict[torch.dtype, tuple[list[torch.Tensor], list[int]]] = {}
        self.large: list[tuple[torch.Tensor, int]] = []

    def enqueue(self, batch: _Batch, engine: CudaEngine) -> None:
        """Pack, copy into one leased host block, record one event."""
        chunks, total = self._lay_out(batch, engine.chunk_bytes)
        if total == 0:
            return
        nbytes, offsets = batch.nbytes, batch.offsets
        staging, lease, guard = POOL.lease(total, pinned=engine.pinned)
        device, copy = self.device, engine.copy
        offset = 0
        try:
            for chunk_runs, chunk_size in chunks:
                if len(chunk_runs) == 1 and len(chunk_runs[0]) == 1:
                    src = _flat_bytes(chunk_runs[0][0])
                else:
                    src = _pack_runs(chunk_runs)
                copy(staging[offset : offset + chunk_size], src, device)
                offset = _align(offset + chunk_size)
            for t, i in self.large:
                copy(staging[offsets[i] : offsets[i] + nbytes[i]], _flat_bytes(t), device)
        finally:  # even after an error (out of memory...): copies already enqueued guard the block
            event = engine.record(self.device)
            guard.append(event)
            batch.events.append(event)
        batch.leases.append(lease)
        batch.guards.append(guard)

    def _lay_out(
        self, batch: _Batch, limit: int
    ) -> tuple[list[tuple[list[list[torch.Tensor]], int]], int]:
        """Assign each leaf its host offset; return the chunks to pack and the block size.

        Chunks are runs of same-dtype tensors, dtypes in decreasing item size (see ``_pack_runs``).
        """
        block_index = len(batch.leases)
        nbytes, offsets, blocks = batch.nbytes, batch.offsets, batch.blocks
        chunks: list[tuple[list[list[torch.Tensor]], int]] = []
        runs: list[list[torch.Tensor]] = []
        total = 0  # host offset of the current chunk
        size = 0  # bytes in the current chunk
        for dtype in sorted(self.buckets, key=lambda d: -d.itemsize):
            tensors, indices = self.buckets[dtype]
            start = 0
            for k, i in enumerate(indices):
                n = nbytes[i]
                if size + n > limit and size:
                    if k > start:
                        runs.append(tensors[start:k])
                    chunks.append((runs, size))
                    total = _align(total + size)
                    runs, size, start = [], 0, k
                offsets[i] = total + size
                blocks[i] = block_index
                size += n
            runs.append(tensors[start:])
        if size:
            chunks.append((runs, size))
            total = _align(total + size)
        for _, i in self.large:
            offsets[i], blocks[i] = total, block_index
            total = _align(total + nbytes[i])
        return chunks, total


def enqueue(  # noqa: PLR0915 - one hot loop, kept inline: every call costs per leaf
    leaves: Sequence[Any], positions: Sequence[int], engine: CudaEngine
) -> _Batch:
    """Start the copies of the plain tensors ``leaves[i] for i in positions``.

    The engine takes the tensors ``engine.takes`` (CUDA ones, see [`CudaEngine`][]) of a dtype that
    crosses the bus as bytes, strided and not functorch-wrapped; the others' positions are
    listed in the returned batch's ``careful``, for the careful per-leaf converter. A tensor
    met twice is copied once (``dups``). The hot loop: kept lean.
    """
    batch = _Batch()
    jobs: dict[torch.device, _DeviceJob] = {}
    seen: dict[int, int] = {}
    small = engine.small_bytes
    wire, strided = _WIRE, torch.strided
    takes, device_of = engine.takes, engine.device_of
    careful = batch.careful
    engine_positions, dtypes, shapes = batch.positions, batch.dtypes, batch.shapes
    nbytes_of, sources = batch.nbytes, batch.sources
    last_device: torch.device | None = None
    job: _DeviceJob | None = None
    # Wrapped tensors (vmap, grad, ...) exist only while a transform runs: check them then only.
    wrapped = _is_functorch_wrapped if _transforms_active() else _never
    with torch.no_grad():
        for position in positions:
            t = leaves[position]  # a plain tensor: the router sends nothing else
            key = id(t)
            index = seen.get(key)
            if index is not None:
                batch.dups.append((index, position))
                continue
            dtype = t.dtype
            if (
                dtype not in wire
                or not takes(t)
                or t.layout != strided
                or t.is_nested
                or wrapped(t)
            ):
                careful.append(position)
                continue
            device = device_of(t)
            if device != last_device:
                job = jobs.get(device)
                if job is None:
                    job = jobs[device] = _DeviceJob(device)
                last_device = device
            assert job is not None  # noqa: S101 - set with last_device, for mypy
            sources.append(t.detach() if t.requires_grad else t)  # no graph kept alive
            if t.is_conj() or t.is_neg() or dtype == torch.complex32:
                t = _device_form(t)
                dtype = t.dtype
            index = seen[key] = len(engine_positions)
            engine_positions.append(position)
            dtypes.append(dtype)
            shapes.append(t.shape)
            nbytes_of.append(nbytes := t.nbytes)
            if nbytes == 0:
                continue
            if nbytes <= small:
                bucket = job.buckets.get(dtype)
                if bucket is None:
                    bucket = job.buckets[dtype] = ([], [])
                bucket[0].append(t)
                bucket[1].append(index)
            else:
                job.large.append((t, index))
        n = len(engine_positions)
        batch.offsets = [0] * n
        batch.blocks = [-1] * n
        for job in jobs.values():
            job.enqueue(batch, engine)
    return batch


# --------------------------------------------------------------------------------- handle


class PendingTransfer:
    """A conversion in flight: the copies are enqueued, the arrays are not built yet.

    Returned by [`tonumpy.to_numpy_async`][]. The device work is ordered on each source
    device's current stream at the time of the call, so later kernels on that stream may
    overwrite the tensors without changing the result. Until [`result`][] returns, the handle
    keeps the source tensors alive. A tree with nothing to copy gives a handle that is done
    from the start.

    Examples:
        >>> import torch, tonumpy
        >>> pending = tonumpy.to_numpy_async({"x": torch.arange(3)})
        >>> pending.done()
        True
        >>> pending.result()
        {'x': array([0, 1, 2])}
    """

    __slots__ = ("_batch", "_copy", "_ml_dtypes", "_out", "_scalars", "_spec", "_tree")

    _NO_TREE: Any = object()

    def __init__(
        self,
        out: list[Any],
        spec: PyTreeSpec | None,
        batch: _Batch | None,
        *,
        copy: Copy,
        ml_dtypes: bool,
        scalars: bool,
    ) -> None:
        self._out = out
        self._spec = spec
        self._batch = batch
        self._copy = copy
        self._ml_dtypes = ml_dtypes
        self._scalars = scalars
        self._tree: Any = self._NO_TREE

    def done(self) -> bool:
        """True when every copy has arrived: [`result`][] will not wait. Never blocks."""
        return self._batch is None or all(e.query() for e in self._batch.events)

    def result_leaves(self) -> list[Any]:
        """Wait for the copies, then return the flat list of converted leaves.

        The list is in the order of the flattened tree's leaves; it is built once, later
        calls return the same list.
        """
        batch = self._batch
        if batch is not None:
            finish(
                batch, self._out, copy=self._copy, ml_dtypes=self._ml_dtypes, scalars=self._scalars
            )
            self._batch = None  # drops the sources, the events and our hold on the blocks
        return self._out

    def result(self) -> Any:
        """Wait for the copies, then return the converted tree (the same object each call)."""
        if self._tree is self._NO_TREE:
            leaves = self.result_leaves()
            self._tree = leaves if self._spec is None else _tree.unflatten(self._spec, leaves)
        return self._tree


def finish(batch: _Batch, out: list[Any], *, copy: Copy, ml_dtypes: bool, scalars: bool) -> None:
    """Wait for ``batch``'s copies, then put each leaf's array at its position in ``out``.

    Every device's event is waited for before any array is built (C17). The arrays are views
    into the staging blocks (copies with ``copy=True``; widened bfloat16/float8 are new
    arrays); a leaf met twice gets the same array at each of its positions.
    """
    for event in batch.events:
        event.synchronize()
    ml = ml_dtypes
    hosts, shapes, offsets, blocks = batch.leases, batch.shapes, batch.offsets, batch.blocks
    ndarray = np.ndarray
    last: torch.dtype | None = None
    wire: np.dtype[Any] = np.dtype(np.uint8)
    step = "view"
    for i, (position, dtype) in enumerate(zip(batch.positions, batch.dtypes, strict=True)):
        if dtype is not last:
            (wire, step), last = _WIRE[dtype], dtype
        block = blocks[i]
        if block >= 0:
            arr = ndarray(shapes[i], wire, hosts[block], offsets[i])
        else:
            arr = np.empty(shapes[i], wire)
        fresh = False
        if step != "view":
            if ml:
                arr = arr.view(_dtypes.ml_numpy_dtype(dtype))
            elif step == "bf16":
                arr, fresh = _dtypes.widen_bfloat16_bits(arr), True
            else:
                table = _dtypes.float8_table(dtype)
                arr, fresh = table[arr.reshape(-1)].reshape(arr.shape), True
        if scalars and arr.ndim == 0:
            out[position] = arr.item()
        elif copy and not fresh:
            out[position] = arr.copy()
        else:
            out[position] = arr
    for index, position in batch.dups:
        out[position] = out[batch.positions[index]]
    for guard in batch.guards:
        guard.clear()  # the copies are done: the blocks may be reused as soon as freed
