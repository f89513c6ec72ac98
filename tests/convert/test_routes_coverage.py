"""Inputs that take the rarer routes of the conversion pipeline, and what each must give.

``test_cpu_routes.py`` (the CPU routes of ``to_numpy``) and ``test_transfer.py`` (the engine)
cover the main routes. The tests here give the remaining inputs that a CPU can take through
the router (``tonumpy.convert``), the bulk passes (``tonumpy._convert._bulk``), the careful
converter (``tonumpy._convert._leaf``), the engine (``tonumpy._convert._transfer``, run on CPU
tensors through the ``HostEngine`` double of ``tests/_helpers/engine.py``) and the column policy
(``tonumpy._combine._columns``), so that every line of those modules that a CPU can reach is run by
some test (checked with ``coverage``). Each test
checks the result against a reference built from torch or NumPy directly, never which route
ran.
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np
import pytest
import torch

from _helpers.engine import HostEngine, convert_through, pending_through
from _helpers.trees import assert_same_tree
from tonumpy import (
    ConversionError,
    UnsupportedLeafError,
    concat,
    to_numpy,
    to_torch,
)

F32 = np.float32


def _reference(t: torch.Tensor, *, ml: bool = False, scalars: bool = False) -> Any:
    """What converting ``t`` must give, from torch alone."""
    t = t.detach().resolve_conj().resolve_neg()
    if scalars and t.dim() == 0:
        return t.item()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16) if ml else t.float().numpy()
    return t.numpy()


def _owns_its_memory(arr: np.ndarray, *inputs: torch.Tensor) -> None:
    """``arr`` is writable and shares no byte with the storage of any of ``inputs``."""
    assert arr.flags.writeable
    lo, hi = arr.ctypes.data, arr.ctypes.data + arr.nbytes
    for t in inputs:
        storage = t.untyped_storage()
        assert hi <= storage.data_ptr() or lo >= storage.data_ptr() + storage.nbytes()


# ------------------------------------------------------------------------------- the router


def test_repeated_leaves_the_engine_leaves_to_the_careful_path(host_engine: HostEngine) -> None:
    """A sparse or quantized tensor met twice among engine leaves converts once: one array,
    at both places, with the densified (dequantized) values."""
    sparse = torch.eye(3).to_sparse()
    quantized = torch.quantize_per_tensor(torch.arange(4.0), 0.5, 0, torch.qint8)
    tree = {"a": sparse, "b": [sparse, torch.ones(2)], "q": quantized, "q2": quantized}
    eye, values = np.eye(3, dtype=F32), np.arange(4, dtype=F32)
    want = {"a": eye, "b": [eye, np.ones(2, F32)], "q": values, "q2": values}
    for out in (convert_through(host_engine, tree), pending_through(host_engine, tree).result()):
        assert_same_tree(out, want)
        assert out["a"] is out["b"][0]
        assert out["q"] is out["q2"]


LONE = {
    "float32": lambda: torch.arange(6.0).reshape(2, 3),
    "bfloat16": lambda: torch.tensor([1.5, -2.0, 3.25], dtype=torch.bfloat16),
    "zero_d": lambda: torch.tensor(0.25),
    "int_0d": lambda: torch.tensor(-7),
    "transposed": lambda: torch.arange(6.0).reshape(2, 3).t(),
    "grad": lambda: torch.arange(3.0, requires_grad=True) * 2,
    "conj": lambda: torch.tensor([1 + 2j, -3j]).conj(),
}


@pytest.mark.parametrize("options", [{}, {"copy": True}, {"ml_dtypes": True}, {"scalars": True}])
@pytest.mark.parametrize("kind", LONE)
def test_lone_engine_leaf_waited_for_at_once(
    kind: str, options: dict[str, Any], host_engine: HostEngine
) -> None:
    """A tree with one device tensor: converted at once by to_numpy, sent through the engine
    by to_numpy_async; both give the tensor's own values, dtype and shape."""
    t = LONE[kind]()
    tree = {"x": t, "name": "run-1", "step": 3}
    want = {
        "x": _reference(t, ml=options.get("ml_dtypes", False), scalars="scalars" in options),
        "name": tree["name"],
        "step": 3,
    }
    for out in (
        convert_through(host_engine, tree, **options),
        pending_through(host_engine, tree, **options).result(),
    ):
        assert_same_tree(out, want, identical_objects=True)
        if options.get("copy") and isinstance(out["x"], np.ndarray):
            _owns_its_memory(out["x"], t)


