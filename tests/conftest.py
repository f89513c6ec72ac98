"""Shared fixtures and markers: CUDA tests are skipped cleanly where no GPU is present."""

from __future__ import annotations

from typing import Any

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def host_engine() -> Any:
    """A transfer engine that takes CPU tensors, as if they were on a GPU
    (``tests/_helpers/engine.py``).

    Passed in explicitly to ``to_numpy_async``'s flat form, ``capture`` and ``Accumulator``, it
    runs the engine's grouping, packing, staging and unpacking, and their asynchronous paths.
    """
    from _helpers.engine import HostEngine

    return HostEngine()
