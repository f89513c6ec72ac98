"""capture from several threads: each call's inputs with its own outputs, counts exact (12.6).

The interleavings that used to go wrong are forced with events (no sleeps, no luck): thread A
enters a forward, thread B enters one, A returns first, then B.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import tonumpy

TIMEOUT = 20.0


def run_threads(*targets: Callable[[], None]) -> None:
    """Run each target in its own thread; re-raise the first exception any of them raised."""
    errors: list[BaseException] = []

    def guarded(target: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                target()
            except BaseException as exc:  # noqa: BLE001 - handed to the test's thread
                errors.append(exc)

        return run

    threads = [threading.Thread(target=guarded(t)) for t in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
        assert not thread.is_alive(), "a thread did not finish"
    if errors:
        raise errors[0]


class Handshake(nn.Module):
    """``forward(x, depth)``: recurses ``depth`` times, then meets the other thread.

    The innermost call of the thread passing 1 waits until the thread passing 2 has entered
    its innermost call, and that one waits until the first thread's whole call has returned:
    A enters, B enters, A returns, B returns. Returns ``(x + 2 * depth) * 2 ** (depth + 1)``
    (each level adds 2, so that the parity of ``x`` tells the threads apart at every level).
    """

    def __init__(self) -> None:
        super().__init__()
        self.a_entered = threading.Event()
        self.b_entered = threading.Event()
        self.a_returned = threading.Event()

    def forward(self, x: torch.Tensor, depth: int = 0) -> torch.Tensor:
        if depth:
            return self(x + 2, depth - 1) * 2
        if int(x.flatten()[0]) % 2:  # thread A (odd values)
            self.a_entered.set()
            assert self.b_entered.wait(TIMEOUT)
        else:
            self.b_entered.set()
            assert self.a_returned.wait(TIMEOUT)
        return x * 2


def expected_output(x: np.ndarray, depth: int) -> np.ndarray:
    return (x + 2 * depth) * 2 ** (depth + 1)


def interleave(model: nn.Module, handshake: Handshake, depth: int) -> None:
    """Thread A calls ``model(1, depth)``, thread B ``model(2, depth)``, forced to interleave."""

    def a() -> None:
        model(torch.tensor([1.0]), depth)
        handshake.a_returned.set()

    def b() -> None:
        assert handshake.a_entered.wait(TIMEOUT)
        model(torch.tensor([2.0]), depth)

    run_threads(a, b)


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_inputs_are_paired_with_their_own_outputs(depth: int) -> None:
    """Every captured call, nested ones included, holds one call's inputs and its outputs."""
    model = Handshake()
    with tonumpy.capture(model, inputs=True, outputs=True) as acts:
        interleave(model, model, depth)
    calls = acts[""]
    assert len(calls) == 2 * (depth + 1)
    for call in calls:
        x, call_depth = call["inputs"]
        np.testing.assert_array_equal(call["outputs"], expected_output(x, call_depth))
    starts = sorted(float(c["inputs"][0][0]) for c in calls if c["inputs"][1] == depth)
    assert starts == [1.0, 2.0]


def test_reentrant_calls_in_one_thread() -> None:
    """A module calling itself: each level's inputs with that level's outputs (a guard)."""

    class Countdown(nn.Module):
        def forward(self, x: torch.Tensor, depth: int) -> torch.Tensor:
            return self(x + 2, depth - 1) * 2 if depth else x * 2

    model = Countdown()
    with tonumpy.capture(model, inputs=True, outputs=True) as acts:
        model(torch.tensor([5.0]), 3)
    for call in acts[""]:
        x, depth = call["inputs"]
        np.testing.assert_array_equal(call["outputs"], expected_output(x, depth))
    assert [int(c["inputs"][1]) for c in acts[""]] == [0, 1, 2, 3]  # innermost returns first


