"""to_columns / from_columns / column_structure: one batch as columns, one row per example."""

from __future__ import annotations

import json
from collections import namedtuple
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import tonumpy
from tonumpy.table import column_name, key_path

Pair = namedtuple("Pair", ["first", "second"])


def _batch(n: int = 3, t: int = 4) -> dict[str, Any]:
    torch.manual_seed(0)
    return {
        "logits": torch.randn(n, t, 5),
        "hidden_states": (torch.randn(n, t, 2), torch.randn(n, t, 2).bfloat16()),
        "pair": Pair(torch.arange(n), torch.ones(n, dtype=torch.bool)),
        "nothing": None,
    }


def test_columns_are_one_row_per_example_named_by_key_path() -> None:
    """Every array leaf is a column with the batch size first, named by its key path."""
    cols = tonumpy.to_columns(_batch())
    assert {k: v.shape for k, v in cols.items()} == {
        "logits": (3, 4, 5),
        "hidden_states.0": (3, 4, 2),
        "hidden_states.1": (3, 4, 2),
        "pair.first": (3,),
        "pair.second": (3,),
    }
    assert cols["hidden_states.1"].dtype == np.float32  # bfloat16 widened, as to_numpy does
    ref = tonumpy.to_numpy(_batch())
    np.testing.assert_array_equal(cols["logits"], ref["logits"])


def test_from_columns_rebuilds_the_structure_exactly() -> None:
    """With the structure: tuples stay tuples, None stays None, namedtuples come back as dicts."""
    batch = _batch()
    tree = tonumpy.from_columns(tonumpy.to_columns(batch), tonumpy.column_structure(batch))
    assert list(tree) == ["logits", "hidden_states", "pair", "nothing"]
    assert isinstance(tree["hidden_states"], tuple)
    assert tree["nothing"] is None
    assert list(tree["pair"]) == ["first", "second"]
    np.testing.assert_array_equal(tree["pair"]["first"], np.arange(3))


def test_from_columns_without_structure_nests_dicts_by_key_path() -> None:
    """Without a structure the names alone give nested dicts, int keys kept as ints."""
    tree = tonumpy.from_columns(tonumpy.to_columns(_batch()))
    assert sorted(tree["hidden_states"]) == [0, 1]
    assert sorted(tree["pair"]) == ["first", "second"]


def test_per_batch_values_are_refused_naming_the_path() -> None:
    """A 0-d loss, a mismatched first dimension and a plain number are refused by default."""
    with pytest.raises(tonumpy.ConversionError, match=r"tree\['loss'\].*per_batch='broadcast'"):
        tonumpy.to_columns({"x": torch.ones(3, 2), "loss": torch.tensor(1.0)})
    with pytest.raises(tonumpy.ConversionError, match=r"tree\['w'\].*shape \(7,\)"):
        tonumpy.to_columns({"x": torch.ones(3, 2), "y": torch.ones(3), "w": torch.ones(7)})
    with pytest.raises(tonumpy.ConversionError, match=r"tree\['step'\].*plain value"):
        tonumpy.to_columns({"x": torch.ones(3), "step": 5})


def test_per_batch_values_broadcast_on_every_row() -> None:
    """per_batch='broadcast' repeats each per-batch value on every row, no row mixed in."""
    cols = tonumpy.to_columns(
        {"x": torch.ones(3, 2), "loss": torch.tensor(0.5), "w": torch.arange(7), "step": 5},
        per_batch="broadcast",
        batch_size=3,
    )
    np.testing.assert_array_equal(cols["loss"], [0.5, 0.5, 0.5])
    assert cols["w"].shape == (3, 7)
    np.testing.assert_array_equal(cols["step"], [5, 5, 5])


def test_batch_size_option_decides_which_leaves_are_rows() -> None:
    """Leaves that disagree on the first dimension: batch_size= names the rows."""
    tree = {"a": torch.ones(2, 5), "b": torch.ones(5)}
    with pytest.raises(tonumpy.ConversionError, match="batch_size="):
        tonumpy.to_columns(tree, per_batch="broadcast")
    assert tonumpy.to_columns(tree, batch_size=5, per_batch="broadcast")["a"].shape == (5, 2, 5)


def test_reduce_and_exclude_as_accumulator() -> None:
    """reduce= runs before conversion; exclude= leaves nodes out, as Accumulator does."""
    cols = tonumpy.to_columns(
        {**_batch(), "loss": torch.tensor(1.0)},
        reduce={"logits": lambda t: t.argmax(-1)},
        exclude=["loss", "hidden_states"],
    )
    assert sorted(cols) == ["logits", "pair.first", "pair.second"]
    assert cols["logits"].shape == (3, 4)
    assert cols["logits"].dtype == np.int64


