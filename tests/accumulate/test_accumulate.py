"""Tests of ``concat`` and ``Accumulator``: ragged batches, dtypes, structure errors, disk mode."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections import namedtuple
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import tonumpy
from _helpers.engine import HostEngine, accumulating
from _helpers.trees import assert_same_tree
from tonumpy import Accumulator, ConversionError, concat
from tonumpy._combine import _storage
from tonumpy._combine._columns import Column, copy_padded
from tonumpy._combine._pad import check_pad_value, pad_value_for

# ---------------------------------------------------------------------------- helpers


def reference_concat(arrays: list[np.ndarray], pad: Any) -> np.ndarray:
    """Concatenate along axis 0, padding every other axis to the largest size (the obvious way)."""
    full = [a for a in arrays if a.shape[0] > 0] or arrays
    target = tuple(max(a.shape[d] for a in full) for d in range(1, arrays[0].ndim))
    rows = sum(a.shape[0] for a in arrays)
    out = np.full((rows, *target), pad, dtype=arrays[0].dtype)
    start = 0
    for a in arrays:
        if a.shape[0]:
            region = (slice(start, start + a.shape[0]), *(slice(0, s) for s in a.shape[1:]))
            out[region] = a
            start += a.shape[0]
    return out


def eval_batches(n: int = 5, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """An evaluation loop's outputs: ragged logits and labels, a 0-d loss."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        length = int(torch.randint(2, 6, (), generator=gen))
        batches.append(
            {
                "logits": torch.randn(3, length, 4, generator=gen),
                "labels": torch.randint(0, 9, (3, length), generator=gen),
                "loss": torch.rand((), generator=gen),
            }
        )
    return batches


PAD = {"logits": float("nan"), "labels": -100}


# ---------------------------------------------------------------------------- concat


def test_concat_equal_shapes_is_np_concatenate() -> None:
    """Batches of one shape give exactly np.concatenate's result, leaf by leaf."""
    batches = [{"x": torch.arange(6.0).reshape(2, 3) + i} for i in range(3)]
    out = concat(batches)
    expected = np.concatenate([b["x"].numpy() for b in batches])
    np.testing.assert_array_equal(out["x"], expected)
    assert out["x"].dtype == np.float32


def test_ragged_in_one_dimension() -> None:
    """Labels of different lengths are padded at the end of dim 1 with the given value."""
    out = concat(
        [torch.ones(2, 3, dtype=torch.int64), torch.zeros(1, 5, dtype=torch.int64)], pad_value=-100
    )
    assert out.shape == (3, 5)
    np.testing.assert_array_equal(out[0], [1, 1, 1, -100, -100])
    np.testing.assert_array_equal(out[2], [0, 0, 0, 0, 0])


def test_ragged_in_several_dimensions() -> None:
    """Every differing dimension is padded, not only dim 1 (transformers pads only dim 1)."""
    a = np.ones((1, 2, 5, 3), dtype=np.float32)
    b = np.full((2, 4, 3, 3), 2.0, dtype=np.float32)
    out = concat([a, torch.from_numpy(b)], pad_value=-1.0)
    assert out.shape == (3, 4, 5, 3)
    np.testing.assert_array_equal(out, reference_concat([a, b], -1.0))
    assert (out[0, 2:] == -1).all()
    assert (out[1:, :, 3:] == -1).all()


def test_ragged_without_pad_value_names_path_and_shapes() -> None:
    """Ragged batches and no pad value: the error names the leaf and its shapes."""
    batches = [{"out": {"ids": torch.ones(2, 3)}}, {"out": {"ids": torch.ones(2, 4)}}]
    with pytest.raises(
        ConversionError, match=r"tree\['out'\]\['ids'\].*\(2, 3\), \(2, 4\)"
    ) as info:
        concat(batches)
    assert info.value.path == ("out", "ids")


@pytest.mark.parametrize(
    ("pad_value", "expected_labels", "expected_hidden"),
    [
        pytest.param({("labels",): -100, ("hidden",): 0.5}, -100, 0.5, id="exact-paths"),
        pytest.param({"labels": -100, "hidden": 0.5}, -100, 0.5, id="bare-keys"),
        pytest.param({(): 7, "labels": -100}, -100, 7.0, id="default-and-override"),
        pytest.param({("hidden", 1): 0.5, (): 1}, 1, 0.5, id="longest-prefix"),
        pytest.param(
            lambda path, dtype: -100 if dtype.kind == "i" else 0.25, -100, 0.25, id="callable"
        ),
    ],
)
def test_per_path_pad_values(pad_value: Any, expected_labels: int, expected_hidden: float) -> None:
    """Pad values can depend on the leaf: by key path, by prefix, or via a callable."""
    batches = [
        {
            "labels": torch.ones(1, 2, dtype=torch.int64),
            "hidden": (torch.ones(1, 2), torch.ones(1, 2)),
        },
        {
            "labels": torch.ones(1, 3, dtype=torch.int64),
            "hidden": (torch.ones(1, 3), torch.ones(1, 3)),
        },
    ]
    out = concat(batches, pad_value=pad_value)
    assert out["labels"][0, 2] == expected_labels
    assert out["hidden"][1][0, 2] == expected_hidden
    assert out["labels"].dtype == np.int64
    assert out["hidden"][1].dtype == np.float32


def test_mapping_without_a_value_for_a_ragged_leaf_is_an_error() -> None:
    """A mapping that does not cover a ragged leaf leaves it without a pad value."""
    batches = [
        {"a": torch.ones(1, 2), "b": torch.ones(1, 2)},
        {"a": torch.ones(1, 3), "b": torch.ones(1, 3)},
    ]
    with pytest.raises(ConversionError, match=r"tree\['b'\]"):
        concat(batches, pad_value={"a": 0.0})


