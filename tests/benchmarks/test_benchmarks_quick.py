"""The peer benchmark suite runs (quick mode) and its output check catches wrong conversions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

import _peers  # noqa: E402
import _workloads  # noqa: E402
from _workloads import CheckError, check, expected_of  # noqa: E402

STATUSES = {"ok", "fails", "not installed", "does not fit"}


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "quick.json"
    res = subprocess.run(
        [sys.executable, str(BENCH / "run.py"), "--quick", "--no-write", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(out.read_text())


def test_quick_run_covers_every_workload(quick_results: dict) -> None:
    """Every registered workload reports, and baseline and tonumpy pass their check in each case."""
    keys = [wl["key"] for wl in quick_results["results"]]
    assert keys == list(_workloads.REGISTRY)
    for wl in quick_results["results"]:
        for case in wl["cases"]:
            by_kind = {row["kind"]: row for row in case["rows"]}
            assert by_kind["baseline"]["status"] == "ok", case["case"]
            tonumpy_row = by_kind["tonumpy"]
            assert tonumpy_row["status"] == "ok", (case["case"], tonumpy_row["error"])
            assert tonumpy_row["ratio_min"] > 0
            assert len(tonumpy_row["times"]) >= 3


def test_every_peer_is_reported(quick_results: dict) -> None:
    """Each peer appears in the generic workloads with a known status, and failures carry text."""
    w1 = next(wl for wl in quick_results["results"] if wl["key"] == "W1")
    rows = {row["name"]: row for row in w1["cases"][0]["rows"]}
    for peer in _peers.PEERS:
        row = rows[f"peer: {peer.name}"]
        assert row["status"] in STATUSES
        if row["status"] == "ok":
            assert row["min"] > 0
        else:
            assert row["error"]
        assert (row["status"] == "not installed") == (not peer.installed())


def test_quick_run_without_any_peer(tmp_path: Path) -> None:
    """With no peer installed (as in CI) the suite still runs and reports each as missing."""
    out = tmp_path / "bare.json"
    env = {**os.environ, "TONUMPY_BENCH_NO_PEERS": "1"}
    cmd = [sys.executable, str(BENCH / "run.py"), "--quick", "--no-write", "--json", str(out)]
    cmd += ["--workloads", "W1", "W6"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    w1 = json.loads(out.read_text())["results"][0]["cases"][0]
    statuses = {row["name"]: row["status"] for row in w1["rows"] if row["kind"] == "peer"}
    assert set(statuses.values()) == {"not installed"}
    assert len(statuses) == len(_peers.PEERS)


def test_import_cost_is_measured(quick_results: dict) -> None:
    """The import-time measurement parsed python -X importtime's line for tonumpy, with its
    bytecode cached and compiled from source (both measured; which is faster is a timing, left
    to the benchmark's report: on a loaded machine the two can cross)."""
    imp = quick_results["import"]
    assert imp["warm_min_us"] > 0
    assert imp["cold_min_us"] > 0
    assert imp["min_us"] == imp["warm_min_us"]


def test_missing_peer_is_not_installed() -> None:
    """A peer whose package is absent is reported, not imported."""
    ghost = _peers.Peer("ghost", "no_such_package_tonumpy_bench", "ghost(tree)", lambda: 1 / 0)
    assert _peers.load(ghost) == (None, "not installed")


Pair = namedtuple("Pair", "x y")


def _tree() -> dict:
    return {
        "a": torch.arange(3.0),
        "b": [torch.ones(2, requires_grad=True), "s", 3],
        "c": Pair(torch.zeros(1), torch.tensor(2)),
    }


def test_check_accepts_a_correct_conversion() -> None:
    """The reference output passes the check against itself-built expectations."""
    tree = _tree()
    check(expected_of(tree), expected_of(tree))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda o: {**o, "a": torch.arange(3.0)}, "expected an ndarray"),
        (lambda o: {**o, "a": o["a"] + 1}, "values differ"),
        (lambda o: {**o, "a": o["a"].astype(np.float64)}, "expected float32"),
        (lambda o: {"b": o["b"], "a": o["a"], "c": o["c"]}, "key order"),
        (lambda o: {**o, "c": tuple(o["c"])}, "expected Pair"),
        (lambda o: {**o, "b": [*o["b"][:2], "3"]}, "expected 3"),
    ],
    ids=["tensor-left", "values", "dtype", "key-order", "namedtuple-lost", "leaf-changed"],
)
def test_check_rejects_wrong_conversions(mutate, message: str) -> None:
    """Unconverted tensors, wrong values or dtypes, lost container types and key order fail."""
    tree = _tree()
    with pytest.raises(CheckError, match=message):
        check(mutate(expected_of(tree)), expected_of(tree))


_PEER_SCRIPT = """
import json, sys, torch
sys.path.insert(0, sys.argv[1])
import _peers
from _workloads import CheckError, check, expected_of
tree = {"x": torch.randn(3), "y": torch.randn(2, 2)}
report = {}
for peer in _peers.PEERS:
    make, why = _peers.load(peer)
    if make is None:
        report[peer.name] = why
        continue
    out = make(tree)()
    check(out, expected_of(tree))
    try:
        check(out, expected_of({"x": tree["x"] + 1, "y": tree["y"]}))
    except CheckError:
        report[peer.name] = "checked"
    else:
        report[peer.name] = "a wrong value passed the check"
print(json.dumps(report))
"""


def test_each_peer_output_is_checked() -> None:
    """Each installed peer converts a flat dict correctly, and the check sees a wrong value.

    Runs in a subprocess: importing the peers (transformers, tensordict, ...) registers global
    state that must not leak into the other tests of this session.
    """
    res = subprocess.run(
        [sys.executable, "-c", _PEER_SCRIPT, str(BENCH)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert list(report) == [peer.name for peer in _peers.PEERS]
    for peer in _peers.PEERS:
        if peer.installed():
            assert report[peer.name] == "checked" or report[peer.name].startswith("does not import")
        else:
            assert report[peer.name] == "not installed"


def test_routes_benchmark_still_disables_each_route() -> None:
    """benchmarks/routes.py (whose figures _bulk's docstring quotes) still finds, in today's
    source, the text it edits to turn each route off, and times every case."""
    res = subprocess.run(
        [sys.executable, str(BENCH / "routes.py"), "--rounds", "1"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert res.returncode == 0, res.stderr[-3000:] + res.stdout[-3000:]
    lines = res.stdout.splitlines()
    assert len(lines) == 12  # one per case of routes.CASES
    assert all(" with " in line and " without " in line for line in lines)