def test_to_torch_refuses_what_torch_cannot_hold_naming_the_leaf() -> None:
    """A long double (scalar or array) has no torch dtype: the error names the leaf."""
    for leaf, shown in ((np.longdouble(1.5), "longdouble"), (np.ones(2, np.longdouble), "ndarray")):
        with pytest.raises(UnsupportedLeafError, match=rf"tree\['x'\] \({shown}") as raised:
            to_torch({"x": leaf, "ok": np.ones(1)})
        assert raised.value.path == ("x",)
        assert isinstance(raised.value, TypeError)


@pytest.mark.parametrize("name", ["int4", "uint4", "float4_e2m1fn", "float6_e2m3fn"])
def test_to_torch_keeps_ml_dtypes_arrays_torch_has_no_dtype_for(name: str) -> None:
    """An ml_dtypes array with no torch twin (int4, float4 unpacked, ...) stays as it is."""
    arr = np.arange(4).astype(getattr(ml_dtypes, name))
    out = to_torch({"x": arr, "y": np.ones(2, ml_dtypes.bfloat16)})
    assert out["x"] is arr
    assert out["y"].dtype == torch.bfloat16


def test_to_torch_keeps_numpy_scalars_torch_cannot_hold() -> None:
    """NumPy scalars torch cannot hold stay the very objects they were, as such arrays do."""
    tree = {"d": np.datetime64("2026-01-01"), "s": np.str_("x"), "b": np.bytes_(b"x")}
    out = to_torch(tree)
    assert_same_tree(out, tree)
    assert all(out[key] is tree[key] for key in tree)


# ---------------------------------------------------------------------------- the bulk passes


def test_ml_dtypes_bit_views_with_copy_true_own_their_memory() -> None:
    """ml_dtypes=True, copy=True: bf16/float8 bits as ml_dtypes arrays, every array a copy."""
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    tree = {
        "bf16": bits.view(torch.bfloat16),
        "f8": codes.view(torch.float8_e4m3fn),
        "f32": torch.arange(4.0),
        "text": "kept",
    }
    want = {
        "bf16": bits.numpy().view(ml_dtypes.bfloat16),
        "f8": codes.numpy().view(ml_dtypes.float8_e4m3fn),
        "f32": np.arange(4, dtype=F32),
        "text": tree["text"],
    }
    out = to_numpy(tree, ml_dtypes=True, copy=True)
    assert_same_tree(out, want, identical_objects=True)
    for key in ("bf16", "f8", "f32"):
        _owns_its_memory(out[key], tree[key])


def test_bfloat16_trees_with_copy_true_copy_the_other_leaves_too() -> None:
    """copy=True in a tree the bf16 upcast takes: the other dtypes are copies as well."""
    tree = [
        torch.tensor([1.5, -2.0], dtype=torch.bfloat16),
        torch.arange(3.0),
        torch.arange(4),
        torch.ones(2, requires_grad=True),
    ]
    out = to_numpy(tree, copy=True)
    assert_same_tree(out, [_reference(t) for t in tree])
    for arr, t in zip(out, tree, strict=True):
        _owns_its_memory(arr, t)


# --------------------------------------------------------------------------------- the engine