@pytest.mark.parametrize(
    ("dtype", "pad"),
    [
        (torch.bool, False),
        (torch.bool, True),
        (torch.int8, -100),
        (torch.int16, -100),
        (torch.uint8, 255),
        (torch.int32, -1),
        (torch.float16, float("-inf")),
        (torch.float64, float("nan")),
    ],
)
def test_padding_keeps_dtype(dtype: torch.dtype, pad: Any) -> None:
    """bool, int and float leaves keep their dtype when padded (accelerate #3218 changed bool)."""
    out = concat([torch.zeros(1, 2, dtype=dtype), torch.zeros(1, 3, dtype=dtype)], pad_value=pad)
    assert out.dtype == torch.empty(0, dtype=dtype).numpy().dtype
    np.testing.assert_array_equal(out[0, 2], np.asarray(pad).astype(out.dtype))


def test_bfloat16_keeps_dtype_with_ml_dtypes() -> None:
    """bf16 tensors stay bf16 (bit-exact) with ml_dtypes=True, padding included."""
    a = torch.tensor([[1.5, 2.5]], dtype=torch.bfloat16)
    b = torch.tensor([[3.0, 4.0, 5.0]], dtype=torch.bfloat16)
    out = concat([a, b], pad_value=-100, ml_dtypes=True)
    assert out.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(out.astype(np.float32), [[1.5, 2.5, -100], [3, 4, 5]])
    widened = concat([a, b], pad_value=-100)
    assert widened.dtype == np.float32


@pytest.mark.parametrize(
    ("dtype", "pad"),
    [
        (np.uint8, -100),
        (np.bool_, -100),
        (np.int64, 0.5),
        (np.int32, float("nan")),
        (np.float16, 1e10),
        (ml_dtypes.float8_e4m3fn, float("inf")),
    ],
)
def test_unrepresentable_pad_value_is_an_error(dtype: Any, pad: Any) -> None:
    """A pad value the dtype cannot hold is an error naming the leaf, never a dtype change."""
    arrays = [np.zeros((1, 2), dtype=dtype), np.zeros((1, 3), dtype=dtype)]
    with pytest.raises(ConversionError, match=r"cannot be represented.*tree\['x'\]"):
        concat([{"x": a} for a in arrays], pad_value=pad)


def test_pad_value_only_checked_when_needed() -> None:
    """A leaf that is not ragged never needs its pad value, so an unfit one is no error."""
    out = concat([np.zeros((1, 2), dtype=np.uint8)] * 2, pad_value=-100)
    assert out.dtype == np.uint8


def test_zero_d_leaves_are_stacked() -> None:
    """0-d leaves (a loss) become a 1-d array with one value per batch (transformers #6750)."""
    out = concat(
        [
            {"loss": torch.tensor(0.5)},
            {"loss": np.float32(0.25)},
            {"loss": np.array(1.0, np.float32)},
        ]
    )
    np.testing.assert_array_equal(out["loss"], np.array([0.5, 0.25, 1.0], dtype=np.float32))


def test_batch_of_size_one_is_not_squeezed() -> None:
    """A last batch of one item keeps its batch dimension."""
    out = concat([torch.ones(4, 3), torch.ones(1, 3)])
    assert out.shape == (5, 3)
    out = concat([torch.ones(1, 3)])
    assert out.shape == (1, 3)


def test_empty_batches_take_no_part_in_the_shape() -> None:
    """Batches with no rows add nothing and do not widen the padded shape."""
    batches = [torch.zeros(0, 9), torch.ones(2, 3), torch.zeros(0, 1), torch.ones(1, 2)]
    out = concat(batches, pad_value=-1.0)
    assert out.shape == (3, 3)
    np.testing.assert_array_equal(out[2], [1, 1, -1])


def test_only_empty_batches() -> None:
    """All batches empty: an empty result of the largest shape."""
    out = concat([np.zeros((0, 2), np.int16), np.zeros((0, 4), np.int16)], pad_value=0)
    assert out.shape == (0, 4)
    assert out.dtype == np.int16


def test_empty_batch_does_not_promote_dtype() -> None:
    """An empty placeholder (a rank with no samples) does not change the dtype."""
    out = concat([np.zeros((0, 3), np.float64), np.ones((2, 3), np.float16)])
    assert out.dtype == np.float16


def test_non_array_leaves_become_lists() -> None:
    """Strings and Python numbers are collected into a list of the values."""
    out = concat(
        [{"id": "a", "step": 1, "x": torch.ones(1)}, {"id": "b", "step": 2, "x": torch.ones(1)}]
    )
    assert out["id"] == ["a", "b"]
    assert out["step"] == [1, 2]


Point = namedtuple("Point", "x y")


@dataclasses.dataclass
class Output:
    logits: Any
    extra: Any = None


@pytest.mark.parametrize(
    ("first", "second", "path"),
    [
        pytest.param({"a": 1, "b": 2}, {"a": 1, "c": 2}, ("b",), id="dict-key"),
        pytest.param({"a": [1, 2]}, {"a": [1, 2, 3]}, ("a",), id="list-length"),
        pytest.param(
            {"a": {"b": [1, {"c": 1}]}}, {"a": {"b": [1, {"d": 1}]}}, ("a", "b", 1, "c"), id="deep"
        ),
        pytest.param([1, (2, 3)], [1, [2, 3]], (1,), id="tuple-vs-list"),
        pytest.param({"a": None}, {"a": 1}, ("a",), id="none-vs-leaf"),
        pytest.param(Point(1, [2]), Point(1, [2, 3]), (1,), id="namedtuple"),
        pytest.param(Output(1), Output(1, extra=[1]), ("extra",), id="dataclass"),
    ],
)
def test_structure_mismatch_names_first_differing_path(
    first: Any, second: Any, path: tuple[Any, ...]
) -> None:
    """Trees of different structure: ConversionError with the first differing path."""
    with pytest.raises(
        ConversionError, match="trees\\[1\\] does not have the structure of trees\\[0\\]"
    ) as info:
        concat([first, first, second][1:])
    assert info.value.path == path


