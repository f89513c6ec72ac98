"""The batched device-to-host engine: packing, pinned staging, events, and its public face.

CPU tests pass the engine a double that takes CPU tensors (``HostEngine`` of
``tests/_helpers/engine.py``, through ``forced`` here and the ``host_engine`` fixture), which runs
the same grouping, packing, staging and unpacking code with pageable blocks.
CUDA tests (``@pytest.mark.cuda``) check what only a GPU can: races, streams, pinned memory.
"""

from __future__ import annotations

import gc
import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tonumpy
from _helpers.engine import CudaSpy, HostEngine, convert_through, pending_through
from _helpers.trees import LEAVES, assert_same_tree
from tonumpy import (
    ConversionError,
    PendingTransfer,
    to_numpy,
    to_numpy_async,
)
from tonumpy._convert import _transfer
from tonumpy._convert._staging import POOL
from tonumpy._dtypes import widen_bfloat16_bits

# ------------------------------------------------------------------------------------ helpers


def forced_pending(tree: Any, engine: HostEngine | None = None, **options: Any) -> PendingTransfer:
    """``to_numpy_async(tree)`` with the engine taking CPU tensors (``engine`` or a new one)."""
    return pending_through(HostEngine() if engine is None else engine, tree, **options)


def forced(tree: Any, engine: HostEngine | None = None, **options: Any) -> Any:
    """Convert ``tree`` with the engine taking CPU tensors."""
    return forced_pending(tree, engine, **options).result()


ENGINE_DTYPES = sorted(_transfer._WIRE, key=str)


def sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """A tensor of ``dtype`` whose bytes are arbitrary (every bit pattern may occur)."""
    gen = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    if dtype == torch.complex32:
        return torch.randn(*shape, 2, generator=gen).view(torch.complex64)[..., 0].to(dtype)
    raw = torch.randint(0, 256, (n * dtype.itemsize,), generator=gen, dtype=torch.int32)
    t = raw.to(torch.uint8).view(dtype).reshape(shape)
    if dtype.is_floating_point or dtype.is_complex:
        t = torch.where(torch.isnan(t), torch.zeros((), dtype=dtype), t)  # NaNs: test apart
    return t


SHAPES: dict[str, Callable[[torch.dtype], torch.Tensor]] = {
    "0d": lambda d: sample(d, ()),
    "empty": lambda d: sample(d, (0, 3)),
    "empty_0": lambda d: sample(d, (0,)),
    "vector": lambda d: sample(d, (7,)),
    "matrix": lambda d: sample(d, (3, 5)),
    "transposed": lambda d: sample(d, (3, 5)).t(),
    "step_slice": lambda d: sample(d, (6, 8))[::2, 1::3],
    "negative_offset_view": lambda d: sample(d, (4, 4))[1:, 2],
    "expanded": lambda d: sample(d, (1, 4)).expand(3, 4),
    "size1_dims": lambda d: sample(d, (1, 3, 1)),
    "channels_last": lambda d: sample(d, (2, 3, 4, 5)).contiguous(
        memory_format=torch.channels_last
    ),
}


