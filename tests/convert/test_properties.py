"""Property tests: random nested trees against a reference conversion, and round trips."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings

from _helpers.strategies import reference_to_numpy, trees
from _helpers.trees import assert_same_tree
from tonumpy import to_numpy, to_torch

_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_SETTINGS
@given(trees())
def test_to_numpy_matches_reference(tree: Any) -> None:
    """Structure, dtypes and values equal a straightforward recursive conversion."""
    assert_same_tree(to_numpy(tree), reference_to_numpy(tree), identical_objects=True)


@_SETTINGS
@given(trees())
def test_copy_true_matches_reference(tree: Any) -> None:
    """copy=True changes where the bytes live, never what they are."""
    assert_same_tree(to_numpy(tree, copy=True), reference_to_numpy(tree), identical_objects=True)


@_SETTINGS
@given(trees())
def test_round_trip_through_ml_dtypes(tree: Any) -> None:
    """to_torch(to_numpy(x, ml_dtypes=True)) reproduces every value, dtype and container."""
    assert_same_tree(to_torch(to_numpy(tree, ml_dtypes=True)), tree, identical_objects=True)
