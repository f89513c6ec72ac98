"""Workloads W1-W7: the trees, the contestants, the expected outputs and the output check.

A workload is registered with :func:`workload` and returns one or more :class:`Case` objects;
each case names its baseline (the first contestant) and every ratio is taken against it in the
same process. To add a workload, write a builder here (or in a module imported by ``run.py``)::

    @workload("W9", "what it measures")
    def _w9(quick: bool) -> list[Case]:
        tree = ...
        return [generic_case("W9", tree)]  # baseline, tonumpy, limits, peers
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import optree
import torch

import tonumpy
from _peers import PEERS, DoesNotFitError, load

NS = "bench"  # optree namespace in which the baseline knows the workload's dataclass


class CheckError(AssertionError):
    """A converter's output differs from the expected one; the message names the place."""


@dataclass
class Contestant:
    name: str
    kind: str  # "baseline", "tonumpy", "limit", "peer"
    call: Callable[[], Any] | None
    expected: Any = None  # overrides the case's expected output
    status: str = "ok"  # "ok", "not installed", "does not fit", "fails"
    error: str = ""


@dataclass
class Case:
    name: str  # e.g. "W2", "W5 copy=True", "W7 n=1000"
    tree_leaves: int
    expected: Any
    contestants: list[Contestant] = field(default_factory=list)
    unit_bytes: int = 0  # for bandwidth columns (W5)
    versus: str | None = None  # a contestant tonumpy is also compared with (W6: the bare map)


@dataclass(frozen=True)
class Workload:
    key: str
    title: str
    build: Callable[[bool], list[Case]]


REGISTRY: dict[str, Workload] = {}


def workload(key: str, title: str) -> Callable[[Callable[[bool], list[Case]]], Any]:
    def register(fn: Callable[[bool], list[Case]]) -> Callable[[bool], list[Case]]:
        REGISTRY[key] = Workload(key, title, fn)
        return fn

    return register


# --------------------------------------------------------------------------- output check


