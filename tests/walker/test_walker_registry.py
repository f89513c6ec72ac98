"""The walker's registry of container types: safe from many threads, and bounded.

Issue 12, item 1: the first use of a container type from several threads at once must never
leave a container unconverted (the thread that loses the registration race flattens again).
Item 16: registered types do not accumulate forever; dropping old ones breaks nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import threading
import weakref
from collections import UserDict
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

import tonumpy
from _helpers.threads import run_beside
from tonumpy import Accumulator, to_numpy

THREADS = 8


def _fresh_dataclass() -> tuple[Any, Callable[[Any], Any]]:
    cls = dataclasses.make_dataclass("Out", [("logits", Any)])
    return cls(torch.ones(2)), lambda out: out["out"].logits


def _fresh_dict_subclass() -> tuple[Any, Callable[[Any], Any]]:
    cls = type("Out", (dict,), {})
    return cls(logits=torch.ones(2)), lambda out: out["out"]["logits"]


def _fresh_userdict_subclass() -> tuple[Any, Callable[[Any], Any]]:
    cls = type("Out", (UserDict,), {})
    return cls(logits=torch.ones(2)), lambda out: out["out"]["logits"]


def _fresh_list_subclass() -> tuple[Any, Callable[[Any], Any]]:
    cls = type("Out", (list,), {})
    return cls([torch.ones(2)]), lambda out: out["out"][0]


def _fresh_nested() -> tuple[Any, Callable[[Any], Any]]:
    inner = dataclasses.make_dataclass("Inner", [("x", Any)])
    outer = type("Outer", (dict,), {})
    return outer(a=inner(torch.ones(2))), lambda out: out["out"]["a"].x


@pytest.mark.parametrize(
    "make",
    [
        _fresh_dataclass,
        _fresh_dict_subclass,
        _fresh_userdict_subclass,
        _fresh_list_subclass,
        _fresh_nested,
    ],
    ids=["dataclass", "dict-subclass", "userdict-subclass", "list-subclass", "nested"],
)
def test_first_use_from_many_threads_converts_everywhere(
    make: Callable[[], tuple[Any, Callable[[Any], Any]]],
) -> None:
    """8 threads meet a new container type at once, 40 times over: every result converted."""
    bad: list[str] = []
    for _ in range(40):
        obj, get = make()
        barrier = threading.Barrier(THREADS)
        outs: list[Any] = [None] * THREADS

        def convert(
            i: int, obj: Any = obj, barrier: threading.Barrier = barrier, outs: list[Any] = outs
        ) -> None:
            barrier.wait()
            outs[i] = to_numpy({"out": obj})

        threads = [threading.Thread(target=convert, args=(i,)) for i in range(THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        bad += [type(get(out)).__name__ for out in outs if not isinstance(get(out), np.ndarray)]
    assert bad == []


@dataclasses.dataclass
class _Stable:
    logits: Any


def test_registered_types_are_bounded_and_released() -> None:
    """Thousands of throw-away container types: the registry stays bounded, classes are freed.

    A type in use that was dropped meanwhile is registered again, and an Accumulator that
    started before still accepts its batches.
    """
    acc = Accumulator()
    acc.append(_Stable(torch.ones(2, 3)))
    first = None
    for i in range(2 * tonumpy._tree.MAX_NODE_TYPES + 100):
        cls = dataclasses.make_dataclass("Throwaway", [("x", Any)])
        if i == 0:
            first = weakref.ref(cls)
        out = to_numpy(cls(torch.full((1,), float(i))))
        assert isinstance(out.x, np.ndarray)
        assert out.x[0] == i
        del cls, out
    gc.collect()
    assert first is not None
    assert first() is None  # the first class is no longer kept alive by tonumpy
    assert len(tonumpy._tree.registered_types()) <= tonumpy._tree.MAX_NODE_TYPES
    assert _Stable not in tonumpy._tree.registered_types()  # dropped: oldest
    acc.append(_Stable(torch.zeros(1, 3)))  # registered again; same structure as before
    result = acc.result()
    assert type(result) is _Stable
    assert result.logits.shape == (3, 3)
    assert _Stable in tonumpy._tree.registered_types()


def test_threads_and_evictions_together() -> None:
    """Threads convert trees of their own types while another churns through many more."""
    failures: list[str] = []
    churned = [0]
    enough = 2 * tonumpy._tree.MAX_NODE_TYPES + 100  # the registry evicts during the work

    def churn() -> None:
        cls = type("Churn", (list,), {})
        to_numpy(cls([torch.ones(1)]))
        churned[0] += 1

    def work(seed: int) -> None:
        try:
            convert_and_accumulate(seed)
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            failures.append(f"thread {seed}: {exc!r}")

    def convert_and_accumulate(seed: int) -> None:
        acc = Accumulator()
        kinds = [type(f"Own{seed}", (dict,), {}), dataclasses.make_dataclass("Own", [("x", Any)])]
        step = 0
        while step < 60 or churned[0] < enough:
            step += 1
            tree = {"a": kinds[0](v=torch.ones(2)), "b": kinds[1](torch.ones(1, 2))}
            out = to_numpy(tree)
            if not (isinstance(out["a"]["v"], np.ndarray) and isinstance(out["b"].x, np.ndarray)):
                failures.append(f"thread {seed} step {step}: {out!r}")
            acc.append(tree)
        if acc.result()["b"].x.shape != (step, 2):
            failures.append(f"thread {seed}: {acc.result()!r}")

    evictions = tonumpy._tree._snapshot.evictions
    run_beside(churn, [functools.partial(work, i) for i in range(THREADS)])
    assert failures == []
    assert tonumpy._tree._snapshot.evictions > evictions  # the workers' types were evicted too
