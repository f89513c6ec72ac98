"""What each CPU route of ``to_numpy`` buys: ``python benchmarks/routes.py [--rounds N]``.

For each route, the input it serves is timed with the route and without it (the route
disabled in a copy of the function's source, so the input takes the route that would serve it
otherwise), the two alternately, ``--rounds`` rounds each; the minimum and the median per call
are printed, with their ratios (``--clock cpu``: this thread's CPU time instead of wall time). The
figures are quoted in ``tonumpy._convert._bulk``'s docstring.
"""

from __future__ import annotations

import argparse
import functools
import gc
import inspect
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _workloads import Record, Triple, w2_tree
from tonumpy import convert as router
from tonumpy._convert import _bulk


def _edited(module: ModuleType, name: str, old: str, new: str) -> Callable[..., Any]:
    """``module.name`` compiled from its source with ``old`` replaced by ``new``."""
    source = textwrap.dedent(inspect.getsource(getattr(module, name)))
    if old not in source:
        raise SystemExit(f"{module.__name__}.{name} changed: update benchmarks/routes.py")
    namespace = dict(vars(module))
    exec(compile(source.replace(old, new), f"<{name}>", "exec"), namespace)  # noqa: S102
    fn: Callable[..., Any] = namespace[name]
    return fn


# route -> (module, function, the text that takes the route, the text that skips it)
WITHOUT = {
    "lone tensor": (
        router,
        "to_numpy",
        "type(tree) in PLAIN\n        and copy is None",
        "False\n        and copy is None",
    ),
    "numpy pass": (_bulk, "to_arrays", "if not first.requires_grad and not copy:", "if False:"),
    "numpy pass: one map": (
        _bulk,
        "to_arrays",
        "if leaf_types <= plain:  # tensors only",
        "if False:  # tensors only",
    ),
    "grad pass": (
        _bulk,
        "to_arrays",
        "        with torch.no_grad():\n            if copy:",
        "        with torch.no_grad():\n            raise ValueError\n            if copy:",
    ),
    "same-bits pass": (
        _bulk,
        "to_arrays",
        "if ml_dtypes and not copy and first.dtype",
        "if False and first.dtype",
    ),
    "same bits: inference": (
        _bulk,
        "_integer_views",
        "if len(leaves) < _INFERENCE_FROM:",
        "if True:",
    ),
    "low-precision passes": (
        _bulk,
        "to_arrays",
        "        return _low_precision(leaves, copy=copy, ml_dtypes=ml_dtypes)",
        "        return None",
    ),
    "per leaf, quick": (
        router,
        "_per_leaf",
        "quick = copy is None and not scalars",
        "quick = False",
    ),
}


def _inputs() -> dict[str, tuple[Any, dict[str, Any]]]:
    torch.manual_seed(0)
    bf16 = {f"k{i}": torch.randn(256).bfloat16() for i in range(1000)}
    repeated = w2_tree(1000)
    repeated[0]["logits"] = repeated[1]["logits"]  # one tensor twice: the passes decline
    w4: list[Any] = [Triple(torch.randn(4), torch.randn(4), torch.randn(4)) for _ in range(1000)]
    w4 += [Record(torch.randn(4), torch.randn(4), torch.randn(4)) for _ in range(1000)]
    return {
        "W5 (64,)": (torch.randn(64), {}),
        "W1": ({f"k{i}": torch.randn(4) for i in range(10_000)}, {}),
        "W2": (w2_tree(1000), {}),
        "W4": (w4, {}),
        "W3": (w2_tree(1000, grad=True), {}),
        "W6 upcast": (bf16, {}),
        "W6 ml_dtypes": (bf16, {"ml_dtypes": True}),
        "float32 + W6, ml_dtypes": ({"f": torch.randn(4), **bf16}, {"ml_dtypes": True}),
        "W2, a tensor repeated": (repeated, {}),
    }


# (input, the route it serves)
CASES = [
    ("W5 (64,)", "lone tensor"),
    ("W1", "numpy pass"),
    ("W2", "numpy pass"),
    ("W4", "numpy pass"),
    ("W1", "numpy pass: one map"),
    ("W4", "numpy pass: one map"),
    ("W3", "grad pass"),
    ("W6 upcast", "low-precision passes"),
    ("W6 ml_dtypes", "same-bits pass"),
    ("W6 ml_dtypes", "same bits: inference"),
    ("float32 + W6, ml_dtypes", "low-precision passes"),
    ("W2, a tensor repeated", "per leaf, quick"),
]


_CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.thread_time}
_clock = time.perf_counter


def _per_call(fn: Callable[[], Any], n: int) -> float:
    start = _clock()
    for _ in range(n):
        fn()
    return (_clock() - start) / n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--cases", nargs="+", metavar="NAME", help="e.g. W3 W5 (default: all)")
    parser.add_argument(
        "--clock",
        choices=sorted(_CLOCKS),
        default="wall",
        help="wall time, or this thread's CPU time (less moved by a busy machine)",
    )
    args = parser.parse_args(argv)
    global _clock  # noqa: PLW0603 - one clock for the whole run
    _clock = _CLOCKS[args.clock]
    inputs = _inputs()
    originals = {(m, f): getattr(m, f) for m, f, _, _ in WITHOUT.values()}
    for name, route in CASES:
        if args.cases and not any(name.startswith(c) for c in args.cases):
            continue
        tree, options = inputs[name]
        module, fn_name, old, new = WITHOUT[route]
        variants = {
            "with": originals[module, fn_name],
            "without": _edited(module, fn_name, old, new),
        }
        setattr(module, fn_name, variants["with"])
        n = 1
        while _per_call(functools.partial(router.to_numpy, tree, **options), n) * n < 0.02:
            n *= 2
        times: dict[str, list[float]] = {"with": [], "without": []}
        gc.disable()
        try:
            for r in range(args.rounds):
                for key in ("with", "without") if r % 2 else ("without", "with"):
                    setattr(module, fn_name, variants[key])
                    convert = router.to_numpy
                    times[key].append(_per_call(functools.partial(convert, tree, **options), n))
        finally:
            gc.enable()
            setattr(module, fn_name, variants["with"])
        best = {k: min(v) for k, v in times.items()}
        median = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
        print(
            f"{name:26s} {route:21s} with {best['with'] * 1e6:9.1f} us, "
            f"without {best['without'] * 1e6:9.1f} us: {best['without'] / best['with']:.2f}x "
            f"(medians {median['without'] / median['with']:.2f}x)",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
