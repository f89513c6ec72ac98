"""Shared example trees, and the one assertion that two trees are the same.

``LEAVES`` maps a readable id to a factory of one tensor (or other leaf) and the array that a
correct conversion must give, computed independently of tonumpy. ``CONTAINERS`` maps an id to a
function that puts two leaves into a container of one kind, and a function that pulls the two
leaves back out, so every container can be checked with every leaf.

[`assert_same_tree`][] is the test suite's one tree comparison: every test that compares a
result with an expected tree calls it.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections import OrderedDict, UserDict, defaultdict, deque, namedtuple
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch

from tonumpy import _tree

# --------------------------------------------------------------------------------------- leaves


def _base() -> torch.Tensor:
    return torch.arange(12, dtype=torch.float32).reshape(3, 4) - 5.5


def _complex() -> torch.Tensor:
    return torch.complex(_base(), -_base())


def _nested() -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that nested tensors are a prototype
        return torch.nested.nested_tensor([torch.ones(2, 3), torch.zeros(4, 3)])


def _jagged() -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.nested.nested_tensor(
            [torch.ones(2, 3), torch.full((4, 3), 2.0)], layout=torch.jagged
        )


def _float8(dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor([0.5, -1.5, 2.0, 0.0]).to(dtype)


def _ref_float(t: torch.Tensor) -> np.ndarray:
    """Reference widening: through float64 in torch, then down to float32 (exact for 8/16 bits)."""
    return t.double().numpy().astype(np.float32)


Leaf = tuple[Callable[[], Any], Callable[[], Any]]

LEAVES: dict[str, Leaf] = {
    "float32": (_base, lambda: np.arange(12, dtype=np.float32).reshape(3, 4) - 5.5),
    "float64": (lambda: _base().double(), lambda: np.arange(12.0).reshape(3, 4) - 5.5),
    "float16": (
        lambda: _base().half(),
        lambda: (np.arange(12.0).reshape(3, 4) - 5.5).astype(np.float16),
    ),
    "int64": (lambda: torch.arange(-3, 3), lambda: np.arange(-3, 3)),
    "int8": (
        lambda: torch.arange(-3, 3, dtype=torch.int8),
        lambda: np.arange(-3, 3, dtype=np.int8),
    ),
    "uint8": (lambda: torch.arange(6, dtype=torch.uint8), lambda: np.arange(6, dtype=np.uint8)),
    "uint16": (
        lambda: torch.tensor([0, 1, 65535], dtype=torch.int32).to(torch.uint16),
        lambda: np.array([0, 1, 65535], dtype=np.uint16),
    ),
    "bool": (lambda: torch.tensor([True, False]), lambda: np.array([True, False])),
    "complex64": (_complex, lambda: _complex().numpy().copy()),
    "requires_grad": (
        lambda: _base().requires_grad_(),
        lambda: np.arange(12, dtype=np.float32).reshape(3, 4) - 5.5,
    ),
    "grad_fn": (
        lambda: _base().requires_grad_() * 2,
        lambda: (np.arange(12, dtype=np.float32).reshape(3, 4) - 5.5) * 2,
    ),
    "parameter": (
        lambda: torch.nn.Parameter(_base()),
        lambda: np.arange(12, dtype=np.float32).reshape(3, 4) - 5.5,
    ),
    "conj_view": (lambda: _complex().conj(), lambda: np.conj(_complex().numpy())),
    "neg_view": (lambda: _complex().conj().imag, lambda: _base().numpy().copy()),
    "non_contiguous": (
        lambda: _base().t(),
        lambda: (np.arange(12, dtype=np.float32).reshape(3, 4) - 5.5).T,
    ),
    "strided_slice": (lambda: _base()[::2, 1::2], lambda: _base().numpy()[::2, 1::2].copy()),
    "zero_dim": (lambda: torch.tensor(3.25), lambda: np.array(3.25, dtype=np.float32)),
    "empty": (lambda: torch.empty(0, 5), lambda: np.empty((0, 5), dtype=np.float32)),
    "sparse_coo": (lambda: _base().to_sparse(), lambda: _base().numpy().copy()),
    "sparse_csr": (lambda: _base().to_sparse_csr(), lambda: _base().numpy().copy()),
    "sparse_csc": (lambda: _base().to_sparse_csc(), lambda: _base().numpy().copy()),
    "sparse_bsr": (
        lambda: torch.arange(16.0).reshape(4, 4).to_sparse_bsr((2, 2)),
        lambda: np.arange(16.0, dtype=np.float32).reshape(4, 4),
    ),
    "sparse_bsc": (
        lambda: torch.arange(16.0).reshape(4, 4).to_sparse_bsc((2, 2)),
        lambda: np.arange(16.0, dtype=np.float32).reshape(4, 4),
    ),
    "quantized": (
        lambda: torch.quantize_per_tensor(_base(), 0.5, 0, torch.qint8),
        lambda: np.round((np.arange(12, dtype=np.float32).reshape(3, 4) - 5.5) / 0.5) * 0.5,
    ),
    "bfloat16": (
        lambda: _base().bfloat16(),
        lambda: np.arange(12, dtype=np.float32).reshape(3, 4) - 5.5,
    ),
    "complex32": (lambda: _complex().to(torch.complex32), lambda: _complex().numpy().copy()),
    **{
        name: (
            (lambda d=getattr(torch, name): _float8(d)),
            (lambda d=getattr(torch, name): _ref_float(_float8(d))),
        )
        for name in ("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz")
        if hasattr(torch, name)
    },
    "inference_mode": (
        lambda: _inference(),
        lambda: np.arange(12, dtype=np.float32).reshape(3, 4) - 5.5,
    ),
    "nested": (_nested, lambda: [np.ones((2, 3), np.float32), np.zeros((4, 3), np.float32)]),
    "jagged": (_jagged, lambda: [np.ones((2, 3), np.float32), np.full((4, 3), 2.0, np.float32)]),
    "ndarray": (lambda: np.arange(4), lambda: np.arange(4)),
}


def _inference() -> torch.Tensor:
    with torch.inference_mode():
        return _base() * 1


# ----------------------------------------------------------------------------------- containers


class Point(NamedTuple):
    x: Any
    y: Any


PointFn = namedtuple("PointFn", ["x", "y"])


@dataclasses.dataclass
class Plain:
    x: Any
    y: Any


@dataclasses.dataclass(frozen=True)
class Frozen:
    x: Any
    y: Any


@dataclasses.dataclass(slots=True)
class Slotted:
    x: Any
    y: Any


@dataclasses.dataclass
class WithInitFalse:
    x: Any
    y: Any = dataclasses.field(init=False)
    label: str = "kept"


class FakeModelOutput(OrderedDict):  # type: ignore[type-arg]
    """Like transformers.ModelOutput: a dataclass whose None fields are not keys."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if value is not None:
                self[f.name] = value

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(key, value)
        super().__setattr__(key, value)


