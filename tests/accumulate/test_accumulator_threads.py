"""Accumulator.append from several threads, in memory and with directory= (issue 12.11).

The promise: each batch is added whole (its rows contiguous, in every leaf at the same place)
and the result equals the sequential result of the same batches in the order they were added.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import tonumpy

THREADS, PER_THREAD = 4, 60


@pytest.fixture(autouse=True)
def fast_switching() -> Iterator[None]:
    """Let the interpreter switch threads as often as it can, to expose races."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(old)


def batch(number: int) -> dict[str, Any]:
    """Batch ``number``: every leaf tells which batch it came from; lengths vary (ragged)."""
    length = 3 + number % 5
    return {
        "ids": torch.full((2, length), number, dtype=torch.int64),
        "scores": torch.full((2, length, 2), float(number)),
        "loss": torch.tensor(float(number)),
        "name": f"batch{number}",
    }


def append_from_threads(acc: tonumpy.Accumulator) -> None:
    errors: list[BaseException] = []
    start = threading.Barrier(THREADS)

    def work(i: int) -> Callable[[], None]:
        def run() -> None:
            try:
                start.wait()
                for k in range(PER_THREAD):
                    acc.append(batch(i * PER_THREAD + k))
                    if k % 17 == 0:
                        len(acc)  # readers interleaved with the writers
            except BaseException as exc:  # noqa: BLE001 - handed to the test's thread
                errors.append(exc)

        return run

    threads = [threading.Thread(target=work(i)) for i in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, f"{len(errors)} appends raised, e.g. {errors[0]!r}"


def check_against_sequential(out: dict[str, Any]) -> None:
    """``out`` holds every batch exactly once, whole, and equals concat in that order."""
    order = [int(name.removeprefix("batch")) for name in out["name"]]
    assert sorted(order) == list(range(THREADS * PER_THREAD))
    np.testing.assert_array_equal(out["loss"], np.array(order, dtype=np.float32))
    expected = tonumpy.concat([batch(n) for n in order], pad_value={"ids": -1, "scores": 0.0})
    for key in ("ids", "scores"):
        np.testing.assert_array_equal(np.asarray(out[key]), expected[key])
    assert out["name"] == expected["name"]


def test_in_memory() -> None:
    """Appends from many threads into an in-memory Accumulator keep every row, as if sequential."""
    acc = tonumpy.Accumulator(pad_value={"ids": -1, "scores": 0.0})
    append_from_threads(acc)
    assert len(acc) == 2 * THREADS * PER_THREAD
    check_against_sequential(acc.result())


def test_in_a_directory(tmp_path: Path) -> None:
    """The repro: raw OSErrors and a directory result() could not read."""
    acc = tonumpy.Accumulator(pad_value={"ids": -1, "scores": 0.0}, directory=tmp_path / "p")
    append_from_threads(acc)
    out = acc.result()
    check_against_sequential(out)
    on_disk = np.load(tmp_path / "p" / "ids.npy")  # the file alone, as another process reads it
    np.testing.assert_array_equal(on_disk, out["ids"])


def test_result_while_appending() -> None:
    """result() from another thread sees a prefix of whole batches, never half of one."""
    acc = tonumpy.Accumulator(pad_value={"ids": -1, "scores": 0.0})
    done, first_read = threading.Event(), threading.Event()
    seen: list[dict[str, Any]] = []

    def read() -> None:
        while not done.is_set():
            if len(acc):
                seen.append(acc.result())
                first_read.set()

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for number in range(80):
            acc.append(batch(number))
            if number == 40:
                assert first_read.wait(30), "the reader never read"
    finally:
        done.set()
        reader.join(60)
    for out in seen:
        rows = len(out["name"])
        assert out["ids"].shape[0] == 2 * rows
        assert out["loss"].tolist() == list(range(rows))  # one thread: call order
