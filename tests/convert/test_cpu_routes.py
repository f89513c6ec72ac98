"""The CPU routes of ``to_numpy``, each taken by the inputs that lead to it, same results.

The router (``tonumpy.convert``) converts a lone CPU tensor without a walk, distinct plain CPU
tensors in bulk (one comprehension of ``t.numpy()``, with grad turned off for trees that
require grad; bfloat16 stacked by shape and widened at once), and everything else leaf by leaf.
These tests give each route the inputs that take it and pin what it must give: the values and
bits of ``t.float()``, arrays that own their memory, the tree's order, and memory shared with
the input exactly where ``copy=None`` promises it. They never look at which route ran.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest
import torch

from _helpers.engine import CudaSpy, convert_through
from _helpers.threads import run_beside
from _helpers.trees import assert_same_tree
from tonumpy import UnsupportedLeafError, _tree, to_numpy
from tonumpy._convert import _bulk

# All 65,536 bfloat16 bit patterns (NaN payloads, infinities, subnormals, both zeros).
_ALL_BF16 = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)


def _reference(t: torch.Tensor) -> np.ndarray:
    """What the careful path gives for a tensor: ``t.detach().float()`` as an array."""
    return t.detach().float().numpy()


@pytest.mark.parametrize("shape", [(256,), (8, 32), (2, 4, 8)])
def test_bulk_upcast_is_bit_exact_for_all_patterns(shape: tuple[int, ...]) -> None:
    """Every bf16 bit pattern, spread over many same-shape leaves (several stacked blocks)."""
    per_leaf = int(np.prod(shape))
    leaves = list(_ALL_BF16.reshape(-1, *shape).unbind())
    assert len(leaves) * per_leaf > _bulk._STACK_BLOCK  # more than one block
    tree = {f"k{i}": t.clone() for i, t in enumerate(leaves)}
    assert_same_tree(to_numpy(tree), {key: _reference(t) for key, t in tree.items()})


def test_bulk_upcast_arrays_own_their_memory() -> None:
    """Each widened array is its own allocation: no shared block keeps the others alive."""
    tree = [torch.randn(64).bfloat16() for _ in range(50)]
    out = to_numpy(tree)
    for arr in out:
        assert arr.base is None
        assert arr.flags.owndata
        assert arr.flags.c_contiguous
        assert arr.flags.writeable
    for a, b in itertools.pairwise(out):
        assert not np.shares_memory(a, b)
    out[0][:] = 0  # writing one array changes neither the others nor the input
    assert out[1].any()
    assert tree[0].float().any()


def test_bulk_upcast_mixed_shapes_and_dtypes_keep_order() -> None:
    """Groups, singles, 0-d, empty, larger-than-a-block leaves and other dtypes, interleaved."""
    big = torch.randn(_bulk._STACK_BLOCK + 3).bfloat16()  # widened on its own
    tree: dict[str, Any] = {
        "a": torch.randn(4, 4).bfloat16(),
        "f32": torch.randn(3),
        "b": torch.randn(4, 4).bfloat16(),
        "zero_d": torch.tensor(1.5, dtype=torch.bfloat16),
        "zero_d2": torch.tensor(-2.0, dtype=torch.bfloat16),
        "empty": torch.empty(0, 7, dtype=torch.bfloat16),
        "empty2": torch.empty(0, 7, dtype=torch.bfloat16),
        "odd": torch.randn(5).bfloat16(),  # the only leaf of its shape
        "ints": torch.arange(6),
        "big": big,
        "text": "keep",
        "c": torch.randn(4, 4).bfloat16(),
        "grad": torch.randn(2, requires_grad=True),
    }

    def expected(value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        return _reference(value) if value.dtype == torch.bfloat16 else value.detach().numpy()

    want = {key: expected(value) for key, value in tree.items()}
    out = to_numpy(tree)
    assert_same_tree(out, want, identical_objects=True)
    assert out["zero_d"].shape == ()  # an array, not a NumPy scalar


def test_bulk_upcast_handles_grad_and_non_contiguous_leaves() -> None:
    """bf16 leaves that require grad widen in bulk; non-contiguous ones take the careful path."""
    base = torch.randn(6, 8).bfloat16()
    tree = {
        "grad": [torch.randn(8).bfloat16().requires_grad_() for _ in range(3)],
        "t": base.t(),  # non-contiguous
        "row": base[::2],  # non-contiguous
    }
    want = {
        "grad": [_reference(t) for t in tree["grad"]],
        "t": _reference(base.t()),
        "row": _reference(base[::2]),
    }
    assert_same_tree(to_numpy(tree), want)


def test_plain_tensors_share_memory_and_grad_tensors_are_detached() -> None:
    """copy=None: arrays view the tensors' memory, whether or not they require grad."""
    plain = torch.arange(6.0)
    grad = torch.ones(3, requires_grad=True)
    nonleaf = grad * 2  # carries a grad_fn
    out = to_numpy([plain, grad, nonleaf, plain[1::2]])
    assert np.shares_memory(out[0], plain.numpy())
    assert np.shares_memory(out[1], grad.detach().numpy())
    np.testing.assert_array_equal(out[2], [2.0, 2.0, 2.0])
    np.testing.assert_array_equal(out[3], [1.0, 3.0, 5.0])
    plain[0] = 42.0  # a view, as documented for copy=None
    assert out[0][0] == 42.0