def test_rank_and_kind_mismatch() -> None:
    """A leaf that changes rank, or from array to 0-d, is an error naming its path."""
    with pytest.raises(ConversionError, match=r"tree\['x'\].*numbers of dimensions"):
        concat([{"x": torch.ones(2, 3)}, {"x": torch.ones(2)}])
    with pytest.raises(ConversionError, match=r"tree\['x'\] is an array in trees\[0\] but a 0-d"):
        concat([{"x": torch.ones(2)}, {"x": torch.tensor(1.0)}])
    with pytest.raises(ConversionError, match=r"non-array value"):
        concat([{"x": torch.ones(2)}, {"x": "text"}])


def test_mixed_tensor_and_array_input() -> None:
    """Tensors and arrays mix freely, batch by batch and leaf by leaf."""
    out = concat(
        [
            {"x": torch.ones(2, 2), "y": np.zeros(1)},
            {"x": np.zeros((1, 2), np.float32), "y": torch.ones(2, dtype=torch.float64)},
        ]
    )
    np.testing.assert_array_equal(out["x"], [[1, 1], [1, 1], [0, 0]])
    np.testing.assert_array_equal(out["y"], [0, 1, 1])


def test_dtype_promotion_between_batches() -> None:
    """Batches of different dtypes are promoted like np.concatenate does."""
    out = concat([np.ones(2, np.int16), np.ones(2, np.int32)])
    assert out.dtype == np.int32


def test_axis() -> None:
    """axis=1 concatenates along dim 1 and pads the others; negative axes count from the end."""
    a, b = np.ones((2, 3), np.int8), np.zeros((3, 1), np.int8)
    out = concat([a, b], axis=1, pad_value=-1)
    assert out.shape == (3, 4)
    assert out.flags.c_contiguous
    np.testing.assert_array_equal(out[2], [-1, -1, -1, 0])
    np.testing.assert_array_equal(concat([a, b], axis=-1, pad_value=-1), out)
    with pytest.raises(ConversionError, match="axis=2 is out of bounds"):
        concat([a, b], axis=2)


def test_results_own_their_memory_and_inputs_are_untouched() -> None:
    """The result shares memory with no input, and the inputs are not modified."""
    t = torch.ones(2, 3)
    arr = np.ones((2, 3), np.float32)
    out = concat([t])
    assert out.base is None
    assert not np.shares_memory(out, t.numpy())
    out = concat([arr, arr])
    assert out.base is None
    out[:] = 5
    assert (arr == 1).all()
    assert (t == 1).all()


def test_concat_of_nothing_is_an_error() -> None:
    """An empty list of trees is an error, not an empty result of unknown structure."""
    with pytest.raises(ConversionError, match="at least one tree"):
        concat([])


def test_concat_accepts_a_generator() -> None:
    """Any iterable of trees works."""
    out = concat(torch.ones(1, 2) * i for i in range(3))
    np.testing.assert_array_equal(out[:, 0], [0, 1, 2])


def test_gather_style_input() -> None:
    """Per-rank NumPy trees with zero-row leaves and 0-d leaves (what gather hands to concat)."""
    ranks = [
        {"logits": np.ones((2, 3, 2), np.float32), "loss": np.float32(1.0)},
        {"logits": np.zeros((0, 0, 2), np.float32), "loss": np.float32(2.0)},
        {"logits": np.full((1, 4, 2), 3.0, np.float32), "loss": np.float32(3.0)},
    ]
    out = concat(ranks, pad_value=0.0)
    assert out["logits"].shape == (3, 4, 2)
    np.testing.assert_array_equal(out["loss"], [1, 2, 3])


# ---------------------------------------------------------------------------- pad helpers


def test_pad_value_for_resolution_rules() -> None:
    """Scalars, mappings (exact, prefix, bare key, default) and callables resolve per leaf."""
    f32, i64 = np.dtype(np.float32), np.dtype(np.int64)
    assert pad_value_for(None, ("a",), f32) is None
    assert pad_value_for(0, ("a",), f32).dtype == f32
    assert pad_value_for({"a": 1}, ("b",), f32) is None
    assert pad_value_for({("a",): 1, ("a", 0): 2}, ("a", 0, "x"), i64) == 2
    assert pad_value_for({"a": 1}, ("a", 3), i64) == 1
    assert pad_value_for(lambda p, d: None, ("a",), i64) is None
    assert pad_value_for(torch.tensor(3), ("a",), i64) == 3


def test_check_pad_value_rules() -> None:
    """Ints exact, floats may round but not overflow, object takes anything."""
    assert check_pad_value(0.1, np.dtype(np.float32), ("x",)) == np.float32(0.1)
    assert check_pad_value(-100.0, np.dtype(np.int8), ("x",)) == -100
    assert check_pad_value(None, np.dtype(object), ("x",))[()] is None
    assert check_pad_value(-100, np.dtype(ml_dtypes.bfloat16), ("x",)).dtype == ml_dtypes.bfloat16
    for value, dtype in [(1j, np.float32), (np.ones(2), np.float32), ("abc", np.dtype("U2"))]:
        with pytest.raises(ConversionError):
            check_pad_value(value, np.dtype(dtype), ("x",))


