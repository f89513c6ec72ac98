"""tonumpy against the peers: ``python benchmarks/run.py [--quick] [--workloads W1 W2 ...]``.

Each workload runs in a fresh Python process (``--worker``). There, every contestant's output is
checked against the expected tree first (a failure is reported with its error text instead of a
time); then the contestants that passed are timed round-robin: one warm-up call, >= 7 repeats of
a calibrated number of calls with the garbage collector off, min and median per call. Ratios
are taken against the case's baseline measured in the same process.

The full run writes its tables into docs/performance.md (between the ``peers`` markers) and the
charts into docs/img/; ``--quick`` (tiny trees, 3 repeats, one process) only proves that
everything runs and writes nothing. ``--json FILE`` saves the raw results.
"""

from __future__ import annotations

import argparse
import compileall
import gc
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DOC = ROOT / "docs" / "performance.md"
IMG = ROOT / "docs" / "img"
BEGIN, END = "<!-- peers:begin (written by benchmarks/run.py) -->", "<!-- peers:end -->"


# --------------------------------------------------------------------------- worker side


def _time_case(case: Any, repeats: int, budget: float, *, collect: bool) -> dict[str, Any]:
    from _workloads import check

    rows = []
    live = []
    for c in case.contestants:
        row = {"name": c.name, "kind": c.kind, "status": c.status, "error": c.error}
        rows.append(row)
        if c.status != "ok":
            continue
        try:
            out = c.call()
            check(out, case.expected if c.expected is None else c.expected)
            del out
        except Exception as exc:
            row["status"] = "fails"
            row["error"] = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:200]
            continue
        # calibrate: enough calls per repeat to last about `budget` seconds
        t0 = time.perf_counter()
        c.call()
        single = max(time.perf_counter() - t0, 1e-7)
        row["number"] = max(1, min(10_000, int(budget / single)))
        row["times"] = []
        live.append((c, row))
    for r in range(repeats):
        order = live[r % len(live) :] + live[: r % len(live)] if live else []
        if collect:  # a full collection takes ~0.1 s once the peers are imported
            gc.collect()
        for c, row in order:
            call, number = c.call, row["number"]
            gc.disable()
            try:
                t0 = time.perf_counter()
                for _ in range(number):
                    call()
                dt = time.perf_counter() - t0
            finally:
                gc.enable()
            row["times"].append(dt / number)
    base = rows[0]
    for row in rows:
        if "times" in row:
            row["min"] = min(row["times"])
            row["median"] = statistics.median(row["times"])
    if "min" in base:
        for row in rows:
            if "min" in row:
                row["ratio_min"] = row["min"] / base["min"]
                row["ratio_median"] = row["median"] / base["median"]
    out = {"case": case.name, "leaves": case.tree_leaves, "bytes": case.unit_bytes, "rows": rows}
    if case.versus is not None:
        out["versus"] = _versus(rows, case.versus)
    return out