@dataclasses.dataclass
class ToyOutput(FakeModelOutput):
    loss: Any = None
    logits: Any = None
    hidden_states: Any = None


class ToyBatchEncoding(UserDict):  # type: ignore[type-arg]
    """Like transformers.BatchEncoding: a UserDict with extra state."""

    def __init__(self, data: dict[str, Any], n_sequences: int) -> None:
        super().__init__(data)
        self._n_sequences = n_sequences


class TaggedDict(dict):  # type: ignore[type-arg]
    """A dict subclass with an attribute that must survive."""

    tag = "class-level"


def _with_init_false(a: Any, b: Any) -> WithInitFalse:
    obj = WithInitFalse(a)
    obj.y = b
    return obj


def _tagged(a: Any, b: Any) -> TaggedDict:
    d = TaggedDict(b=b, a=a)
    d.note = "instance-level"  # type: ignore[attr-defined]
    return d


Container = tuple[Callable[[Any, Any], Any], Callable[[Any], tuple[Any, Any]]]

CONTAINERS: dict[str, Container] = {
    "bare": (lambda a, b: a, lambda c: (c, None)),
    "dict": (lambda a, b: {"b": b, "a": a}, lambda c: (c["a"], c["b"])),
    "dict_mixed_keys": (lambda a, b: {1: a, "a": b}, lambda c: (c[1], c["a"])),
    "ordered_dict": (lambda a, b: OrderedDict(z=a, y=b), lambda c: (c["z"], c["y"])),
    "defaultdict": (lambda a, b: defaultdict(list, {"a": a, "b": b}), lambda c: (c["a"], c["b"])),
    "dict_subclass": (_tagged, lambda c: (c["a"], c["b"])),
    "list": (lambda a, b: [a, b], lambda c: (c[0], c[1])),
    "tuple": (lambda a, b: (a, b), lambda c: (c[0], c[1])),
    "namedtuple": (lambda a, b: Point(a, b), lambda c: (c.x, c.y)),
    "namedtuple_functional": (lambda a, b: PointFn(a, b), lambda c: (c.x, c.y)),
    "deque": (lambda a, b: deque([a, b], maxlen=7), lambda c: (c[0], c[1])),
    "dataclass": (lambda a, b: Plain(a, b), lambda c: (c.x, c.y)),
    "frozen_dataclass": (lambda a, b: Frozen(a, b), lambda c: (c.x, c.y)),
    "slots_dataclass": (lambda a, b: Slotted(a, b), lambda c: (c.x, c.y)),
    "init_false_dataclass": (_with_init_false, lambda c: (c.x, c.y)),
    "model_output": (
        lambda a, b: ToyOutput(logits=a, hidden_states=(b,)),
        lambda c: (c["logits"], c.hidden_states[0]),
    ),
    "user_dict": (
        lambda a, b: ToyBatchEncoding({"input_ids": a, "mask": b}, 2),
        lambda c: (c["input_ids"], c["mask"]),
    ),
    "nested_mix": (
        lambda a, b: {"out": [Point(a, {"deep": (b,)})], "none": None},
        lambda c: (c["out"][0].x, c["out"][0].y["deep"][0]),
    ),
}


