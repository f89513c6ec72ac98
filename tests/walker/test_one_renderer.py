"""Every message that names a place renders it the walker's one way: ``tree['p'].y``.

A namedtuple's fields read as attributes, as users read them, in conversion, padding, cycle and
depth, table and file errors alike (not ``tree['p'][1]`` or ``tree['p']['y']``).
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import tonumpy
from tonumpy import table

P = collections.namedtuple("P", "x y")


class _Holder:
    """An object tonumpy cannot rebuild, holding a tensor."""

    def __init__(self) -> None:
        self.t = torch.ones(1)


def _deep(levels: int) -> Any:
    node: Any = torch.ones(1)
    for _ in range(levels):
        node = [node]
    return node


def test_a_conversion_error_names_the_field() -> None:
    """to_numpy refusing an object that holds a tensor names tree['p'].y."""
    with pytest.raises(tonumpy.UnsupportedLeafError, match=r"tree\['p'\]\.y"):
        tonumpy.to_numpy({"p": P(torch.ones(1), _Holder())})


def test_a_pad_error_names_the_field() -> None:
    """A pad value that does not fit the leaf's dtype names tree['p'].y."""
    batches = [{"p": P(torch.ones(2), torch.zeros(2, n, dtype=torch.uint8))} for n in (3, 4)]
    with pytest.raises(tonumpy.ConversionError, match=r"the dtype of tree\['p'\]\.y"):
        tonumpy.concat(batches, pad_value=-1)


def test_a_cycle_error_names_the_field() -> None:
    """A list that holds itself, under a namedtuple field, is named tree['p'].y[0]."""
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(tonumpy.ConversionError, match=r"tree\['p'\]\.y\[0\]"):
        tonumpy.to_numpy({"p": P(torch.ones(1), loop)})


def test_a_depth_error_of_a_file_names_the_field(tmp_path: Path) -> None:
    """A tree too deep for a file's structure is named from tree['p'].y down."""
    with pytest.raises(tonumpy.ConversionError, match=r"tree\['p'\]\.y\[0\]"):
        tonumpy.save(tmp_path / "t.npz", {"p": P(torch.ones(1), _deep(300))})


def test_a_file_error_about_a_leaf_names_the_field(tmp_path: Path) -> None:
    """A leaf a file cannot store without pickle is named tree['p'].y."""
    objects = np.array([object()], dtype=object)
    with pytest.raises(tonumpy.ConversionError, match=r"cannot store tree\['p'\]\.y"):
        tonumpy.save(tmp_path / "t.npz", {"p": P(torch.ones(2), objects)})


def test_a_table_error_names_the_field() -> None:
    """to_columns refusing a per-batch value names tree['p'].y."""
    with pytest.raises(tonumpy.ConversionError, match=r"tree\['p'\]\.y is a plain value"):
        table.to_columns({"p": P(torch.ones(2), 3.0)})
    with pytest.raises(tonumpy.ConversionError, match=r"tree\['p'\]\.y is an array of shape"):
        table.to_columns({"a": torch.ones(4), "p": P(torch.ones(4), torch.ones(3))})


def test_a_table_error_about_rows_names_the_field() -> None:
    """Rows of a per_row node that cannot be stacked name the leaf of its items' template."""
    rows = [P(np.ones(2, np.float32), 1), P(np.ones(3, np.int64), 2)]
    tree = {"ids": np.arange(2), "rows": rows}
    with pytest.raises(tonumpy.ConversionError, match=r"the rows of tree\['rows'\]\.x have"):
        table.to_columns(tree, per_row="rows")


def test_a_column_name_error_names_the_field() -> None:
    """to_columns refusing a key no column name can spell names tree['p'].y[1.5]."""
    tree = {"p": P(torch.ones(2), {1.5: torch.ones(2)})}
    with pytest.raises(tonumpy.ConversionError, match=r"tree\['p'\]\.y\[1\.5\]: a key of type"):
        table.to_columns(tree)


def test_a_bare_key_path_renders_through_the_one_renderer() -> None:
    """column_name without a treespec names the place by its keys, as render spells keys."""
    with pytest.raises(tonumpy.ConversionError, match=r"tree\['p'\]\[1\]\[1\.5\]: a key"):
        table.column_name(("p", 1, 1.5))