class Root(nn.Module):
    """A root whose only child is a :class:`Handshake`."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = Handshake()

    def forward(self, x: torch.Tensor, depth: int = 0) -> torch.Tensor:
        return self.inner(x, depth)


@pytest.mark.parametrize(("inputs", "outputs"), [(False, True), (True, False), (True, True)])
def test_every_numbers_concurrent_forwards_of_the_root_separately(
    inputs: bool, outputs: bool
) -> None:
    """every=2: of two forwards that overlap in time, the first begun is captured, not both."""
    root = Root()
    with tonumpy.capture(root, include="inner", every=2, inputs=inputs, outputs=outputs) as acts:
        interleave(root, root.inner, 0)
    calls = acts["inner"]
    assert len(calls) == 1  # thread A's forward, begun first: number 0
    call = calls[0]
    if inputs and outputs:
        np.testing.assert_array_equal(call["inputs"][0], [1.0])
        np.testing.assert_array_equal(call["outputs"], [2.0])
    elif inputs:
        np.testing.assert_array_equal(call[0], [1.0])
    else:
        np.testing.assert_array_equal(call, [2.0])


@pytest.fixture
def fast_switching() -> Iterator[None]:
    """Let the interpreter switch threads as often as it can, to expose lost updates."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(old)


def test_every_counts_calls_outside_the_root_across_threads(fast_switching: None) -> None:
    """A module called on its own from 4 threads, every=3: exactly every third call is kept."""
    model = nn.Sequential(nn.Identity())
    per_thread, threads = 300, 4
    with tonumpy.capture(model, include="0", every=3) as acts:

        def work() -> None:
            for k in range(per_thread):
                model[0](torch.tensor([float(k)]))

        run_threads(*[work] * threads)
    assert acts.num_calls("0") == -(-per_thread * threads // 3)


def test_every_counts_forwards_of_the_root_across_threads(fast_switching: None) -> None:
    """4 threads x 100 forwards of the root, every=4: 100 forwards are captured, whole."""
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    with tonumpy.capture(model, include=["0", "1"], every=4) as acts:

        def work() -> None:
            for _ in range(100):
                model(torch.ones(1, 2))

        run_threads(*[work] * 4)
    assert acts.num_calls("0") == acts.num_calls("1") == 100


def test_many_threads_many_calls_stay_paired(fast_switching: None) -> None:
    """The repro at scale: 4 threads x 100 calls, each value's outputs are twice its inputs."""

    class Double(nn.Module):
        def forward(self, x: torch.Tensor) -> Any:
            time.sleep(0.0002)  # as any real forward takes time: lets the threads interleave
            return {"y": x * 2}

    model = nn.Sequential(Double())
    with tonumpy.capture(model, include="0", inputs=True, outputs=True) as acts:

        def work(offset: int) -> Callable[[], None]:
            return lambda: [model(torch.full((3,), float(offset + k))) for k in range(100)]

        run_threads(*(work(1000 * i) for i in range(4)))
    calls = acts["0"]
    assert len(calls) == 400
    for call in calls:
        np.testing.assert_array_equal(call["outputs"]["y"], call["inputs"][0] * 2)
    assert len({float(c["inputs"][0][0]) for c in calls}) == 400


def test_items_and_values_are_snapshots_under_clear(fast_switching: None) -> None:
    """items() and values() list each module with its calls as of one instant: while another
    thread captures and clears, no module is listed without calls and nothing raises."""
    model = nn.Sequential(nn.Identity(), nn.Identity())
    done = threading.Event()
    seen = [0]
    with tonumpy.capture(model, exclude="") as acts:

        def churn() -> None:
            try:
                for _ in range(3000):
                    model(torch.ones(1))
                    acts.clear()
            finally:
                done.set()

        def read() -> None:
            while not done.is_set():
                for name, calls in acts.items():
                    assert name in ("0", "1")
                    assert len(calls) == 1
                    seen[0] += 1
                for calls in acts.values():
                    assert len(calls) == 1

        run_threads(churn, read)
    assert seen[0] > 0