@pytest.mark.parametrize("first", ["plain", "grad", "conj", "bf16"])
def test_fast_tier_fallbacks_in_any_order(first: str) -> None:
    """A leaf that makes the first comprehension fail may come first, last or in between."""
    kinds = {
        "plain": lambda: torch.arange(4.0),
        "grad": lambda: torch.arange(4.0, requires_grad=True),
        "conj": lambda: torch.tensor([1 + 2j, 3 - 1j]).conj(),
        "bf16": lambda: torch.arange(4.0).bfloat16(),
    }
    order = [first] + [k for k in kinds if k != first]
    tree = [kinds[k]() for k in order + order]
    want = [
        _reference(t) if t.dtype == torch.bfloat16 else t.detach().resolve_conj().numpy()
        for t in tree
    ]
    assert_same_tree(to_numpy(tree), want)


def test_ml_dtypes_bulk_path_keeps_bits_and_shares_memory() -> None:
    """ml_dtypes=True: bf16 leaves come back as bit views of the tensors, not copies."""
    pytest.importorskip("ml_dtypes")
    tree = {f"k{i}": t.clone() for i, t in enumerate(_ALL_BF16.reshape(-1, 1024).unbind())}
    tree["f32"] = torch.ones(2)
    out = to_numpy(tree, ml_dtypes=True)
    for key, t in tree.items():
        if t.dtype == torch.bfloat16:
            assert out[key].dtype.name == "bfloat16"
            np.testing.assert_array_equal(out[key].view(np.int16), t.view(torch.int16).numpy())
            assert np.shares_memory(out[key].view(np.int16), t.view(torch.int16).numpy())


def test_ml_dtypes_mixed_tree_views_of_grad_tensors_are_read_only() -> None:
    """ml_dtypes=True, a float32 leaf first: the bfloat16 leaf that requires grad comes back
    as a read-only bit view, the others writable, every value that of the leaf alone."""
    pytest.importorskip("ml_dtypes")
    grad = torch.linspace(-2, 2, 8).bfloat16().requires_grad_()
    tree = [torch.ones(3), grad, torch.arange(4).bfloat16()]
    out = to_numpy(tree, ml_dtypes=True)
    assert [a.flags.writeable for a in out] == [True, False, True]
    assert out[1].dtype.name == "bfloat16"
    assert np.shares_memory(out[1].view(np.int16), grad.detach().view(torch.int16).numpy())
    for t, arr in zip(tree, out, strict=True):
        alone = to_numpy([t], ml_dtypes=True, copy=True)[0]
        np.testing.assert_array_equal(arr.view(f"u{arr.itemsize}"), alone.view(f"u{arr.itemsize}"))


@pytest.mark.parametrize("n", [3, 300, 10_000])
def test_repeated_tensor_in_large_and_small_trees_gives_one_array(n: int) -> None:
    """A tensor at two places becomes one array at both, whichever duplicate check runs."""
    shared = torch.arange(3.0)
    tree = [torch.randn(2) for _ in range(n)] + ["str", "str", 3, 3, shared]
    tree.insert(1, shared)
    out = to_numpy(tree)
    assert out[1] is out[-1]
    assert np.shares_memory(out[1], shared.numpy())
    assert out[-3] == 3
    assert len({id(a) for a in out if isinstance(a, np.ndarray)}) == n + 1