def test_copy_padded_and_empty_chunks_in_the_padded_shape() -> None:
    """copy_padded writes data and padding; chunks with no rows take no part in the shape."""
    dst = np.empty((2, 3, 4), np.int8)
    copy_padded(dst, np.ones((2, 2, 1), np.int8), np.array(-1, np.int8))
    assert dst.sum() == 4 - 20
    column = Column(("x",), "tree['x']", axis=0, pad_value=None)
    for shape in [(0, 9), (2, 3)]:
        column.commit(column.check("array", np.dtype("int8"), shape, "batch"))
    assert column.trailing == (3,)
    assert column.fill is None


# ---------------------------------------------------------------------------- hypothesis

_DTYPES = st.sampled_from(
    [np.dtype(np.int16), np.dtype(np.float32), np.dtype(np.bool_), np.dtype(np.uint8)]
)


@st.composite
def ragged_batches(draw: st.DrawFn) -> tuple[list[np.ndarray], np.dtype[Any], int]:
    dtype = draw(_DTYPES)
    ndim = draw(st.integers(1, 3))
    n = draw(st.integers(1, 5))
    arrays = []
    for _ in range(n):
        shape = tuple(draw(st.integers(0, 3)) for _ in range(ndim))
        arrays.append(draw(hnp.arrays(dtype, shape)))
    return arrays, dtype, draw(st.sampled_from([0, 1]))


@settings(max_examples=80, deadline=None)
@given(case=ragged_batches(), as_tensor=st.lists(st.booleans(), min_size=5, max_size=5))
def test_concat_matches_reference(
    case: tuple[list[np.ndarray], np.dtype[Any], int], as_tensor: list[bool]
) -> None:
    """concat equals the straightforward pad-then-concatenate on random ragged inputs."""
    arrays, dtype, pad = case
    inputs = [
        torch.from_numpy(a.copy()) if t else a for a, t in zip(arrays, as_tensor, strict=False)
    ]
    expected = reference_concat(arrays, pad)
    out = concat([{"x": x} for x in inputs], pad_value=pad)["x"]
    assert out.dtype == dtype
    np.testing.assert_array_equal(out, expected)
    acc = Accumulator(pad_value=pad)
    for x in inputs:
        acc.append({"x": x})
    got = acc.result()["x"]
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, expected)
    assert len(acc) == expected.shape[0]


@settings(max_examples=40, deadline=None)
@given(case=ragged_batches(), axis_seed=st.integers(0, 2), negative=st.booleans())
def test_concat_along_any_axis_matches_reference(
    case: tuple[list[np.ndarray], np.dtype[Any], int], axis_seed: int, negative: bool
) -> None:
    """Along any axis, concat equals the reference applied with that axis moved to the front."""
    arrays, _, pad = case
    ndim = arrays[0].ndim
    axis = axis_seed % ndim
    inputs = [np.moveaxis(a, 0, axis) for a in arrays]  # the rows axis now sits at `axis`
    expected = np.moveaxis(reference_concat(arrays, pad), 0, axis)
    given_axis = axis - ndim if negative else axis
    out = concat(inputs, axis=given_axis, pad_value=pad)
    np.testing.assert_array_equal(out, expected)
    assert out.flags.c_contiguous
    acc = Accumulator(axis=given_axis, pad_value=pad)
    for x in inputs:
        acc.append(torch.from_numpy(np.ascontiguousarray(x)))
    np.testing.assert_array_equal(acc.result(), expected)


# ---------------------------------------------------------------------------- Accumulator


def test_accumulator_matches_concat() -> None:
    """An eval loop through the accumulator gives concat's result."""
    batches = eval_batches(6)
    acc = Accumulator(pad_value=PAD)
    for batch in batches:
        acc.append(batch)
    assert len(acc) == 18
    assert_same_tree(acc.result(), concat(batches, pad_value=PAD))


def test_accumulator_copies_batches_right_away() -> None:
    """Changing an appended tensor or array afterwards does not change the result."""
    t = torch.ones(2, 2)
    arr = np.ones((1, 2), np.float32)
    acc = Accumulator()
    acc.append({"x": t, "y": arr})
    t.add_(10)
    arr += 10
    out = acc.result()
    assert (out["x"] == 1).all()
    assert (out["y"] == 1).all()
    assert out["x"].base is None


def test_ragged_without_pad_value_fails_at_append_and_leaves_state() -> None:
    """The append that brings the first ragged batch raises; the accumulator is unchanged."""
    acc = Accumulator()
    acc.append({"ids": torch.ones(2, 3), "loss": torch.tensor(1.0)})
    with pytest.raises(ConversionError, match=r"tree\['ids'\].*pass pad_value="):
        acc.append({"ids": torch.ones(2, 4), "loss": torch.tensor(2.0)})
    assert len(acc) == 2
    out = acc.result()
    assert out["ids"].shape == (2, 3)
    np.testing.assert_array_equal(out["loss"], [1.0])


def test_unfit_pad_value_fails_at_append() -> None:
    """A pad value the dtype cannot hold is reported when the leaf first turns ragged."""
    acc = Accumulator(pad_value=-100)
    acc.append({"mask": torch.ones(1, 2, dtype=torch.bool)})
    with pytest.raises(ConversionError, match=r"-100 cannot be represented in bool"):
        acc.append({"mask": torch.ones(1, 3, dtype=torch.bool)})


def test_structure_mismatch_at_append() -> None:
    """A batch of another structure names the batch and the first differing path."""
    acc = Accumulator()
    acc.append({"a": torch.ones(1), "b": torch.ones(1)})
    with pytest.raises(
        ConversionError, match=r"batch 1 does not have the structure of batch 0: at tree\['b'\]"
    ) as info:
        acc.append({"a": torch.ones(1), "c": torch.ones(1)})
    assert info.value.path == ("b",)
    acc.append({"a": torch.ones(1), "b": torch.ones(1)})
    assert len(acc) == 2