def test_ragged_rows_padded_or_kept() -> None:
    """per_row= lists of per-example arrays: padded with pad_value, or one array per row."""
    tree = {"boxes": [torch.ones(2, 4), torch.ones(1, 4), torch.ones(3, 4)], "x": torch.ones(3)}
    padded = tonumpy.to_columns(tree, per_row="boxes", pad_value=-1.0)["boxes"]
    assert padded.shape == (3, 3, 4)
    assert (padded[1, 1:] == -1).all()
    kept = tonumpy.to_columns(tree, per_row="boxes", ragged="object")["boxes"]
    assert kept.dtype == object
    assert [r.shape for r in kept] == [(2, 4), (1, 4), (3, 4)]
    with pytest.raises(tonumpy.ConversionError, match=r"pad_value=.*ragged='object'"):
        tonumpy.to_columns(tree, per_row="boxes")


def test_per_row_items_that_are_trees() -> None:
    """Detection-style outputs: a list of per-example dicts gives one column per dict key."""
    tree = [
        {"boxes": torch.ones(n, 4) * n, "labels": torch.arange(n), "score": 0.5 * n} for n in (2, 1)
    ]
    structure = tonumpy.column_structure(tree, per_row=(), ragged="object")
    cols = tonumpy.to_columns(tree, per_row=(), ragged="object")
    assert sorted(cols) == ["boxes", "labels", "score"]
    np.testing.assert_array_equal(cols["score"], [1.0, 0.5])
    back = tonumpy.from_columns(cols, structure, ragged="object")
    assert len(back) == 2
    np.testing.assert_array_equal(back[0]["boxes"], np.full((2, 4), 2.0))
    np.testing.assert_array_equal(back[1]["labels"], [0])


def test_from_columns_pads_rows_of_different_batches() -> None:
    """Rows of batches of different lengths are padded as Accumulator pads them."""
    batches = [{"h": torch.randn(2, 3)}, {"h": torch.randn(1, 5)}]
    rows = [r for b in batches for r in tonumpy.to_columns(b)["h"]]
    column = np.empty(len(rows), dtype=object)
    column[:] = rows
    structure = tonumpy.column_structure(batches[0])
    got = tonumpy.from_columns({"h": column}, structure, pad_value=0.0)
    acc = tonumpy.Accumulator(pad_value=0.0)
    for b in batches:
        acc.append(b)
    np.testing.assert_array_equal(got["h"], acc.result()["h"])
    with pytest.raises(tonumpy.ConversionError, match="pad_value="):
        tonumpy.from_columns({"h": column}, structure)


def test_structure_is_json_and_independent_of_the_batch() -> None:
    """One structure rebuilds batches of any size; it is JSON text."""
    s2, s5 = tonumpy.column_structure(_batch(2)), tonumpy.column_structure(_batch(5, 7))
    assert s2 == s5
    assert json.loads(s2)["arrays"][0] == "logits"
    assert tonumpy.from_columns(tonumpy.to_columns(_batch(5)), s2)["logits"].shape == (5, 4, 5)


def test_missing_column_and_uneven_columns_are_refused() -> None:
    """A structure naming an absent column, or columns of different lengths: FileFormatError."""
    structure = tonumpy.column_structure({"a": torch.ones(2), "b": torch.ones(2)})
    with pytest.raises(tonumpy.FileFormatError, match="'b'"):
        tonumpy.from_columns({"a": np.ones(2)}, structure)
    with pytest.raises(tonumpy.FileFormatError, match="different numbers of rows"):
        tonumpy.from_columns({"a": np.ones(2), "b": np.ones(3)}, structure)


def test_keys_that_are_not_str_or_int_are_refused() -> None:
    """A float dict key has no column spelling: the error names the path."""
    with pytest.raises(tonumpy.ConversionError, match=r"float"):
        tonumpy.to_columns({1.5: torch.ones(2)})


_KEYS = st.one_of(st.integers(-5, 1000), st.text(max_size=6))


@given(st.lists(_KEYS, max_size=5))
def test_column_names_are_reversible(path: list[Any]) -> None:
    """key_path(column_name(p)) == p for every path of str and int keys."""
    assert key_path(column_name(tuple(path))) == tuple(path)


def test_column_name_spelling_examples() -> None:
    """The documented spelling: dots, escapes, int-looking strings, the root."""
    assert column_name(("out", "hidden_states", 0)) == "out.hidden_states.0"
    assert column_name(("a.b",)) == "a\\.b"
    assert column_name(("0",)) == "\\s0"
    assert column_name(("",)) == "\\s"
    assert column_name(("a\\s",)) == "a\\\\s"
    assert column_name(()) == ""
    assert tonumpy.to_columns(torch.ones(2, 3)).keys() == {""}