def test_lone_tensor_shortcut_matches_the_general_path() -> None:
    """A bare CPU tensor skips the walk; every tensor it cannot take still converts right."""
    t = torch.arange(6.0).reshape(2, 3)
    out = to_numpy(t)
    assert isinstance(out, np.ndarray)
    assert np.shares_memory(out, t.numpy())
    np.testing.assert_array_equal(to_numpy(t.t()), t.t().numpy())  # strided view
    np.testing.assert_array_equal(to_numpy(t.requires_grad_()), t.detach().numpy())
    z = torch.tensor([1 + 2j]).conj()  # conj bit: .numpy() refuses, the general path resolves
    np.testing.assert_array_equal(to_numpy(z), np.array([1 - 2j], dtype=np.complex64))
    assert to_numpy(torch.tensor(3), scalars=True) == 3
    assert not np.shares_memory(to_numpy(t, copy=True), t.detach().numpy())


def test_lone_meta_tensor_is_refused() -> None:
    """The shortcut's refusal leads to the general path's error, not a raw RuntimeError."""
    with pytest.raises(UnsupportedLeafError, match="meta"):
        to_numpy(torch.empty(3, device="meta"))


def test_once_cuda_is_in_use_cpu_trees_stay_zero_copy() -> None:
    """With CUDA initialised (as on any GPU machine), CPU trees convert as before: the same
    values, and views of the tensors' memory where copy=None allows it."""
    trees = {
        "plain": {"a": torch.arange(3.0), "b": [torch.ones(2, 2), "x", 3]},
        "grad": {"a": torch.ones(2, requires_grad=True), "b": torch.arange(2)},
        "bf16": [torch.randn(4).bfloat16() for _ in range(3)],
    }
    want = {name: to_numpy(tree) for name, tree in trees.items()}
    for name, tree in trees.items():
        got = convert_through(CudaSpy(), tree)
        assert_same_tree(got, want[name], identical_objects=True)
        for g, t in zip(_tree.flatten(got)[0], _tree.flatten(tree)[0], strict=True):
            if isinstance(t, torch.Tensor) and t.dtype != torch.bfloat16:
                assert np.shares_memory(g, t.detach().numpy())


@pytest.mark.cuda
def test_cuda_tree_and_cpu_tree_after_cuda_init() -> None:
    """On a GPU: a CPU tree takes the fast pass; a mixed tree sends device leaves to the engine."""
    dev = torch.ones(3, device="cuda")
    assert torch.cuda.is_initialized()
    cpu_tree = {"a": torch.arange(4.0), "b": [torch.ones(2), "s"]}
    out = to_numpy(cpu_tree)
    assert np.shares_memory(out["a"], cpu_tree["a"].numpy())
    mixed = {"cpu": torch.arange(3.0), "gpu": dev * 2, "bf": dev.bfloat16()}
    got = to_numpy(mixed)
    np.testing.assert_array_equal(got["cpu"], [0.0, 1.0, 2.0])
    np.testing.assert_array_equal(got["gpu"], [2.0, 2.0, 2.0])
    assert got["bf"].dtype == np.float32


def test_per_leaf_route_with_repeated_non_tensor_leaves() -> None:
    """A subclass leaf sends the tree leaf by leaf: plain tensors are still zero-copy views,
    repeated strings and numbers come back as themselves."""

    class Tagged(torch.Tensor):
        pass

    tagged = torch.arange(2.0).as_subclass(Tagged)
    tree = [{"x": torch.full((2,), float(i)), "s": "same", "n": 3} for i in range(300)]
    tree.append({"tagged": tagged})
    out = to_numpy(tree)
    for i, (got, given) in enumerate(zip(out[:-1], tree[:-1], strict=True)):
        np.testing.assert_array_equal(got["x"], np.full(2, float(i), np.float32))
        assert np.shares_memory(got["x"], given["x"].numpy())
        assert got["s"] is given["s"]
        assert got["n"] == 3
    np.testing.assert_array_equal(out[-1]["tagged"], [0.0, 1.0])
    assert type(out[-1]["tagged"]) is np.ndarray