def _is_namedtuple(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(type(x), "_fields")


def check(out: Any, expected: Any, path: str = "tree") -> None:
    """Raise :class:`CheckError` unless ``out`` has ``expected``'s containers and values."""
    if isinstance(expected, np.ndarray):
        if not isinstance(out, np.ndarray):
            raise CheckError(f"{path}: expected an ndarray, got {type(out).__name__}")
        if out.dtype != expected.dtype or out.shape != expected.shape:
            raise CheckError(
                f"{path}: expected {expected.dtype}{expected.shape}, got {out.dtype}{out.shape}"
            )
        a, b = out, expected
        if a.dtype.kind == "V" or a.dtype.type.__module__.startswith("ml_dtypes"):
            a, b = a.view(f"u{a.dtype.itemsize}"), b.view(f"u{b.dtype.itemsize}")
        if not np.array_equal(a, b):
            raise CheckError(f"{path}: values differ")
        return
    if isinstance(expected, dict):
        if type(out) is not type(expected):
            raise CheckError(
                f"{path}: expected {type(expected).__name__}, got {type(out).__name__}"
            )
        if list(out) != list(expected):
            raise CheckError(f"{path}: keys or key order differ")
        for k in expected:
            check(out[k], expected[k], f"{path}[{k!r}]")
        return
    if isinstance(expected, list | tuple):
        if type(out) is not type(expected) or len(out) != len(expected):
            raise CheckError(
                f"{path}: expected {type(expected).__name__} of {len(expected)}, "
                f"got {type(out).__name__}"
            )
        for i, (o, e) in enumerate(zip(out, expected, strict=True)):
            check(o, e, f"{path}[{i}]")
        return
    if dataclasses.is_dataclass(expected) and not isinstance(expected, type):
        if type(out) is not type(expected):
            raise CheckError(
                f"{path}: expected {type(expected).__name__}, got {type(out).__name__}"
            )
        for f in dataclasses.fields(expected):
            check(getattr(out, f.name), getattr(expected, f.name), f"{path}.{f.name}")
        return
    if type(out) is not type(expected) or out != expected:
        raise CheckError(f"{path}: expected {expected!r}, got {type(out).__name__}")


def expected_of(tree: Any, leaf: Callable[[torch.Tensor], np.ndarray] | None = None) -> Any:
    """The expected output for ``tree``, built by plain recursion (independent of optree)."""
    fn = leaf or (lambda t: t.detach().cpu().numpy())
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    if isinstance(tree, dict):
        return type(tree)((k, expected_of(v, fn)) for k, v in tree.items())
    if _is_namedtuple(tree):
        return type(tree)(*(expected_of(v, fn) for v in tree))
    if isinstance(tree, list | tuple):
        return type(tree)(expected_of(v, fn) for v in tree)
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        return type(tree)(
            **{f.name: expected_of(getattr(tree, f.name), fn) for f in dataclasses.fields(tree)}
        )
    return tree


# --------------------------------------------------------------------------- contestants


def _guarded(x: Any) -> Any:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x


def baseline(tree: Any) -> Contestant:
    return Contestant(
        "baseline: optree.tree_map(detach.cpu.numpy)",
        "baseline",
        lambda: optree.tree_map(_guarded, tree, namespace=NS),
    )


def limits(tree: Any) -> list[Contestant]:
    def ffu() -> Any:
        leaves, spec = optree.tree_flatten(tree, namespace=NS)
        return optree.tree_unflatten(
            spec, [x.numpy(force=True) if isinstance(x, torch.Tensor) else x for x in leaves]
        )

    tensors = [x for x in optree.tree_leaves(tree, namespace=NS) if isinstance(x, torch.Tensor)]
    out = [
        Contestant("limit: flatten, numpy(force=True), unflatten", "limit", ffu),
        Contestant(
            "limit: per-leaf floor [t.numpy(force=True) for t in leaves]",
            "limit",
            lambda: [t.numpy(force=True) for t in tensors],
            expected=[t.detach().numpy() for t in tensors],
        ),
    ]
    if not any(t.requires_grad for t in tensors):  # t.numpy() refuses tensors that need grad
        out.append(
            Contestant(
                "limit: per-leaf floor [t.numpy() for t in leaves]",
                "limit",
                lambda: [t.numpy() for t in tensors],
                expected=[t.numpy() for t in tensors],
            )
        )
    return out


def peers(tree: Any) -> list[Contestant]:
    out = []
    for peer in PEERS:
        make, why = load(peer)
        name = f"peer: {peer.name}"
        if make is None:
            out.append(
                Contestant(
                    name,
                    "peer",
                    None,
                    status="not installed" if why == "not installed" else "fails",
                    error=why or "",
                )
            )
            continue
        try:
            out.append(Contestant(name, "peer", make(tree)))
        except DoesNotFitError as exc:
            out.append(Contestant(name, "peer", None, status="does not fit", error=str(exc)))
    return out


def generic_case(
    name: str, tree: Any, *, with_peers: bool = True, with_limits: bool = True
) -> Case:
    leaves = len(optree.tree_leaves(tree, namespace=NS))
    case = Case(name, leaves, expected_of(tree))
    case.contestants.append(baseline(tree))
    case.contestants.append(
        Contestant("tonumpy.to_numpy", "tonumpy", lambda: tonumpy.to_numpy(tree))
    )
    if with_limits:
        case.contestants += limits(tree)
    if with_peers:
        case.contestants += peers(tree)
    return case


# --------------------------------------------------------------------------- the trees


class Triple(NamedTuple):
    a: torch.Tensor
    b: torch.Tensor
    c: torch.Tensor


@dataclass
class Record:
    a: torch.Tensor
    b: torch.Tensor
    c: torch.Tensor


optree.register_pytree_node(
    Record,
    lambda r: ((r.a, r.b, r.c), None, ("a", "b", "c")),
    lambda _, ch: Record(*ch),
    namespace=NS,
)


def w2_tree(items: int, *, grad: bool = False) -> list[dict[str, Any]]:
    def t(*shape: int) -> torch.Tensor:
        x = torch.randn(shape)
        return x * 1.0 if not grad else x.requires_grad_() * 1.0

    return [
        {"logits": t(8, 16), "hidden": [t(8, 32) for _ in range(4)], "meta": (t(), "str", 3)}
        for _ in range(items)
    ]


@workload("W1", "flat dict of 10,000 float32 tensors of shape (4,)")
def _w1(quick: bool) -> list[Case]:
    n = 500 if quick else 10_000
    return [generic_case("W1", {f"k{i}": torch.randn(4) for i in range(n)})]


@workload("W2", "list of 1,000 dicts {logits (8,16), hidden [4 x (8,32)], meta (0-d, 'str', 3)}")
def _w2(quick: bool) -> list[Case]:
    return [generic_case("W2", w2_tree(50 if quick else 1000))]


@workload("W3", "W2 with every tensor carrying a grad_fn")
def _w3(quick: bool) -> list[Case]:
    tree = w2_tree(50 if quick else 1000, grad=True)
    assert tree[0]["logits"].grad_fn is not None
    return [generic_case("W3", tree)]


@workload("W4", "1,000 namedtuples + 1,000 dataclasses of 3 tensors")
def _w4(quick: bool) -> list[Case]:
    n = 50 if quick else 1000
    tree = [Triple(torch.randn(4), torch.randn(4), torch.randn(4)) for _ in range(n)]
    tree += [Record(torch.randn(4), torch.randn(4), torch.randn(4)) for _ in range(n)]
    return [generic_case("W4", tree)]


@workload("W5", "one 256 MiB float32 tensor, zero-copy and copy=True")
def _w5(quick: bool) -> list[Case]:
    n = (1 if quick else 256) * 2**20 // 4
    t = torch.randn(n)
    arr = t.numpy()
    zero = generic_case("W5 zero-copy", t, with_limits=False)
    copy = Case("W5 copy=True", 1, expected_of(t), unit_bytes=n * 4)
    copy.contestants = [
        Contestant("baseline: np.copy(array)", "baseline", lambda: np.copy(arr)),
        Contestant(
            "tonumpy.to_numpy(copy=True)", "tonumpy", lambda: tonumpy.to_numpy(t, copy=True)
        ),
        Contestant(
            "t.detach().cpu().numpy().copy()", "limit", lambda: t.detach().cpu().numpy().copy()
        ),
        Contestant("t.clone().numpy() (torch allocation)", "limit", lambda: t.clone().numpy()),
    ]
    return [zero, copy]


@workload("W6", "dict of 1,000 bfloat16 tensors (256,): upcast and ml_dtypes=True")
def _w6(quick: bool) -> list[Case]:
    import ml_dtypes

    n = 100 if quick else 1000
    f32 = {f"k{i}": torch.randn(256) for i in range(n)}
    bf = {k: v.bfloat16() for k, v in f32.items()}
    f32 = {k: v.float() for k, v in bf.items()}  # same values as the bf16 tree
    base = baseline(f32)
    base.name = "baseline: optree.tree_map(detach.cpu.numpy) on the float32 tree"
    base.expected = expected_of(f32)

    up = Case("W6 upcast", n, expected_of(bf, lambda t: t.detach().float().numpy()))
    up.contestants = [
        base,
        Contestant("tonumpy.to_numpy", "tonumpy", lambda: tonumpy.to_numpy(bf)),
        Contestant(
            "optree.tree_map(t.detach().float().numpy())",
            "limit",
            lambda: optree.tree_map(lambda t: t.detach().float().numpy(), bf),
        ),
        *peers(bf),
    ]
    bd = np.dtype(ml_dtypes.bfloat16)
    ml = Case("W6 ml_dtypes", n, expected_of(bf, lambda t: t.view(torch.int16).numpy().view(bd)))
    bare = Contestant(
        "optree.tree_map(t.view(int16).numpy().view(bfloat16))",
        "limit",
        lambda: optree.tree_map(lambda t: t.view(torch.int16).numpy().view(bd), bf),
    )
    ml.contestants = [
        dataclasses.replace(base),
        Contestant(
            "tonumpy.to_numpy(ml_dtypes=True)",
            "tonumpy",
            lambda: tonumpy.to_numpy(bf, ml_dtypes=True),
        ),
        bare,
    ]
    ml.versus = bare.name  # issue 22's target: tonumpy <= 1.10x this bare bit-view map
    return [up, ml]


W7_SIZES = (100, 1_000, 10_000, 100_000)


@workload("W7", "scaling: the W2 shape at 100 ... 100,000 leaves")
def _w7(quick: bool) -> list[Case]:
    sizes = (100, 1_000) if quick else W7_SIZES
    return [generic_case(f"W7 n={n}", w2_tree(n // 8)) for n in sizes]