def test_rank_change_at_append() -> None:
    """A leaf that changes rank between batches is an error naming it."""
    acc = Accumulator()
    acc.append({"a": torch.ones(2, 2)})
    with pytest.raises(
        ConversionError, match=r"tree\['a'\] has 2 dimension\(s\) in batch 0 but 1 in batch 1"
    ):
        acc.append({"a": torch.ones(2)})


def test_num_items() -> None:
    """result(num_items=N) gives the first N rows of every leaf, equal to result()[:N]."""
    batches = eval_batches(4)
    acc = Accumulator(pad_value=PAD)
    for batch in batches:
        acc.append(batch)
    full = concat(batches, pad_value=PAD)
    part = acc.result(num_items=7)
    np.testing.assert_array_equal(part["logits"], full["logits"][:7])
    np.testing.assert_array_equal(part["labels"], full["labels"][:7])
    np.testing.assert_array_equal(part["loss"], full["loss"])  # 4 rows: fewer than 7
    assert part["labels"].base is None
    np.testing.assert_array_equal(acc.result()["labels"], full["labels"])  # nothing lost
    assert acc.result(num_items=0)["logits"].shape == (0, *full["logits"].shape[1:])
    with pytest.raises(ConversionError, match="num_items=13"):
        acc.result(num_items=13)
    with pytest.raises(tonumpy.OptionError, match="num_items=-1"):
        acc.result(num_items=-1)


def test_repr() -> None:
    """The repr says how much was accumulated, without waiting for anything."""
    acc = Accumulator()
    acc.append({"a": torch.ones(2), "b": torch.ones(2)})
    assert repr(acc) == "Accumulator(batches=1, leaves=2)"


def test_result_before_append_is_an_error() -> None:
    """result() with nothing appended says so."""
    with pytest.raises(ConversionError, match="before any append"):
        Accumulator().result()


def test_result_again_and_append_after_result() -> None:
    """result() twice gives the same arrays; appending afterwards builds new ones."""
    acc = Accumulator(pad_value=0)
    acc.append({"x": torch.ones(1, 2)})
    acc.append({"x": torch.ones(2, 3)})
    first = acc.result()["x"]
    assert acc.result()["x"] is first
    acc.append({"x": torch.full((1, 4), 2.0)})
    second = acc.result()["x"]
    assert first.shape == (3, 3)
    assert second.shape == (4, 4)
    np.testing.assert_array_equal(second[:3, :3], first)
    np.testing.assert_array_equal(second[:, 3], [0, 0, 0, 2])


def test_accumulator_empty_batches_and_size_one() -> None:
    """Empty batches (first, middle, last) add nothing; size-1 batches keep their dimension."""
    acc = Accumulator(pad_value=-1)
    for rows, length in [(0, 7), (1, 2), (0, 9), (3, 3), (1, 1), (0, 0)]:
        acc.append({"x": torch.ones(rows, length), "loss": torch.tensor(float(rows))})
    out = acc.result()
    assert out["x"].shape == (5, 3)
    assert len(acc) == 5
    np.testing.assert_array_equal(out["loss"], [0, 1, 0, 3, 1, 0])


def test_accumulator_axis() -> None:
    """Accumulating along axis 1 (time-major outputs) with padding of axis 0."""
    acc = Accumulator(axis=1, pad_value=0)
    acc.append(torch.ones(2, 3))
    acc.append(torch.ones(3, 1))
    out = acc.result()
    assert out.shape == (3, 4)
    assert len(acc) == 4
    np.testing.assert_array_equal(out[2], [0, 0, 0, 1])


def test_accumulator_scalars_option_gives_lists() -> None:
    """scalars=True (a to_numpy option) turns a 0-d loss into a list of Python floats."""
    acc = Accumulator(scalars=True)
    acc.append({"loss": torch.tensor(0.5)})
    acc.append({"loss": torch.tensor(0.25)})
    assert acc.result() == {"loss": [0.5, 0.25]}


def test_accumulator_ml_dtypes_option() -> None:
    """ml_dtypes=True keeps bf16 bit-exact through the accumulator, padding included."""
    acc = Accumulator(ml_dtypes=True, pad_value=0)
    acc.append(torch.ones(1, 2, dtype=torch.bfloat16))
    acc.append(torch.ones(1, 3, dtype=torch.bfloat16))
    out = acc.result()
    assert out.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(out.astype(np.float32), [[1, 1, 0], [1, 1, 1]])


def test_accumulator_namedtuple_and_dataclass_outputs() -> None:
    """Model outputs keep their container types in the result."""
    acc = Accumulator()
    for _ in range(2):
        acc.append(Output(logits=Point(torch.ones(1), torch.zeros(1))))
    out = acc.result()
    assert isinstance(out, Output)
    assert isinstance(out.logits, Point)
    np.testing.assert_array_equal(out.logits.x, [1, 1])


def test_asynchronous_path_matches(host_engine: HostEngine) -> None:
    """Batches sent through the asynchronous engine give the synchronous result."""
    batches = eval_batches(5)
    acc = accumulating(Accumulator(pad_value=PAD), host_engine)
    for batch in batches:
        acc.append(batch)
    assert "in_flight=1" in repr(acc)  # the last batch is still in flight
    assert len(acc) == 15
    assert_same_tree(acc.result(), concat(batches, pad_value=PAD))
    assert acc.result()["logits"].base is None


def test_asynchronous_errors_come_from_the_next_call(host_engine: HostEngine) -> None:
    """A problem in an in-flight batch is raised by the next call, naming that batch."""
    acc = accumulating(Accumulator(), host_engine)
    acc.append(torch.ones(2, 3))
    acc.append(torch.ones(2, 4))  # ragged, no pad value: found when it lands
    with pytest.raises(ConversionError, match="pass pad_value="):
        acc.append(torch.ones(1, 3))
    acc.append(torch.ones(1, 3))
    assert len(acc) == 3
    assert acc.result().shape == (3, 3)