@pytest.mark.parametrize("with_parameter", [False, True])
def test_grad_views_read_only_among_plain_values(with_parameter: bool) -> None:
    """Beside strings, numbers, None and arrays, exactly the grad tensors' views are read-only."""
    grad = torch.randn(3, requires_grad=True) * 2
    plain = torch.randn(3)
    param = torch.nn.Parameter(torch.randn(2))
    given = np.zeros(2)
    tree: dict[str, Any] = {"g": grad, "p": plain, "s": "x", "n": 3, "f": 0.5, "z": None}
    tree["a"] = given
    if with_parameter:
        tree["w"] = param
    out = to_numpy(tree)
    assert not out["g"].flags.writeable
    assert out["p"].flags.writeable
    assert out["a"] is given
    assert given.flags.writeable  # the user's array is not touched
    assert (out["s"], out["n"], out["f"], out["z"]) == ("x", 3, 0.5, None)
    if with_parameter:
        assert not out["w"].flags.writeable
    np.testing.assert_array_equal(out["g"], grad.detach().numpy())


def test_grad_views_read_only_beside_a_leaf_with_a_requires_grad_property() -> None:
    """A leaf object's ``requires_grad`` property is never read; grad views beside it read-only."""
    reads: list[int] = []

    class Flagged:
        @property
        def requires_grad(self) -> bool:
            reads.append(1)
            return True

    leaf = Flagged()
    grad = torch.randn(4, requires_grad=True) * 2
    out = to_numpy({"o": leaf, "g": grad}, is_leaf=lambda x: isinstance(x, Flagged))
    assert out["o"] is leaf
    assert not reads
    assert not out["g"].flags.writeable


@pytest.mark.parametrize("copy", [None, True])
def test_arrays_of_grad_tensors_do_not_keep_the_graph_alive(copy: bool | None) -> None:
    """The arrays of tensors that require grad hold no reference to them or to their graph."""
    import gc
    import weakref

    x = torch.ones(8, requires_grad=True)
    tree = [{"y": x * i, "s": "str", "n": 3} for i in range(64)]
    refs = [weakref.ref(item["y"]) for item in tree]  # each carries a grad_fn
    out = to_numpy(tree, copy=copy)
    del tree
    gc.collect()
    assert all(ref() is None for ref in refs)
    assert all(item["y"].base is None or not item["y"].base.requires_grad for item in out)
    for i, item in enumerate(out):
        np.testing.assert_array_equal(item["y"], np.full(8, float(i), np.float32))
        assert item["y"].flags.writeable is (copy is True)
        assert (item["s"], item["n"]) == ("str", 3)


@pytest.mark.parametrize("mode", ["enabled", "no_grad", "inference"])
def test_grad_mode_is_left_as_it_was(mode: str) -> None:
    """Converting tensors that require grad leaves the caller's grad mode as it was."""
    contexts = {
        "enabled": torch.enable_grad,
        "no_grad": torch.no_grad,
        "inference": torch.inference_mode,
    }
    x = torch.ones(3, requires_grad=True)
    y = x * 2
    conj = torch.tensor([1 + 2j]).conj()  # refused by the fast passes: the fallback runs
    with contexts[mode]():
        before = torch.is_grad_enabled()
        out = to_numpy([y, "s", y * 0 + 1 if mode == "enabled" else y])
        mixed = to_numpy([y, conj, "s"])
        assert torch.is_grad_enabled() is before
    np.testing.assert_array_equal(out[0], [2.0, 2.0, 2.0])
    np.testing.assert_array_equal(mixed[1], [1 - 2j])
    assert not mixed[0].flags.writeable
    if mode == "enabled":  # the graph still works afterwards
        y.sum().backward()
        assert x.grad is not None
        np.testing.assert_array_equal(x.grad.numpy(), [2.0, 2.0, 2.0])


def test_grad_trees_from_several_threads_while_others_train() -> None:
    """Threads converting grad trees never turn grad off for a thread running backward."""
    errors: list[BaseException] = []
    w = torch.ones(4, requires_grad=True)  # the training thread's own

    def convert() -> None:
        try:
            v = torch.ones(4, requires_grad=True)
            for _ in range(200):
                out = to_numpy([{"a": v * 2, "s": "x"} for _ in range(40)])
                assert not out[0]["a"].flags.writeable
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    def train() -> None:
        try:
            assert torch.is_grad_enabled()
            (w * 3).sum().backward()
            assert w.grad is not None
            w.grad = None
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    run_beside(train, [convert] * 3)
    assert not errors, errors
