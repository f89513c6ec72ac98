"""Shared example leaves and containers for the conversion tests.

``LEAVES`` maps a readable id to a factory of one tensor (or other leaf) and the array that a
correct conversion must give, computed independently of tonumpy. ``CONTAINERS`` maps an id to a
function that puts two leaves into a container of one kind, and a function that pulls the two
leaves back out, so every container can be checked with every leaf.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections import OrderedDict, UserDict, defaultdict, deque, namedtuple
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch

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


def same_container(out: Any, ref: Any) -> None:
    """Assert ``out`` is a container of ``ref``'s exact type, keys, order and extra state."""
    assert type(out) is type(ref)
    if isinstance(ref, dict | UserDict):
        assert list(out.keys()) == list(ref.keys())
    if isinstance(ref, defaultdict):
        assert out.default_factory is ref.default_factory
    if isinstance(ref, deque):
        assert out.maxlen == ref.maxlen
    if isinstance(ref, TaggedDict):
        assert out.note == ref.note  # type: ignore[attr-defined]
    if isinstance(ref, ToyBatchEncoding):
        assert out._n_sequences == ref._n_sequences
    if isinstance(ref, WithInitFalse):
        assert out.label == ref.label
    if isinstance(ref, ToyOutput):
        assert out.loss is None
        assert "loss" not in out
        assert list(out.keys()) == ["logits", "hidden_states"]
        assert out.logits is out["logits"]


def assert_same_array(got: Any, want: Any) -> None:
    """Values, dtype and shape equal (lists compared element by element)."""
    if isinstance(want, list):
        assert isinstance(got, list)
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert_same_array(g, w)
        return
    assert isinstance(got, np.ndarray), type(got)
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    np.testing.assert_array_equal(got, want)