def test_asynchronous_first_batch_failure_resets_structure(host_engine: HostEngine) -> None:
    """If the first batch fails once it lands, the next batch may set another structure."""
    acc = accumulating(Accumulator(axis=1), host_engine)
    acc.append({"a": torch.ones(3)})  # axis=1 does not exist
    with pytest.raises(ConversionError, match="axis=1 is out of bounds"):
        len(acc)
    acc.append({"b": torch.ones(1, 2)})
    assert acc.result()["b"].shape == (1, 2)


@pytest.mark.cuda
def test_accumulator_cuda_batches() -> None:
    """CUDA batches are moved to the host at append and concatenated correctly."""
    batches = [{k: v.cuda() for k, v in b.items()} for b in eval_batches(4)]
    acc = Accumulator(pad_value=PAD)
    for batch in batches:
        acc.append(batch)
    assert_same_tree(acc.result(), concat(eval_batches(4), pad_value=PAD))


@pytest.mark.cuda
def test_accumulator_cuda_batches_to_directory(tmp_path: Path) -> None:
    """CUDA batches written to .npy files match the CPU result."""
    acc = Accumulator(pad_value=PAD, directory=tmp_path, ml_dtypes=True)
    for batch in eval_batches(4):
        acc.append({k: v.cuda() for k, v in batch.items()})
    out = acc.result()
    expected = concat(eval_batches(4), pad_value=PAD)
    for key, value in expected.items():
        np.testing.assert_array_equal(out[key], value)
        np.testing.assert_array_equal(np.load(tmp_path / f"{key}.npy"), value)


# ---------------------------------------------------------------------------- directory=


def test_directory_files_read_back_with_np_load(tmp_path: Path) -> None:
    """Every array leaf is a .npy file that plain np.load reads back equal to the result."""
    batches = eval_batches(6)
    acc = Accumulator(pad_value=PAD, directory=tmp_path / "preds")
    for batch in batches:
        acc.append({**batch, "note": "text"})
    out = acc.result()
    expected = concat(batches, pad_value=PAD)
    assert isinstance(out["logits"], np.memmap)
    assert out["note"] == ["text"] * 6
    for key in ("logits", "labels", "loss"):
        np.testing.assert_array_equal(out[key], expected[key])
        loaded = np.load(tmp_path / "preds" / f"{key}.npy")
        assert loaded.dtype == expected[key].dtype
        np.testing.assert_array_equal(loaded, expected[key])
    # the directory format of convert: tonumpy.load reads the tree back, structure and all
    structure = json.loads((tmp_path / "preds" / "__tonumpy__.json").read_text())
    assert sorted(structure["arrays"]) == ["labels", "logits", "loss"]
    loaded = tonumpy.load(tmp_path / "preds")
    assert list(loaded) == list(out)
    assert loaded["note"] == ["text"] * 6
    for key in ("logits", "labels", "loss"):
        np.testing.assert_array_equal(loaded[key], expected[key])


def test_directory_num_items_and_len(tmp_path: Path) -> None:
    """num_items and len work the same on disk."""
    batches = eval_batches(3)
    acc = Accumulator(pad_value=PAD, directory=tmp_path)
    for batch in batches:
        acc.append(batch)
    assert len(acc) == 9
    out = acc.result(num_items=5)
    np.testing.assert_array_equal(out["labels"], concat(batches, pad_value=PAD)["labels"][:5])


def test_directory_growing_lengths(tmp_path: Path) -> None:
    """Steadily longer batches: small files are re-laid out exactly to the widest batch."""
    acc = Accumulator(pad_value=-1, directory=tmp_path)
    batches = [np.full((2, n, 2), n, dtype=np.int32) for n in range(1, 30)]
    for batch in batches:
        acc.append({"x": batch})
    assert np.load(tmp_path / "x.npy", mmap_mode="r").shape[1] == 29
    out = acc.result()
    np.testing.assert_array_equal(out["x"], reference_concat(batches, -1))
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy"), reference_concat(batches, -1))
    assert not list(tmp_path.glob("*.tmp"))


def test_growing_file_turns_geometric_past_its_rewrite_slack(tmp_path: Path) -> None:
    """Once re-layouts have rewritten more than the slack (0 here), dimensions grow by half
    instead of exactly, and the rows written keep their values and padding."""
    batches = [np.full((2, n, 2), n, dtype=np.int32) for n in range(1, 30)]
    fill = np.array(-1, np.int32)
    grown = _storage.GrowingNpy(tmp_path / "x.npy", np.dtype(np.int32), (1, 2), rewrite_slack=0)
    for batch in batches:
        grown.grow_to(batch.shape[1:], fill)
        grown.append(batch, fill)
    stored = np.load(tmp_path / "x.npy")
    assert stored.shape[1] > 29
    np.testing.assert_array_equal(stored[:, :29], reference_concat(batches, -1))
    assert (stored[:, 29:] == -1).all()


def test_directory_bfloat16_files(tmp_path: Path) -> None:
    """bf16 leaves are stored bit-exact as uint16 bits, the dtype named in the structure;
    tonumpy.load gives them back exactly (ml_dtypes=True) or widened."""
    acc = Accumulator(ml_dtypes=True, directory=tmp_path)
    acc.append({"h": torch.tensor([1.5, -2.0], dtype=torch.bfloat16)})
    out = acc.result()
    assert out["h"].dtype == ml_dtypes.bfloat16
    raw = np.load(tmp_path / "h.npy")
    assert raw.dtype == np.uint16
    np.testing.assert_array_equal(raw.view(ml_dtypes.bfloat16).astype(np.float32), [1.5, -2.0])
    structure = json.loads((tmp_path / "__tonumpy__.json").read_text())
    assert structure["tree"]["v"][0]["dtype"] == "bfloat16"
    exact = tonumpy.load(tmp_path, ml_dtypes=True)["h"]
    assert exact.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(exact.view(np.uint16), raw)
    wide = tonumpy.load(tmp_path)["h"]
    assert wide.dtype == np.float32
    np.testing.assert_array_equal(wide, [1.5, -2.0])


