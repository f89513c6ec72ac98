"""Shared fixtures and markers: CUDA tests are skipped cleanly where no GPU is present."""

from __future__ import annotations

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
def engine_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the transfer engine on CPU tensors, as if they were on a GPU (the one switch).

    Every caller's asynchronous path (``to_numpy_async``, ``capture``, ``Accumulator``) then
    runs the engine's grouping, packing, staging and unpacking, and sees its copies in flight
    until they are waited for.
    """
    from tonumpy._convert import _transfer

    monkeypatch.setattr(_transfer, "FORCE_CPU", True)