def _versus(rows: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """tonumpy's time over the contestant ``name``'s: min over min, and the per-round ratios.

    Both are timed in every round, a few milliseconds apart, so the ratio within a round is the
    one least moved by the load of the machine: its median and quartiles are given.
    """
    ours = next(r for r in rows if r["kind"] == "tonumpy")
    ref = next(r for r in rows if r["name"] == name)
    if "times" not in ours or "times" not in ref:
        return {"name": name, "status": "fails"}
    per_round = [a / b for a, b in zip(ours["times"], ref["times"], strict=True)]
    q1, median, q3 = statistics.quantiles(per_round, n=4)
    return {
        "name": name,
        "status": "ok",
        "ratio_min": ours["min"] / ref["min"],
        "ratio_median": median,
        "ratio_q1": q1,
        "ratio_q3": q3,
    }


def worker(keys: list[str], quick: bool) -> list[dict[str, Any]]:
    sys.path.insert(0, str(HERE))
    from _workloads import REGISTRY

    repeats, budget = (3, 0.0005) if quick else (9, 0.05)
    results = []
    for key in keys:
        wl = REGISTRY[key]
        cases = [_time_case(case, repeats, budget, collect=not quick) for case in wl.build(quick)]
        results.append({"key": key, "title": wl.title, "cases": cases})
    return results


# --------------------------------------------------------------------------- parent side


def import_cost(runs: int) -> dict[str, Any]:
    """``import tonumpy`` after ``import torch``: cumulative µs from ``python -X importtime``.

    Measured twice: *warm*, with tonumpy's bytecode cached (what every import after the first
    costs, and every import after ``pip install``, which compiles it), and *cold*, compiled from
    source (the first import after an editable install, or any import where
    ``PYTHONDONTWRITEBYTECODE`` is set and no cache exists).
    """
    import tonumpy

    package = Path(tonumpy.__file__).parent
    cache = package / "__pycache__"
    code = (
        "import torch, tonumpy, sys; "
        "print(sorted(m for m in ('ml_dtypes', 'safetensors', 'tensorboard', 'pandas') "
        "if m in sys.modules))"
    )
    out: dict[str, Any] = {}
    for mode in ("warm", "cold"):
        env = dict(os.environ)
        if mode == "warm":
            compileall.compile_dir(package, quiet=1, force=True)
            env.pop("PYTHONDONTWRITEBYTECODE", None)
        else:
            env["PYTHONDONTWRITEBYTECODE"] = "1"
        costs = []
        for _ in range(runs):
            if mode == "cold":
                shutil.rmtree(cache, ignore_errors=True)
            res = subprocess.run(
                [sys.executable, "-X", "importtime", "-c", code],
                capture_output=True,
                text=True,
                check=True,
                env=env,
            )
            for line in res.stderr.splitlines():
                m = re.match(r"import time:\s+\d+\s+\|\s+(\d+)\s+\|\s+tonumpy$", line)
                if m:
                    costs.append(int(m.group(1)))
            out["optional_loaded"] = res.stdout.strip()
        out[f"{mode}_min_us"] = min(costs)
        out[f"{mode}_median_us"] = statistics.median(costs)
    out["min_us"], out["median_us"] = out["warm_min_us"], out["warm_median_us"]
    return out


def environment() -> dict[str, str]:
    import numpy
    import optree
    import torch

    import tonumpy

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "optree": optree.__version__,
        "tonumpy": tonumpy.__version__,
    }
    for dist in (
        "transformers",
        "accelerate",
        "lightning-utilities",
        "dm-tree",
        "fastai",
        "tensordict",
        "ml_dtypes",
    ):
        try:
            from importlib.metadata import version

            versions[dist] = version(dist)
        except Exception:
            versions[dist] = "not installed"
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "load": f"{load:.1f}",
        "torch_threads": str(torch.get_num_threads()),
        **versions,
    }


def _row_key(row: dict[str, Any]) -> str:
    """Summary rows: one for the baselines, one for tonumpy, one per peer."""
    return {"baseline": "baseline", "tonumpy": "**tonumpy**"}.get(row["kind"], row["name"])


def _fmt_time(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.1f} µs"
    return f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s"