def test_directory_empty_first_batch_and_the_dtype_rule(tmp_path: Path) -> None:
    """An empty first batch does not fix the file's dtype or shape; the file follows the one
    dtype rule (the in-memory one): a wider dtype that holds every value rewrites it, one
    that would round values is refused, and the accumulator is left as it was."""
    acc = Accumulator(directory=tmp_path)
    acc.append(np.zeros((0, 5), np.float64))
    acc.append(np.ones((2, 3), np.float32))
    acc.append(np.ones((1, 3), np.int16))
    out = acc.result()
    assert out.dtype == np.float32
    assert out.shape == (3, 3)
    acc.append(np.full((1, 3), 0.1, np.float64))  # float64 holds every float32: promoted
    out = acc.result()
    assert out.dtype == np.float64
    assert np.load(tmp_path / "root.npy").dtype == np.float64
    np.testing.assert_array_equal(out[:3], np.ones((3, 3)))
    assert out[3, 0] == 0.1
    with pytest.raises(ConversionError, match="no dtype holds both exactly"):
        acc.append(np.ones((1, 3), np.int64))
    assert acc.result().shape == (4, 3)
    mem = Accumulator()
    mem.append(np.ones((1, 3), np.float32))
    mem.append(np.full((1, 3), 0.1, np.float64))
    np.testing.assert_array_equal(mem.result(), out[[0, 3]])


@pytest.mark.parametrize("on_disk", [False, True], ids=["memory", "directory"])
def test_accumulator_only_empty_batches(tmp_path: Path, on_disk: bool) -> None:
    """Only empty batches: an empty result of the right rank and dtype."""
    acc = Accumulator(directory=tmp_path if on_disk else None)
    acc.append({"x": np.zeros((0, 3), np.int16), "loss": np.zeros((0,), np.float32)})
    acc.append({"x": np.zeros((0, 3), np.int16), "loss": np.zeros((0,), np.float32)})
    out = acc.result()
    assert len(acc) == 0
    assert out["x"].shape == (0, 3)
    assert out["x"].dtype == np.int16
    if on_disk:
        assert np.load(tmp_path / "x.npy").shape == (0, 3)


def test_directory_refuses_to_overwrite(tmp_path: Path) -> None:
    """Existing prediction files are never overwritten."""
    (tmp_path / "x.npy").write_bytes(b"old")
    acc = Accumulator(directory=tmp_path)
    with pytest.raises(FileExistsError, match="never overwrites"):
        acc.append({"a": np.ones(2), "x": np.ones(2)})
    assert (tmp_path / "x.npy").read_bytes() == b"old"
    assert not (tmp_path / "a.npy").exists()  # nothing created: the accumulator is unchanged
    with pytest.raises(ConversionError, match="before any append"):
        acc.result()


def test_directory_needs_axis_0(tmp_path: Path) -> None:
    """Files grow along their first axis only."""
    with pytest.raises(tonumpy.OptionError, match="needs axis=0"):
        Accumulator(directory=tmp_path, axis=1)


def test_directory_file_names_are_unique(tmp_path: Path) -> None:
    """Paths that sanitise to one name get distinct files."""
    acc = Accumulator(directory=tmp_path)
    acc.append({"a b": np.ones(1), "a/b": np.zeros(1), "h": [np.ones(1), np.ones(1)]})
    names = sorted(p.name for p in tmp_path.glob("*.npy"))
    assert names == ["__progress__.npy", "a_b.npy", "a_b~2.npy", "h.0.npy", "h.1.npy"]


