"""The suite's one tree comparison, ``assert_same_tree``: it fails for every kind of difference.

Each case gives two trees that differ in one way a wrong conversion could produce, and checks
that the helper refuses them, naming the place; the same trees compared with themselves pass.
"""

from __future__ import annotations

import math
from collections import OrderedDict, defaultdict, deque
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import torch

from _helpers.trees import Plain, Point, _tagged, assert_same_tree

_NAN_PAYLOAD = np.array([0x7FC00001], dtype=np.uint32).view(np.float32)
_TEXT = "kept"


class _Sub(np.ndarray):
    """An ndarray subclass (as np.memmap is one)."""


def _arange(n: int, dtype: Any = np.float32) -> np.ndarray:
    return np.arange(n, dtype=dtype)


def _with_note(d: Any) -> Any:
    d.note = "other"
    return d


# (want, got, a piece of the message naming the place or the difference)
DIFFERENT: dict[str, tuple[Any, Any, str]] = {
    "container type": ({"a": 1}, OrderedDict(a=1), "dict"),
    "list vs tuple": ([1, 2], (1, 2), "list"),
    "namedtuple vs tuple": (Point(1, 2), (1, 2), "Point"),
    "missing key": ({"a": 1, "b": 2}, {"a": 1}, "'b'"),
    "key order": ({"a": 1, "b": 2}, {"b": 2, "a": 1}, "keys"),
    "defaultdict factory": (defaultdict(list, a=1), defaultdict(set, a=1), "settings"),
    "deque maxlen": (deque([1], maxlen=2), deque([1], maxlen=3), "settings"),
    "extra state of a container": (_tagged(1, 2), _with_note(_tagged(1, 2)), ".note"),
    "dataclass field": (Plain(_arange(2), 1), Plain(_arange(2), 2), ".y"),
    "array dtype": ({"x": _arange(3)}, {"x": _arange(3, np.float64)}, "dtype"),
    "array shape": ([_arange(4)], [_arange(4).reshape(2, 2)], "shape"),
    "array values": ([_arange(3)], [_arange(3) + 1], "values"),
    "array vs subclass": ([_arange(1)], [_arange(1).view(_Sub)], "type"),
    "array vs scalar": ([np.float32(0)], [np.array(0, np.float32)], "type"),
    "sign of zero": ([np.zeros(2)], [-np.zeros(2)], "values"),
    "NaN payload": ([np.float32(np.nan) * np.ones(1, np.float32)], [_NAN_PAYLOAD], "values"),
    "bfloat16 vs float32": (
        [np.ones(2, ml_dtypes.bfloat16)],
        [np.ones(2, np.float32)],
        "dtype",
    ),
    "object array element": (
        [np.array([1, "a"], dtype=object)],
        [np.array([1, "b"], dtype=object)],
        "[(1,)]",
    ),
    "bool vs int": ([True], [1], "type"),
    "int vs float": ([1], [1.0], "type"),
    "float value": ([0.5], [0.25], "0.25"),
    "float sign of zero": ([0.0], [-0.0], "-0.0"),
    "NaN vs number": ([math.nan], [1.0], "nan"),
    "complex part": ([1 + 2j], [1 - 2j], "(1-2j)"),
    "string": (["a"], ["b"], "'b'"),
    "tensor dtype": ([torch.ones(2)], [torch.ones(2, dtype=torch.float64)], "float64"),
    "tensor bits": ([torch.zeros(2)], [-torch.zeros(2)], "values"),
    "tensor vs array": ([torch.ones(2)], [np.ones(2, np.float32)], "type"),
    "bfloat16 tensor bits": (
        [torch.tensor([1.0, 2.0], dtype=torch.bfloat16)],
        [torch.tensor([1.0, 2.015625], dtype=torch.bfloat16)],
        "values",
    ),
}


@pytest.mark.parametrize("case", DIFFERENT)
def test_refuses_each_kind_of_difference(case: str) -> None:
    """Two trees that differ in one way fail, with a message that says where or what."""
    want, got, shown = DIFFERENT[case]
    with pytest.raises(AssertionError) as raised:
        assert_same_tree(got, want)
    assert shown in str(raised.value)
    assert_same_tree(want, want)  # and the tree itself passes
    assert_same_tree(got, got)


def test_place_of_the_difference_is_named() -> None:
    """A leaf deep in the tree is named by its path, as tonumpy's errors name it."""
    want = {"out": Point(_arange(2), [_arange(3)])}
    got = {"out": Point(_arange(2), [_arange(3) * 2])}
    with pytest.raises(AssertionError, match=r"tree\['out'\]\.y\[0\]"):
        assert_same_tree(got, want)


def test_structure_difference_names_the_first_differing_path() -> None:
    """A structure difference is reported by the walker's one reporter: the first path."""
    with pytest.raises(AssertionError, match=r"at tree\['a'\]\[1\]"):
        assert_same_tree({"a": [1, (2,)]}, {"a": [1, [2]]})


def test_identical_objects_requires_the_very_object() -> None:
    """identical_objects=True: a non-array leaf must be the same object, not an equal one."""
    text = "".join(["kep", "t"])
    assert text == _TEXT
    assert text is not _TEXT
    assert_same_tree([text], [_TEXT])
    with pytest.raises(AssertionError, match="very object"):
        assert_same_tree([text], [_TEXT], identical_objects=True)
    assert_same_tree([_TEXT, 3, 2.5, None], [_TEXT, 3, 2.5, None], identical_objects=True)


def test_equal_trees_pass_nan_equal_to_nan() -> None:
    """Same bits, NaNs included, pass; non-contiguous arrays compare by value layout."""
    a = np.array([np.nan, 1.0, -np.inf])
    tree = {"a": a[::-1], "f": math.nan, "c": complex(math.nan, 1), "n": None, "s": "x"}
    copy = {"a": a[::-1].copy(), "f": math.nan, "c": complex(math.nan, 1), "n": None, "s": "x"}
    assert_same_tree(copy, tree)


def test_is_leaf_is_passed_to_the_walker() -> None:
    """With is_leaf, a container kept whole is compared as a leaf (by ==)."""
    keep = {"is_leaf": lambda node: isinstance(node, tuple)}
    assert_same_tree([(1, 2)], [(1, 2)], **keep)
    with pytest.raises(AssertionError, match=r"tree\[0\]"):
        assert_same_tree([(1, 3)], [(1, 2)], **keep)