def markdown(results: list[dict[str, Any]], env: dict[str, str], imp: dict[str, Any] | None) -> str:
    out = [
        f"Measured {env['date']} with `python benchmarks/run.py`: {env['cpu']}, {env['cores']} "
        f"cores (shared; load average {env['load']} at the start), torch threads "
        f"{env['torch_threads']}.",
        "",
        "Versions: "
        + ", ".join(
            f"{k} {v}"
            for k, v in env.items()
            if k not in ("date", "cpu", "cores", "load", "torch_threads")
        )
        + ".",
        "",
        "Ratio = min time / the baseline's min time in the same process (median ratio beside it); "
        "lower is faster. *fails* = the output check failed (reason given), so no time.",
        "",
    ]
    summary: dict[str, dict[str, str]] = {}
    names: list[str] = []
    for wl in results:
        for case in wl["cases"]:
            for row in case["rows"]:
                key = _row_key(row)
                if key not in names and row["kind"] != "limit":
                    names.append(key)
                cell = f"{row['ratio_min']:.2f}x" if "ratio_min" in row else row["status"]
                summary.setdefault(key, {})[case["case"]] = cell
    cases = [c["case"] for wl in results for c in wl["cases"] if not c["case"].startswith("W7")]
    out += [
        "### Summary: ratio to the baseline",
        "",
        "| converter | " + " | ".join(cases) + " |",
        "| --- |" + " ---: |" * len(cases),
    ]
    for name in names:
        out.append(f"| {name} | " + " | ".join(summary[name].get(c, "") for c in cases) + " |")
    out.append("")
    for wl in results:
        for case in wl["cases"]:
            if "versus" in case:
                out += [f"**{case['case']}**: " + _versus_line(case["versus"]), ""]
    out += ["![ratio per converter and workload](img/peers.png)", ""]
    for wl in results:
        out += [f"### {wl['key']}: {wl['title']}", ""]
        for case in wl["cases"]:
            extra = " GB/s |" if case["bytes"] else " ns / leaf |"
            out += [
                f"**{case['case']}** ({case['leaves']:,} leaves)",
                "",
                "| converter | min | median | ratio (min) | ratio (median) |" + extra,
                "| --- | ---: | ---: | ---: | ---: | ---: |",
            ]
            for row in case["rows"]:
                if "min" in row:
                    tail = (
                        f"{case['bytes'] / row['min'] / 1e9:.1f}"
                        if case["bytes"]
                        else f"{row['min'] / case['leaves'] * 1e9:.0f}"
                    )
                    out.append(
                        f"| {row['name']} | {_fmt_time(row['min'])} | "
                        f"{_fmt_time(row['median'])} | {row.get('ratio_min', 0):.2f}x | "
                        f"{row.get('ratio_median', 0):.2f}x | {tail} |"
                    )
                else:
                    err = row["error"].replace("|", "\\|")
                    out.append(f"| {row['name']} | {row['status']} | | | | {err} |")
            out.append("")
            if "versus" in case:
                out += [_versus_line(case["versus"]), ""]
        if wl["key"] == "W7":
            out += _scaling_table(wl["cases"])
            out += ["![time per leaf against the number of leaves](img/scaling.png)", ""]
    if imp:
        out += [
            "### Import cost",
            "",
            f"`import tonumpy` after `import torch` (`python -X importtime`, cumulative, "
            f"5 fresh processes each): with its bytecode cached (every import after the first, "
            f"and after `pip install`) min {imp['warm_min_us'] / 1e3:.1f} ms, median "
            f"{imp['warm_median_us'] / 1e3:.1f} ms; compiled from source (the first import "
            f"after an editable install) min {imp['cold_min_us'] / 1e3:.1f} ms, median "
            f"{imp['cold_median_us'] / 1e3:.1f} ms. Optional dependencies loaded by it: "
            f"{imp['optional_loaded']}.",
            "",
        ]
    return "\n".join(out)


def _versus_line(versus: dict[str, Any]) -> str:
    """The sentence under a case's table that compares tonumpy with one other contestant."""
    head = f"tonumpy / `{versus['name']}`, same process:"
    if versus["status"] != "ok":
        return f"{head} no ratio (one of the two fails its output check)."
    return (
        f"{head} **{versus['ratio_min']:.2f}x** (min over min); per round (the two timed in "
        f"every round): median {versus['ratio_median']:.2f}x, quartiles "
        f"{versus['ratio_q1']:.2f}-{versus['ratio_q3']:.2f}x."
    )


def _scaling_table(cases: list[dict[str, Any]]) -> list[str]:
    """W7 in one table: ns per leaf at each size, and the growth from 1,000 leaves to the most."""
    sizes = [c["case"].removeprefix("W7 ") for c in cases]
    per_leaf: dict[str, dict[str, float]] = {}
    for size, case in zip(sizes, cases, strict=True):
        for row in case["rows"]:
            if "min" in row:
                per_leaf.setdefault(row["name"], {})[size] = row["min"] / case["leaves"] * 1e9
    first, last = "n=1000", sizes[-1]
    out = [
        "**W7 time per leaf** (ns, min; growth = the largest size / n=1000)",
        "",
        "| converter | " + " | ".join(sizes) + f" | growth {first} -> {last} |",
        "| --- |" + " ---: |" * (len(sizes) + 1),
    ]
    for name, row in per_leaf.items():
        cells = [f"{row[s]:.0f}" if s in row else "" for s in sizes]
        growth = f"{row[last] / row[first]:.2f}x" if first in row and last in row else ""
        out.append(f"| {name} | " + " | ".join(cells) + f" | {growth} |")
    out.append("")
    return out