_CRASH_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np, torch
    from tonumpy import Accumulator
    from tonumpy._combine import _storage

    directory, crash_after, mid_append = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
    acc = Accumulator(pad_value={"labels": -100}, directory=directory)
    for i in range(100):
        if i == crash_after:
            if mid_append:  # die after the batch's bytes are written, before its header
                die = lambda self, fd: os.kill(os.getpid(), signal.SIGKILL)
                _storage.GrowingNpy._write_header = die
            else:
                os.kill(os.getpid(), signal.SIGKILL)
        acc.append({"labels": torch.full((2, 3 + i % 3), i), "loss": torch.tensor(float(i))})
    """
)


@pytest.mark.parametrize("mid_append", [False, True], ids=["between-appends", "mid-append"])
def test_directory_survives_a_crash(tmp_path: Path, mid_append: bool) -> None:
    """A killed process leaves valid .npy files holding every completed batch."""
    proc = subprocess.run(
        [sys.executable, "-c", _CRASH_SCRIPT, str(tmp_path), "7", "1" if mid_append else "0"],
        capture_output=True,
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    labels = np.load(tmp_path / "labels.npy")
    assert labels.shape == (14, 5)
    np.testing.assert_array_equal(labels[::2, 0], np.arange(7))
    assert labels[0, 3] == -100
    np.testing.assert_array_equal(np.load(tmp_path / "loss.npy", mmap_mode="r"), np.arange(7.0))
    if mid_append:  # the 8th batch's bytes are in the file, past the counted rows
        assert os.path.getsize(tmp_path / "labels.npy") > os.path.getsize(tmp_path / "loss.npy")
    # tonumpy reads the directory as np.load does: the structure, and the rows counted
    loaded = tonumpy.load(tmp_path)
    np.testing.assert_array_equal(loaded["labels"], labels)
    np.testing.assert_array_equal(loaded["loss"], np.arange(7.0, dtype=np.float32))


def test_directory_batch_in_flight_is_written_by_the_next_call(
    tmp_path: Path, host_engine: HostEngine
) -> None:
    """A batch whose copies are in flight (the device engine) is in the files once the call
    after its append returns, not before."""
    acc = accumulating(Accumulator(directory=tmp_path), host_engine)
    acc.append({"x": torch.ones(2, 3)})
    assert not (tmp_path / "x.npy").exists()
    acc.append({"x": torch.full((1, 3), 2.0)})
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy"), np.ones((2, 3), np.float32))
    assert len(acc) == 3
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy")[2], np.full(3, 2.0, np.float32))


def test_top_level_exports() -> None:
    """concat and Accumulator are public."""
    assert tonumpy.concat is concat
    assert tonumpy.Accumulator is Accumulator
    assert {"concat", "Accumulator"} <= set(tonumpy.__all__)


# ------------------------------------------------------------------------------ nested tensors


def _nested(lengths: list[int], start: float, *, jagged: bool = True) -> torch.Tensor:
    """A nested tensor with one row per length; row i holds ``start + i`` repeated."""
    rows = [torch.full((n, 2), start + i) for i, n in enumerate(lengths)]
    return torch.nested.nested_tensor(rows, layout=torch.jagged if jagged else torch.strided)


def _rows_of(*nts: torch.Tensor) -> list[np.ndarray]:
    return [row.numpy() for nt in nts for row in nt.unbind()]


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")
@pytest.mark.parametrize("jagged", [True, False], ids=["jagged-layout", "strided-layout"])
def test_nested_tensor_rows_join_across_batches(jagged: bool) -> None:
    """concat and Accumulator join a nested tensor's rows across batches into one list, as
    joining nested tensors along dim 0 does, not a list of per-batch lists (issue 20.3)."""
    a, b = _nested([1, 3], 0.0, jagged=jagged), _nested([2], 10.0, jagged=jagged)
    expected = _rows_of(a, b)  # the rows of both batches, in order
    batches = [{"nt": a, "x": torch.ones(2)}, {"nt": b, "x": torch.ones(1)}]
    out = tonumpy.concat(batches)
    assert type(out["nt"]) is list
    assert_same_tree(out["nt"], expected)
    acc = tonumpy.Accumulator()
    for batch in batches:
        acc.append(batch)
    assert_same_tree(acc.result()["nt"], expected)
    assert type(acc.result()["nt"]) is list
    assert_same_tree(acc.result(num_items=2)["nt"], expected[:2])  # rows, cut per sample
    only = tonumpy.Accumulator()
    for batch in batches:
        only.append({"nt": batch["nt"]})
    assert len(only) == 3  # a tree of nested tensors only: their rows
    assert list(only.batch_sizes) == [2, 1]


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")
def test_a_leaf_that_is_nested_in_one_batch_only_is_an_error() -> None:
    """A nested tensor in one batch and a plain tensor in the next is a kind change, named."""
    with pytest.raises(tonumpy.ConversionError, match=r"tree\['nt'\] is a nested"):
        tonumpy.concat([{"nt": _nested([1], 0.0)}, {"nt": torch.ones(1, 2)}])


# ------------------------------------------------------------------------------ batch sizes


def test_batch_sizes_weight_per_batch_values() -> None:
    """Each batch's size (rows along axis of the per-sample leaves) is kept beside its 0-d loss:
    the per-sample mean loss is the size-weighted mean of the per-batch losses (issue 20.4)."""
    losses_per_sample = np.arange(10, dtype=np.float64)
    acc = tonumpy.Accumulator(pad_value=0)
    start = 0
    for size in (4, 4, 2):  # the last batch is smaller: a plain mean of the batch losses is off
        chunk = losses_per_sample[start : start + size]
        acc.append({"ids": torch.ones(size, size), "loss": torch.tensor(chunk.mean())})
        start += size
    sizes, loss = acc.batch_sizes, acc.result()["loss"]
    assert sizes.dtype == np.int64
    assert sizes.tolist() == [4, 4, 2]
    assert sizes.sum() == len(acc)
    assert (loss * sizes).sum() / sizes.sum() == pytest.approx(losses_per_sample.mean())
    assert loss.mean() != pytest.approx(losses_per_sample.mean())
    columns = tonumpy.Accumulator(axis=1)
    columns.append({"x": torch.ones(2, 3)})
    columns.append({"x": torch.ones(2, 5)})
    assert columns.batch_sizes.tolist() == [3, 5]  # along axis
    scalars = tonumpy.Accumulator()
    scalars.append({"loss": torch.tensor(1.0)})
    assert scalars.batch_sizes.tolist() == [1]
    assert tonumpy.Accumulator().batch_sizes.tolist() == []


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")
def test_nested_tensor_with_directory_is_refused_at_the_first_append(tmp_path: Path) -> None:
    """directory= keeps rows in .npy files of one shape: a nested tensor is refused, naming the
    leaf and the fix, by the first append (it crashed at result()); nothing is written."""
    acc = tonumpy.Accumulator(directory=tmp_path / "preds")
    with pytest.raises(tonumpy.ConversionError, match=r"tree\['nt'\] is a nested.*padded") as info:
        acc.append({"nt": _nested([1, 2], 0.0), "x": torch.ones(2)})
    assert info.value.path == ("nt",)
    acc.append({"x": torch.ones(2), "nt": torch.ones(2, 1)})  # the accumulator is still usable
    assert acc.result()["x"].shape == (2,)