# ------------------------------------------------------------ forced engine == plain path (CPU)


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "alone"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", ENGINE_DTYPES, ids=str)
def test_forced_engine_every_dtype_and_stride(dtype: torch.dtype, shape: str, packed: bool) -> None:
    """Every dtype, shape and stride, packed or sent alone, converts as the plain path."""
    engine = HostEngine(small_bytes=_transfer.SMALL_BYTES if packed else 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # complex32 is experimental
        t = SHAPES[shape](dtype)
        tree = {"t": t, "other": sample(torch.float32, (2,)), "big": torch.zeros(3)}
        for options in ({}, {"copy": True}, {"ml_dtypes": True}, {"scalars": True}):
            assert_same_tree(
                forced(tree, engine, **options),
                to_numpy(tree, **options),
                identical_objects=True,
            )


@pytest.mark.parametrize("leaf", LEAVES)
@pytest.mark.parametrize("copy", [None, True])
def test_forced_engine_every_leaf_kind(leaf: str, copy: bool | None) -> None:
    """Every leaf kind of the shared catalogue: same result through the engine (or fallback)."""
    make, _ = LEAVES[leaf]
    tree = [make(), torch.arange(3), "text", make()]
    assert_same_tree(forced(tree, copy=copy), to_numpy(tree, copy=copy), identical_objects=True)


def test_forced_engine_packs_small_leaves_into_one_copy() -> None:
    """Small leaves of many dtypes cross as one packed copy; a large one goes alone."""
    small = [sample(d, (5,), seed=i) for i, d in enumerate(ENGINE_DTYPES * 3)]
    large = torch.arange(_transfer.SMALL_BYTES // 4 + 1, dtype=torch.float32)
    engine = HostEngine()
    pending = forced_pending([*small, large], engine)
    assert len(engine.copies) == 2  # the small leaves packed together, the large one alone
    assert engine.copies[1] == ("cpu", large.nbytes)
    assert_same_tree(pending.result(), to_numpy([*small, large]), identical_objects=True)


def test_packed_views_are_aligned_and_share_one_block() -> None:
    """Each packed view starts at a multiple of its item size; all views share one block."""
    tree = [sample(d, (3,), seed=i) for i, d in enumerate(ENGINE_DTYPES)]
    tree += [torch.ones(5, dtype=torch.complex128), torch.ones(1, dtype=torch.int8)]
    out = forced(tree)
    # widened bf16/f8 arrays are fresh; every other array is a view into the staging block
    views = [a for a in out if isinstance(a.base, np.ndarray) and a.base.dtype == np.uint8]
    assert len(views) == len(tree) - len(_transfer._dtypes.ML_DTYPES)
    owner = views[0].base
    for arr in views:
        assert arr.base is owner
        assert arr.flags.aligned
        assert arr.__array_interface__["data"][0] % arr.dtype.itemsize == 0


def test_chunks_bound_the_packed_buffer() -> None:
    """With a small chunk size, packing splits into several copies; values are unchanged."""
    engine = HostEngine(chunk_bytes=100)
    tree = [sample(torch.float64, (4,), seed=i) for i in range(10)]  # 32 bytes each
    tree += [sample(torch.int16, (3,), seed=i) for i in range(10)]
    pending = forced_pending(tree, engine)
    sizes = [n for _, n in engine.copies]
    assert len(sizes) > 3
    assert max(sizes) <= 100
    assert sum(sizes) == sum(t.nbytes for t in tree)
    assert_same_tree(pending.result(), to_numpy(tree), identical_objects=True)


def test_per_device_grouping() -> None:
    """Leaves are grouped by source device: one packed copy and one host block per device."""
    tree = [sample(torch.float32, (4,), seed=i) for i in range(9)]
    engine = HostEngine(devices={id(t): torch.device("cpu", i % 3) for i, t in enumerate(tree)})
    pending = forced_pending(tree, engine)
    assert sorted(engine.copies) == [(f"cpu:{i}", 48) for i in range(3)]
    out = pending.result()
    assert_same_tree(out, to_numpy(tree), identical_objects=True)
    for i in range(9):
        assert out[i].base is out[(i + 3) % 9].base
        assert out[i].base is not out[i - 1].base


def test_duplicate_leaf_gives_one_shared_array() -> None:
    """A tensor appearing twice is moved once; both places hold the same array object."""
    t = torch.arange(4.0)
    out = forced({"a": t, "b": [t, t.clone()]}, copy=True)
    assert out["a"] is out["b"][0]
    assert out["b"][1] is not out["a"]
    np.testing.assert_array_equal(out["b"][1], out["a"])


def test_copy_none_views_keep_block_copy_true_is_compact() -> None:
    """copy=None returns views into the staging block; copy=True compact arrays of their own."""
    big = torch.arange(100_000, dtype=torch.float32)
    tree = {"small": torch.ones(3), "big": big}
    views = forced(tree)
    assert views["small"].base is not None
    assert not np.shares_memory(views["big"], big.numpy())
    own = forced(tree, copy=True)
    for arr in own.values():
        assert arr.flags.owndata
        assert arr.flags.c_contiguous


def test_copy_false_never_copies_cpu_tensors() -> None:
    """copy=False skips the engine: CPU leaves are zero-copy views, as in to_numpy."""
    t = torch.arange(5)
    out = forced({"t": t}, copy=False)
    assert np.shares_memory(out["t"], t.numpy())


def test_requires_grad_and_parameters_keep_no_graph() -> None:
    """Leaves needing grad go through detached; nothing in the result refers to the graph."""
    w = torch.nn.Parameter(torch.randn(3))
    y = w * 2
    out = forced({"w": w, "y": y, "z": torch.randn(2, dtype=torch.bfloat16, requires_grad=True)})
    np.testing.assert_array_equal(out["y"], (w.detach() * 2).numpy())
    assert isinstance(out["w"], np.ndarray)
    assert w.grad is None


def test_scalars_forced_match_plain() -> None:
    """scalars=True: 0-d leaves of every kind are the same Python scalars as the plain path."""
    tree = {
        "f": torch.tensor(0.25),
        "b": torch.tensor(True),
        "i": torch.tensor(-3),
        "u": torch.tensor(2**60, dtype=torch.uint64),
        "c": torch.tensor(1 - 2j),
        "bf": torch.tensor(1.5, dtype=torch.bfloat16),
        "f8": torch.tensor(2.0).to(torch.float8_e4m3fn),
        "nan": torch.tensor(float("nan")),
    }
    for ml in (False, True):
        got, want = forced(tree, scalars=True, ml_dtypes=ml), to_numpy(tree, scalars=True)
        assert_same_tree(got, want, identical_objects=True)


# ------------------------------------------------------------------------- host widening, bits


def test_bfloat16_widening_is_bit_exact_for_all_65536_patterns() -> None:
    """The 16-bit shift equals torch's own bf16 -> f32, NaN payloads, infs, subnormals too."""
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    want = bits.view(torch.bfloat16).float().view(torch.int32).numpy()
    got = widen_bfloat16_bits(bits.numpy().view(np.uint16)).view(np.int32)
    np.testing.assert_array_equal(got, want)
    # and through the engine (packed with another leaf, then widened on the host)
    out = forced([bits.view(torch.bfloat16), torch.ones(1)])[0]
    np.testing.assert_array_equal(out.view(np.int32), want)
    special = out[[p ^ 0x8000 for p in (0x7F80, 0x0001, 0x7FC0)]]  # +inf, subnormal, NaN
    assert np.isposinf(special[0])
    assert special[1] == np.float32(2.0**-133)
    assert np.isnan(special[2])


def test_bfloat16_ml_dtypes_view_is_bit_exact() -> None:
    """ml_dtypes=True gives the very bits, as ml_dtypes.bfloat16."""
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    out = forced({"x": bits.view(torch.bfloat16)}, ml_dtypes=True)["x"]
    assert out.dtype.name == "bfloat16"
    np.testing.assert_array_equal(out.view(np.int16), bits.numpy())


@pytest.mark.parametrize("name", sorted(n for n in map(str, _transfer._WIRE) if "float8" in n))
def test_float8_table_is_bit_exact(name: str) -> None:
    """All 256 float8 codes widen to the bits torch's own conversion gives."""
    dtype = getattr(torch, name.removeprefix("torch."))
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    want = codes.view(dtype).float().view(torch.int32).numpy()
    got = forced([codes.view(dtype)])[0]
    np.testing.assert_array_equal(got.view(np.int32), want)


def test_bfloat16_0d_widening_stays_an_array() -> None:
    """A 0-d bf16 tensor widens to a 0-d array, not a NumPy scalar."""
    out = forced(torch.tensor(2.5, dtype=torch.bfloat16))
    assert isinstance(out, np.ndarray)
    assert out.shape == ()
    assert out == 2.5


# -------------------------------------------------------------------------- hypothesis: trees

_shapes = st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple)


@st.composite
def _leaf(draw: st.DrawFn) -> torch.Tensor:
    dtype = draw(st.sampled_from(ENGINE_DTYPES))
    shape = draw(_shapes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = sample(dtype, shape, seed=draw(st.integers(0, 100)))
        view = draw(st.sampled_from(["none", "t", "flip", "conj", "neg"]))
        if view == "t" and t.dim() >= 2:
            t = t.transpose(0, -1)
        elif view == "flip" and t.dim() >= 1:
            t = t[::2]
        elif view == "conj" and t.is_complex() and dtype != torch.complex32:
            t = t.conj()
        elif view == "neg" and t.is_complex() and dtype != torch.complex32:
            t = t.conj().imag
    return t


@settings(max_examples=40, deadline=None)
@given(
    st.lists(_leaf(), min_size=1, max_size=12),
    st.sampled_from([None, True]),
    st.booleans(),
    st.booleans(),
)
def test_random_trees_match_plain_path(
    leaves: list[torch.Tensor], copy: bool | None, ml: bool, scalars: bool
) -> None:
    """Random mixes of dtypes, shapes and views: engine == plain path, for every option."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tree = {"xs": leaves, "again": leaves[0]}
        options = {"copy": copy, "ml_dtypes": ml, "scalars": scalars}
        assert_same_tree(forced(tree, **options), to_numpy(tree, **options), identical_objects=True)


# ---------------------------------------------------------------------------- C17-C21 on CPU


class _LateEvent:
    """Stands in for a CUDA event whose copy lands only when someone waits for it."""

    def __init__(self, land: Callable[[], None]) -> None:
        self.land = land
        self.waited = False

    def query(self) -> bool:
        return self.waited

    def synchronize(self) -> None:
        self.land()
        self.waited = True


def test_c17_arrays_are_built_only_after_the_wait() -> None:
    """C17: with bytes arriving late, done() is False and result() reads them only after."""
    tree = {
        "bf": torch.tensor([1.5, -2.0], dtype=torch.bfloat16),
        "x": torch.arange(6.0).reshape(2, 3),
    }
    pending = forced_pending(tree, copy=True)
    assert pending._batch is not None
    lease = pending._batch.leases[0]
    assert lease is not None
    arrived = lease.copy()
    lease[:] = 0xAB  # what a read before the sync would see
    pending._batch.events.append(_LateEvent(lambda: np.copyto(lease, arrived)))
    assert not pending.done()
    out = pending.result()
    assert pending.done()
    np.testing.assert_array_equal(out["bf"], [1.5, -2.0])
    np.testing.assert_array_equal(out["x"], np.arange(6.0).reshape(2, 3))
    assert pending.result() is out


def test_c18_only_cuda_tensors_are_engine_leaves() -> None:
    """C18: CPU tensors (and so MPS, XPU, ...) never reach the engine unless forced; sparse,
    quantized and nested ones not even then: no copy is enqueued for them."""
    tree = {"a": torch.ones(3), "b": [torch.zeros(2, dtype=torch.bfloat16)], "c": 1}
    for options in ({}, {"copy": True}, {"scalars": True}):
        spy = CudaSpy()
        pending = pending_through(spy, tree, **options)
        assert spy.copies == []
        assert pending.done()
        assert_same_tree(pending.result(), to_numpy(tree, **options), identical_objects=True)
    odd = [torch.ones(2).to_sparse(), torch.quantize_per_tensor(torch.ones(2), 0.5, 0, torch.qint8)]
    engine = HostEngine()
    pending = forced_pending(odd, engine)
    assert engine.copies == []
    assert pending.done()
    assert_same_tree(pending.result(), to_numpy(odd), identical_objects=True)
    engine = HostEngine()
    forced_pending([torch.ones(2)], engine)
    assert engine.copies == [("cpu", 8)]


def test_functorch_wrapped_leaf_takes_the_careful_path() -> None:
    """Inside vmap, a wrapped tensor is refused with the careful path's error, naming it."""

    def inner(x: torch.Tensor) -> torch.Tensor:
        with pytest.raises(tonumpy.UnsupportedLeafError, match=r"tree\['x'\].*torch\.func"):
            forced({"x": x, "y": torch.ones(2)})
        return x

    torch.vmap(inner)(torch.ones(2, 3))


def test_c19_staging_blocks_are_reused_and_bounded() -> None:
    """C19: a freed block is reused; one still viewed by a live array is not; idle is bounded."""
    POOL.clear()
    first = forced([torch.arange(1000.0)])
    block_of_first = first[0].base
    again = forced([torch.arange(1000.0) + 1])
    assert not np.shares_memory(again[0], first[0])  # first is still alive: not reused
    np.testing.assert_array_equal(first[0], np.arange(1000.0, dtype=np.float32))
    ptr = again[0].__array_interface__["data"][0]
    del again
    gc.collect()
    third = forced([torch.arange(1000.0) + 2])
    assert third[0].__array_interface__["data"][0] == ptr
    del block_of_first, first, third
    old = tonumpy.asynchronous.set_pinned_pool_limit(0)
    try:
        forced([torch.arange(1000.0)], copy=True)
        assert POOL.idle_bytes == 0
    finally:
        tonumpy.asynchronous.set_pinned_pool_limit(old)
    assert POOL.idle_bytes == 0
    forced([torch.arange(1000.0)], copy=True)  # copy=True: the block returns at once
    assert POOL.idle_bytes == POOL.size_class(4000)


def test_c19_block_with_copies_in_flight_is_not_reused() -> None:
    """A block given back while its copies may still run waits for its events first."""
    POOL.clear()
    pending_event = _LateEvent(lambda: None)
    _, lease, guard = POOL.lease(1000, pinned=False)
    guard.append(pending_event)
    ptr = lease.ctypes.data
    del lease
    gc.collect()
    _, other, _ = POOL.lease(1000, pinned=False)
    assert other.ctypes.data != ptr
    pending_event.waited = True
    del other
    gc.collect()
    ptrs = {POOL.lease(1000, pinned=False)[1].ctypes.data for _ in range(2)}
    assert ptr in ptrs


def test_pool_limit_rejects_negative() -> None:
    """A negative (or non-int) limit is a clear OptionError (a ValueError and a TypeError)."""
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match=">= 0"):
            tonumpy.asynchronous.set_pinned_pool_limit(bad)  # type: ignore[arg-type]


def test_c20_conj_and_neg_views_are_resolved() -> None:
    """C20: conjugate and negative views (complex and real) give their true values."""
    z = torch.complex(torch.arange(4.0), torch.arange(4.0) + 10)
    real_neg = torch._neg_view(torch.arange(3.0))
    assert real_neg.is_neg()
    tree = {"conj": z.conj(), "neg": z.conj().imag, "real_neg": real_neg, "conj_t": z[::2].conj()}
    out = forced(tree)
    np.testing.assert_array_equal(out["conj"], np.conj(z.numpy()))
    np.testing.assert_array_equal(out["neg"], -(z.numpy().imag))
    np.testing.assert_array_equal(out["real_neg"], -np.arange(3.0, dtype=np.float32))
    np.testing.assert_array_equal(out["conj_t"], np.conj(z.numpy()[::2]))
    assert z.conj().is_conj()  # the input is untouched


def test_c21_one_wait_per_device_and_all_before_any_array() -> None:
    """C21: result() waits for every device's event before it builds any array."""
    tree = [torch.arange(3.0), torch.arange(4)]
    pending = forced_pending(tree, copy=True)
    assert pending._batch is not None
    lease = pending._batch.leases[0]
    assert lease is not None
    arrived = lease.copy()
    lease[:] = 0
    order: list[str] = []
    early = _LateEvent(lambda: order.append("device 0"))
    late = _LateEvent(lambda: (order.append("device 1"), np.copyto(lease, arrived)))
    pending._batch.events += [early, late]
    out = pending.result()
    assert order == ["device 0", "device 1"]
    np.testing.assert_array_equal(out[0], [0.0, 1.0, 2.0])


# ---------------------------------------------------- to_numpy integration, the engine on CPU


OPTIONS = [{}, {"copy": True}, {"scalars": True}, {"ml_dtypes": True}, {"copy": False}]


@pytest.mark.parametrize("options", OPTIONS, ids=["default", "copy", "scalars", "ml", "no_copy"])
def test_to_numpy_integration_batches_device_leaves(options: dict[str, Any]) -> None:
    """Every leaf kind, with the engine taking the plain tensors: to_numpy's own results."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tree: dict[str, Any] = {
            name: make()
            for name, (make, _) in LEAVES.items()
            if options.get("copy") is not False or name in {"float32", "ndarray", "int8"}
        }
        tree["dup"] = [tree["float32"], tree["float32"]]
        tree["text"] = "keep"
        want = to_numpy(tree, **options)
        engine = HostEngine()
        pending = forced_pending(tree, engine, **options)
        got = convert_through(HostEngine(), tree, **options)
        # copy=False: every engine leaf would need a copy, so none is enqueued
        assert bool(engine.copies) is (options.get("copy") is not False)
        assert_same_tree(got, want, identical_objects=True)
        assert_same_tree(pending.result(), want, identical_objects=True)
    if not options.get("scalars"):
        assert got["dup"][0] is got["dup"][1]


def test_lone_device_leaf_converts_as_the_plain_path() -> None:
    """A single leaf, waited for at once, gives the plain path's result (small or large)."""
    big = torch.arange(2 << 14, dtype=torch.float32)
    engine = HostEngine()
    assert_same_tree(
        convert_through(engine, {"x": torch.ones(3)}),
        {"x": np.ones(3, np.float32)},
        identical_objects=True,
    )
    half = convert_through(engine, torch.tensor(1.5, dtype=torch.bfloat16))
    assert_same_tree(half, np.array(1.5, np.float32), identical_objects=True)
    assert convert_through(engine, torch.tensor(2), scalars=True) == 2
    np.testing.assert_array_equal(convert_through(engine, big), big.numpy())


# ----------------------------------------------------------------------- to_numpy_async (CPU)


def test_to_numpy_async_on_cpu_is_done_and_equals_to_numpy() -> None:
    """Without CUDA leaves the handle is done at once and gives to_numpy's result."""
    tree = {"a": torch.ones(2, requires_grad=True), "b": (torch.tensor(3), "x"), "c": None}
    pending = to_numpy_async(tree, scalars=True)
    assert isinstance(pending, PendingTransfer)
    assert pending.done()
    assert_same_tree(pending.result(), to_numpy(tree, scalars=True), identical_objects=True)
    assert pending.result() is pending.result()
    assert pending.result_leaves()[1] == 3


def test_to_numpy_async_trees_without_leaves() -> None:
    """Empty containers and None come back as they are, already done."""
    assert to_numpy_async([]).result() == []
    assert to_numpy_async(None).result() is None
    assert to_numpy_async({"a": ()}).result() == {"a": ()}


def test_to_numpy_async_raises_at_the_call_naming_the_path() -> None:
    """Errors about leaves converted right away are raised by to_numpy_async itself."""
    with pytest.raises(tonumpy.UnsupportedLeafError, match=r"tree\['m'\]"):
        to_numpy_async({"m": torch.empty(2, device="meta")})


def test_to_numpy_async_options_are_keyword_only_and_is_leaf_works() -> None:
    """The tree is positional-only, options keyword-only; is_leaf stops the walk."""
    with pytest.raises(TypeError):
        to_numpy_async(torch.ones(1), None)  # type: ignore[misc]
    out = to_numpy_async([(1, 2), torch.ones(1)], is_leaf=lambda n: isinstance(n, tuple))
    assert out.result()[0] == (1, 2)


def test_engine_and_careful_leaves_share_one_result() -> None:
    """Forced engine leaves and careful-path leaves (sparse, strings) share one result."""
    sparse = torch.eye(3).to_sparse()
    tree = {"dense": torch.ones(2), "sparse": sparse, "s": "keep", "arr": np.arange(2)}
    out = forced(tree)
    np.testing.assert_array_equal(out["sparse"], np.eye(3, dtype=np.float32))
    assert out["s"] == "keep"
    assert out["arr"] is tree["arr"]


def test_copy_false_error_from_the_engine_path_names_path() -> None:
    """copy=False with a leaf that needs a copy raises ConversionError naming it."""
    with pytest.raises(ConversionError, match=r"tree\['q'\]"):
        forced({"q": torch.ones(2, dtype=torch.bfloat16)}, copy=False)


# ==================================================================================== CUDA


def _cuda_leaves() -> dict[str, torch.Tensor]:
    """One of each kind the engine meets on a GPU, built on the device."""
    dev = "cuda"
    base = torch.arange(12, dtype=torch.float32, device=dev).reshape(3, 4) - 5.5
    z = torch.complex(base, -base)
    return {
        "float32": base,
        "float16": base.half(),
        "bfloat16": base.bfloat16(),
        "float8": base.to(torch.float8_e4m3fn),
        "int64": torch.arange(-3, 3, device=dev),
        "uint16": torch.arange(5, device=dev, dtype=torch.int32).to(torch.uint16),
        "bool": base > 0,
        "complex64": z,
        "complex128": z.to(torch.complex128),
        "conj": z.conj(),
        "neg": z.conj().imag,
        "real_neg": torch._neg_view(base),
        "transposed": base.t(),
        "step_slice": base[::2, 1::2],
        "expanded": base[:1].expand(5, 4),
        "zero_dim": torch.tensor(3.25, device=dev),
        "empty": torch.empty(0, 5, device=dev),
        "grad": base.clone().requires_grad_() * 2,
        "parameter": torch.nn.Parameter(base.clone()),
        "large": torch.arange(3 * (1 << 20) // 4, dtype=torch.float32, device=dev),
        "large_transposed": torch.randn(1024, 512, device=dev).t(),
        "sparse": base.to_sparse(),
    }


def _naive(tree: Any, **options: Any) -> Any:
    """The per-leaf reference: each tensor moved with a blocking .cpu(), then converted."""
    return to_numpy(tonumpy.apply(lambda t: t.cpu(), tree), **options)


@pytest.mark.cuda
@pytest.mark.parametrize(
    "options",
    [{}, {"copy": True}, {"ml_dtypes": True}, {"scalars": True}],
    ids=["default", "copy", "ml_dtypes", "scalars"],
)
def test_cuda_everything_identical_to_naive(options: dict[str, Any]) -> None:
    """Every CUDA leaf kind, sync and async: identical to naive per-leaf conversion."""
    tree = _cuda_leaves()
    want = _naive(tree, **options)
    assert_same_tree(to_numpy(tree, **options), want, identical_objects=True)
    assert_same_tree(to_numpy_async(tree, **options).result(), want, identical_objects=True)
    for name, leaf in tree.items():  # each alone too (the lone-leaf shortcut)
        assert_same_tree(to_numpy(leaf, **options), want[name], identical_objects=True)


@pytest.mark.cuda
def test_cuda_race_stream_delayed_before_the_copy() -> None:
    """C17: the stream sleeps before writing the data; the arrays still hold the final values."""
    leaves = [torch.zeros(1000, device="cuda") for _ in range(50)]
    big = torch.zeros(8 << 20, device="cuda")
    torch.cuda.synchronize()
    torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time on the current stream
    for i, t in enumerate(leaves):
        t.fill_(i + 1)
    big.fill_(-1)
    pending = to_numpy_async({"leaves": leaves, "big": big})
    assert not pending.done()
    out = pending.result()
    assert pending.done()
    for i, arr in enumerate(out["leaves"]):
        assert (arr == i + 1).all()
    assert (out["big"] == -1).all()
    # the synchronous path too
    torch.cuda._sleep(200_000_000)
    for t in leaves:
        t.fill_(7)
    assert all((arr == 7).all() for arr in to_numpy(leaves))


@pytest.mark.cuda
def test_cuda_snapshot_is_in_stream_order() -> None:
    """Kernels enqueued after to_numpy_async on the same stream do not change the result."""
    x = torch.ones(1 << 16, device="cuda")
    torch.cuda._sleep(100_000_000)
    pending = to_numpy_async([x, x[:10]])
    x.fill_(5)
    out = pending.result()
    assert (out[0] == 1).all()
    assert (out[1] == 1).all()


@pytest.mark.cuda
def test_cuda_several_streams() -> None:
    """C21: copies run on the caller's current stream; side-stream producers are respected."""
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)
        produced = [torch.full((100,), float(i), device="cuda") for i in range(20)]
        out = to_numpy_async(produced).result()  # enqueued on `side`, after the sleep
    assert all((arr == i).all() for i, arr in enumerate(out))
    other = torch.cuda.Stream()
    with torch.cuda.stream(other):
        torch.cuda._sleep(100_000_000)
        late = torch.full((100,), 3.0, device="cuda")
    torch.cuda.current_stream().wait_stream(other)
    assert (to_numpy([late, late[:5]])[0] == 3).all()


@pytest.mark.cuda
def test_cuda_staging_is_pinned_and_reused() -> None:
    """C19: host blocks are pinned, and a freed block is reused by the next transfer."""
    tree = [torch.arange(1000.0, device="cuda") for _ in range(3)]
    out = to_numpy(tree)
    lease = out[0].base
    assert isinstance(lease.base, torch.Tensor)
    assert lease.base.is_pinned()
    ptr = lease.ctypes.data
    del out, lease
    gc.collect()
    again = to_numpy(tree)
    assert again[0].base.ctypes.data == ptr


@pytest.mark.cuda
def test_cuda_packs_ten_thousand_leaves_into_one_copy() -> None:
    """10,000 small leaves: one packed copy, one event, values right."""
    tree = [torch.full((16,), float(i), device="cuda") for i in range(10_000)]
    spy = CudaSpy()
    pending = pending_through(spy, tree)
    assert spy.copies == [("cuda:0", 16 * 4 * 10_000)]
    assert len(pending._batch.events) == 1
    out = pending.result()
    assert all(arr[0] == i for i, arr in enumerate(out))


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_cuda_two_devices_one_event_each() -> None:
    """C21: leaves on two GPUs: one packed copy and one event per device."""
    tree = {f"d{d}": [torch.full((8,), float(d), device=f"cuda:{d}")] * 3 for d in range(2)}
    tree["x"] = [torch.arange(4, device="cuda:1"), torch.arange(4, device="cuda:0")]
    spy = CudaSpy()
    pending = pending_through(spy, tree)
    assert len(pending._batch.events) == 2
    assert sorted(d for d, _ in spy.copies) == ["cuda:0", "cuda:1"]
    assert_same_tree(pending.result(), _naive(tree), identical_objects=True)


@pytest.mark.cuda
def test_cuda_copy_false_raises_naming_path() -> None:
    """copy=False with a CUDA leaf raises, from the sync and the async API alike."""
    with pytest.raises(ConversionError, match=r"tree\['g'\]"):
        to_numpy({"g": torch.ones(2, device="cuda"), "h": torch.ones(2, device="cuda")}, copy=False)
    with pytest.raises(ConversionError, match=r"tree\['g'\]"):
        to_numpy_async({"g": torch.ones(2, device="cuda")}, copy=False)


@pytest.mark.cuda
def test_cuda_dropped_handle_does_not_corrupt_the_next_transfer() -> None:
    """A handle dropped mid-copy: its block is not reused until that copy has landed."""
    POOL.clear()
    x = torch.full((1 << 18,), 1.0, device="cuda")
    torch.cuda._sleep(400_000_000)  # the first copy lands ~0.2 s from now
    pending = to_numpy_async([x, x[:3]])
    del pending
    gc.collect()
    other = torch.cuda.Stream()
    with torch.cuda.stream(other):  # not ordered after the first copy: lands first
        y = torch.full((1 << 18,), 2.0, device="cuda")
        out = to_numpy([y, y[:3]])
    torch.cuda.synchronize()  # the first copy has landed now, wherever it went
    assert (out[0] == 2).all()
    assert (out[1] == 2).all()


@pytest.mark.cuda
def test_cuda_bfloat16_and_float8_bits_cross_exactly() -> None:
    """All bf16 and float8 bit patterns, moved from the GPU and widened on the host: exact."""
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    tree = {
        "bf16": bits.view(torch.bfloat16).cuda(),
        "f8": codes.view(torch.float8_e5m2).cuda(),
    }
    out = to_numpy(tree)
    want_bf16 = bits.view(torch.bfloat16).float().view(torch.int32).numpy()
    want_f8 = codes.view(torch.float8_e5m2).float().view(torch.int32).numpy()
    np.testing.assert_array_equal(out["bf16"].view(np.int32), want_bf16)
    np.testing.assert_array_equal(out["f8"].view(np.int32), want_f8)
    ml = to_numpy(tree, ml_dtypes=True)
    np.testing.assert_array_equal(ml["bf16"].view(np.int16), bits.numpy())


@pytest.mark.cuda
def test_cuda_copy_true_gives_compact_independent_arrays() -> None:
    """copy=True: every array owns its memory; copy=None: views of one pinned block."""
    tree = [torch.arange(10.0, device="cuda"), torch.ones(3, 4, device="cuda").t()]
    for arr in to_numpy(tree, copy=True):
        assert arr.flags.owndata
        assert arr.flags.c_contiguous
    views = to_numpy(tree)
    assert views[0].base is views[1].base
    assert views[0].base.base.is_pinned()