def charts(results: list[dict[str, Any]]) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no charts (pip install matplotlib)")
        return []
    IMG.mkdir(parents=True, exist_ok=True)
    cases = [c for wl in results for c in wl["cases"] if not c["case"].startswith("W7")]
    names = []
    for c in cases:
        for r in c["rows"]:
            if _row_key(r) not in names and r["kind"] in ("tonumpy", "peer"):
                names.append(_row_key(r))
    fig, ax = plt.subplots(figsize=(11, 4.8))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        xs, ys = [], []
        for j, c in enumerate(cases):
            for r in c["rows"]:
                if _row_key(r) == name and "ratio_min" in r:
                    xs.append(j + i * width)
                    ys.append(r["ratio_min"])
        ax.bar(xs, ys, width, label=name.removeprefix("peer: ").strip("*"))
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(
        [j + 0.4 - width / 2 for j in range(len(cases))], [c["case"] for c in cases], rotation=15
    )
    ax.set_yscale("log")
    ax.set_ylabel("time / baseline (log; missing bar = fails)")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(IMG / "peers.png", dpi=90)
    plt.close(fig)
    written = ["docs/img/peers.png"]
    w7 = [c for wl in results for c in wl["cases"] if c["case"].startswith("W7")]
    if w7:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for name in [r["name"] for r in w7[0]["rows"]]:
            pts = [
                (c["leaves"], r["min"] / c["leaves"] * 1e9)
                for c in w7
                for r in c["rows"]
                if r["name"] == name and "min" in r
            ]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=name.removeprefix("peer: "))
        ax.set_xscale("log")
        ax.set_xlabel("leaves")
        ax.set_ylabel("ns per leaf (min)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(IMG / "scaling.png", dpi=90)
        plt.close(fig)
        written.append("docs/img/scaling.png")
    return written


def write_doc(text: str) -> None:
    doc = DOC.read_text() if DOC.exists() else "# Performance\n"
    block = f"{BEGIN}\n{text}\n{END}"
    if BEGIN in doc and END in doc:
        doc = doc[: doc.index(BEGIN)] + block + doc[doc.index(END) + len(END) :]
    else:
        doc = doc.rstrip() + "\n\n## Against the peers\n\n" + block + "\n"
    DOC.write_text(doc)


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(HERE))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny trees, 3 repeats, one process")
    p.add_argument("--workloads", nargs="+", metavar="W", help="e.g. W1 W6 (default: all)")
    p.add_argument("--no-write", action="store_true", help="do not touch docs/")
    p.add_argument("--json", type=Path, help="also save the raw results here")
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.quick)))
        return 0
    from _workloads import REGISTRY

    keys = args.workloads or list(REGISTRY)
    unknown = set(keys) - set(REGISTRY)
    if unknown:
        p.error(f"unknown workloads {sorted(unknown)}; known: {sorted(REGISTRY)}")
    groups = [keys] if args.quick else [[k] for k in keys]  # full run: a fresh process each
    results = []
    for group in groups:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", *group]
        cmd += ["--quick"] if args.quick else []
        print("running", " ".join(group), "...", flush=True)
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            print(res.stderr, file=sys.stderr)
            return res.returncode
        results += json.loads(res.stdout.strip().splitlines()[-1])
    env = environment()
    imp = import_cost(1 if args.quick else 5)
    text = markdown(results, env, imp)
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"env": env, "import": imp, "results": results}, indent=1))
    if not args.quick and not args.no_write:
        print("charts:", charts(results))
        write_doc(text)
        print(f"wrote {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