def test_engine_leaves_that_are_all_empty(host_engine: HostEngine) -> None:
    """Only empty tensors on the device: nothing to copy, arrays of the right dtype and shape."""
    tree = {
        "a": torch.empty(0),
        "b": torch.empty(0, 3, dtype=torch.bfloat16),
        "c": torch.empty(2, 0, dtype=torch.int64),
    }
    want = {
        "a": np.empty(0, F32),
        "b": np.empty((0, 3), F32),
        "c": np.empty((2, 0), np.int64),
    }
    assert_same_tree(convert_through(host_engine, tree), want)
    pending = pending_through(host_engine, tree)
    assert pending.done()
    assert_same_tree(pending.result(), want)


def test_packed_chunk_full_exactly_where_a_dtype_ends() -> None:
    """A chunk that fills up with the last leaf of one dtype: the next dtype starts a new one;
    values are unchanged and no packed copy exceeds the chunk size."""
    engine = HostEngine(chunk_bytes=96)
    doubles = [torch.arange(4.0, dtype=torch.float64) + i for i in range(3)]  # 3 x 32 bytes
    shorts = [torch.arange(3, dtype=torch.int16) - i for i in range(5)]  # 6 bytes each
    tree = {"doubles": doubles, "shorts": shorts}
    pending = pending_through(engine, tree)
    assert all(nbytes <= 96 for _, nbytes in engine.copies)
    assert_same_tree(
        pending.result(),
        {"doubles": [t.numpy() for t in doubles], "shorts": [t.numpy() for t in shorts]},
    )


# ----------------------------------------------------------------------- the careful converter


class _Unreadable(torch.Tensor):
    """A subclass whose every torch operation fails (as a broken wrapper class would)."""

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        raise RuntimeError("this tensor cannot be read")


def test_a_tensor_that_fails_every_operation_is_refused_naming_it() -> None:
    """Any failure inside the converter becomes an error naming the leaf's path and the cause,
    even for a tensor too broken to describe (its shape cannot be read)."""
    broken = torch.ones(2).as_subclass(_Unreadable)
    with pytest.raises(UnsupportedLeafError) as raised:
        to_numpy({"ok": torch.ones(1), "bad": [broken]})
    assert raised.value.path == ("bad", 0)
    message = str(raised.value)
    assert "tree['bad'][0] (_Unreadable)" in message
    assert "RuntimeError: this tensor cannot be read" in message


# ------------------------------------------------------------------------- the column policy


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (np.array(["2026-01-01"], "datetime64[D]"), np.array([1], "timedelta64[D]")),
        (np.array([1], np.int64), np.array(["2026-01-01"], "datetime64[D]")),
        (np.array([1.5]), np.array(["2026-01-01T00:00"], "datetime64[m]")),
    ],
    ids=["datetime_timedelta", "int_datetime", "float_datetime"],
)
def test_dtypes_with_nothing_in_common_are_an_error_naming_the_leaf(
    first: np.ndarray, second: np.ndarray
) -> None:
    """Chunks whose dtypes no dtype holds both of (or that NumPy cannot even promote)."""
    with pytest.raises(ConversionError, match=r"tree\['t'\] have dtypes .* no dtype holds") as e:
        concat([{"t": first}, {"t": second}])
    assert e.value.path == ("t",)


def test_bytes_and_str_chunks_are_refused_naming_the_leaf() -> None:
    """Bytes that are not ASCII cannot become str exactly: a ConversionError naming the leaf."""
    with pytest.raises(ConversionError, match=r"tree\['s'\]"):
        concat([{"s": np.array([b"\xff"])}, {"s": np.array(["a"])}])


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (np.array([1.5]), np.array(["x"])),
        (np.array([7], np.int8), np.array([b"x"])),
        (np.array([True]), np.array([1], "timedelta64[s]")),
    ],
    ids=["float_str", "int_bytes", "bool_timedelta"],
)
def test_numbers_do_not_become_text_or_durations(first: np.ndarray, second: np.ndarray) -> None:
    """A leaf's values keep their kind across chunks: no dtype holds a float as a string."""
    with pytest.raises(ConversionError, match=r"tree\['v'\]"):
        concat([{"v": first}, {"v": second}])