# ------------------------------------------------------------------------------- comparison


def assert_same_tree(
    got: Any,
    want: Any,
    /,
    *,
    identical_objects: bool = False,
    is_leaf: Callable[[Any], bool] | None = None,
) -> None:
    """Assert that ``got`` is the tree ``want``, exactly.

    * **Structure**, read by tonumpy's own walker: the same container types, keys, key order
      (a dict's insertion order too) and container settings (a ``defaultdict``'s factory, a
      ``deque``'s ``maxlen``); extra state a container keeps (attributes of a dict subclass,
      ``init=False`` fields) is made of leaves, compared as leaves.
    * **Every leaf of the same type** (``np.ndarray`` is not ``np.memmap``, ``bool`` is not
      ``int``), and then:

      - arrays and NumPy scalars: the same dtype, shape and bytes (bit for bit: NaN payloads
        and the sign of zero count; object arrays element by element, as leaves);
      - tensors: the same dtype, shape, device and bits (conjugate and negative views
        resolved first);
      - Python ``float``/``complex``: equal, NaN equal to NaN, ``-0.0`` not ``0.0``; other
        numbers equal;
      - anything else: equal (``==``), or, with ``identical_objects=True``, the very same
        object (``is``), as for leaves a conversion must pass through untouched.

    ``is_leaf`` is passed to the walker for both trees. A failure names the first place
    (``tree['a'][0]``) where the trees differ, and what differs.
    """
    got_leaves, got_spec = _tree.flatten(got, is_leaf=is_leaf)
    want_leaves, want_spec = _tree.flatten(want, is_leaf=is_leaf)
    if not _tree.same_structure(got_spec, want_spec):
        error = _tree.structure_error(
            want_spec, got_spec, "want", "got", hint="compare the two trees there"
        )
        raise AssertionError(str(error))
    for got_node, want_node in zip(_tree.outline(got_spec), _tree.outline(want_spec), strict=True):
        assert got_node.keys == want_node.keys, (
            f"{_tree.format_path(want_node.path)}: keys {got_node.keys} != {want_node.keys}"
        )
    for (_, where), g, w in zip(_tree.leaf_paths(want_spec), got_leaves, want_leaves, strict=True):
        _assert_same_leaf(g, w, where, identical_objects)


def _assert_same_leaf(got: Any, want: Any, where: str, identical: bool) -> None:
    assert type(got) is type(want), f"{where}: type {type(got)} is not {type(want)}"
    if isinstance(want, np.ndarray | np.generic):
        assert got.dtype == want.dtype, f"{where}: dtype {got.dtype} != {want.dtype}"
        assert got.shape == want.shape, f"{where}: shape {got.shape} != {want.shape}"
        if want.dtype.hasobject:
            for index in np.ndindex(want.shape):
                _assert_same_leaf(got[index], want[index], f"{where}[{index}]", identical)
            return
        assert got.tobytes() == want.tobytes(), f"{where}: values differ\n{got!r}\n{want!r}"
    elif isinstance(want, torch.Tensor):
        assert (got.dtype, got.shape, got.device) == (want.dtype, want.shape, want.device), (
            f"{where}: {got.dtype} {tuple(got.shape)} on {got.device} != "
            f"{want.dtype} {tuple(want.shape)} on {want.device}"
        )
        assert torch.equal(_tensor_bits(got), _tensor_bits(want)), f"{where}: values differ"
    elif isinstance(want, float | complex):
        assert _same_number(got, want), f"{where}: {got!r} != {want!r}"
    elif isinstance(want, int) or not identical:
        assert got == want, f"{where}: {got!r} != {want!r}"
    else:
        assert got is want, f"{where}: {got!r} is not the very object {want!r}"


def _same_number(got: float | complex, want: float | complex) -> bool:
    parts = zip((got.real, got.imag), (want.real, want.imag), strict=True)
    return all(
        (math.isnan(g) and math.isnan(w)) or (g == w and math.copysign(1, g) == math.copysign(1, w))
        for g, w in parts
    )


def _tensor_bits(t: torch.Tensor) -> torch.Tensor:
    """The bytes of ``t``'s values, in C order (views resolved, dense, on the CPU)."""
    t = t.detach()
    if t.layout != torch.strided:
        t = t.to_dense()
    flat = torch.empty(t.numel(), dtype=t.dtype)
    flat.copy_(t.resolve_conj().resolve_neg().reshape(-1).cpu())
    return flat.view(torch.uint8)
