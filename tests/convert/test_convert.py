"""to_numpy, to_torch and apply: every leaf kind in every container kind, copies, errors."""

from __future__ import annotations

import copy as copy_module
import dataclasses
import gc
import pickle
import subprocess
import sys
import textwrap
import warnings
from collections import OrderedDict, deque
from typing import Any, NamedTuple

import numpy as np
import optree
import pytest
import torch

import tonumpy
from _helpers.trees import (
    CONTAINERS,
    LEAVES,
    Frozen,
    Plain,
    Point,
    ToyOutput,
    assert_same_tree,
)
from tonumpy import ConversionError, TonumpyError, UnsupportedLeafError, apply, to_numpy, to_torch

# ------------------------------------------------------------------ every leaf x every container


@pytest.mark.parametrize("container", CONTAINERS)
@pytest.mark.parametrize("leaf", LEAVES)
def test_leaf_in_container(leaf: str, container: str) -> None:
    """Each leaf kind converts to its reference array inside each container kind."""
    make_leaf, expected = LEAVES[leaf]
    build, _ = CONTAINERS[container]
    keep = "keep-me"
    out = to_numpy(build(make_leaf(), keep))
    assert_same_tree(out, build(expected(), keep), identical_objects=True)
    if container == "model_output":
        assert out.logits is out["logits"]  # field and item: one object, as built


@pytest.mark.parametrize("container", CONTAINERS)
def test_input_is_not_modified(container: str) -> None:
    """The input tree keeps its tensors, its types and its values."""
    build, unpack = CONTAINERS[container]
    a, b = torch.ones(3, requires_grad=True), torch.arange(4)
    tree = build(a, b)
    snapshot = copy_module.deepcopy(tree) if container != "bare" else None
    to_numpy(tree, copy=True)
    got_a, got_b = unpack(tree)
    assert got_a is a
    if container != "bare":
        assert got_b is b
        assert type(tree) is type(snapshot)
    assert a.requires_grad
    assert torch.equal(a.detach(), torch.ones(3))


def test_dict_order_kept_with_unsortable_keys() -> None:
    """Insertion order survives, also for keys that cannot be sorted against each other."""
    tree = {"z": torch.ones(1), 1: torch.zeros(1), ("t",): 3, "a": None}
    out = to_numpy(tree)
    assert list(out) == ["z", 1, ("t",), "a"]
    assert out["a"] is None
    assert out[("t",)] == 3


def test_torch_return_types() -> None:
    """torch.max(x, 0) returns a structseq; the result is the same structseq type."""
    res = torch.max(torch.tensor([[1.0, 5.0], [3.0, 2.0]]), 0)
    out = to_numpy(res)
    assert type(out) is type(res)
    np.testing.assert_array_equal(out.values, [3.0, 5.0])
    np.testing.assert_array_equal(out.indices, [1, 0])


def test_deque_keeps_maxlen_and_defaultdict_factory() -> None:
    """deque(maxlen) and defaultdict(default_factory) are rebuilt with their extra state."""
    out = to_numpy({"d": deque([torch.ones(1)], maxlen=3)})
    assert out["d"].maxlen == 3
    assert isinstance(out["d"][0], np.ndarray)


def test_non_tensor_leaves_are_the_same_objects() -> None:
    """Strings, numbers, None, sets, torch.Size, dtypes and arbitrary objects pass through."""

    class Cache:
        pass

    leaves = ["s", 3, 2.5, None, {1, 2}, torch.Size([2, 3]), torch.float32, Cache(), b"x", 1j]
    out = to_numpy(leaves)
    assert all(o is i for o, i in zip(out, leaves, strict=True))


def test_ndarray_passes_through_and_copy_true_copies_it() -> None:
    """NumPy arrays are returned as is, and copied under copy=True."""
    arr = np.arange(3)
    assert to_numpy({"a": arr})["a"] is arr
    copied = to_numpy({"a": arr}, copy=True)["a"]
    assert copied is not arr
    assert not np.shares_memory(copied, arr)


def test_registered_optree_node_is_honoured() -> None:
    """A node type registered with optree's global namespace is walked and rebuilt."""

    class Box:
        def __init__(self, content: Any) -> None:
            self.content = content

    optree.register_pytree_node(
        Box,
        lambda b: ((b.content,), None, None),
        lambda _, children: Box(*children),
        namespace=optree.registry.__GLOBAL_NAMESPACE,  # type: ignore[attr-defined]
    )
    try:
        out = to_numpy([Box(torch.ones(2))])
        assert isinstance(out[0], Box)
        assert isinstance(out[0].content, np.ndarray)
    finally:
        optree.unregister_pytree_node(
            Box,
            namespace=optree.registry.__GLOBAL_NAMESPACE,  # type: ignore[attr-defined]
        )


def test_is_leaf_stops_the_walk() -> None:
    """A node that is_leaf selects is returned untouched."""
    inner = [torch.ones(1)]
    out = to_numpy({"keep": inner, "go": [torch.ones(1)]}, is_leaf=lambda x: x is inner)
    assert out["keep"] is inner
    assert isinstance(out["go"][0], np.ndarray)


def test_dataclass_post_init_is_not_rerun() -> None:
    """Rebuilding a dataclass does not run __post_init__ (which could undo the conversion)."""
    calls = []

    @dataclasses.dataclass
    class Validating:
        x: Any

        def __post_init__(self) -> None:
            calls.append(1)
            if not isinstance(self.x, torch.Tensor):
                raise TypeError("x must be a tensor")

    out = to_numpy(Validating(torch.ones(2)))
    assert isinstance(out.x, np.ndarray)
    assert calls == [1]


def test_model_output_keeps_none_fields_out_of_the_mapping() -> None:
    """A ModelOutput-like object keeps its type, its keys and its None attributes."""
    out = to_numpy(ToyOutput(logits=torch.ones(2), loss=None))
    assert type(out) is ToyOutput
    assert list(out.keys()) == ["logits"]
    assert out.loss is None
    assert out.hidden_states is None
    assert out.logits is out["logits"]
    assert isinstance(out[0] if False else out["logits"], np.ndarray)


def test_real_transformers_model_output() -> None:
    """A real ModelOutput from a tiny, randomly initialised transformers model converts."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=16,
    )
    model = transformers.BertModel(config).eval()
    outputs = model(torch.tensor([[1, 2, 3]]), output_hidden_states=True)
    out = to_numpy(outputs)
    assert type(out) is type(outputs)
    assert list(out.keys()) == list(outputs.keys())
    assert isinstance(out.last_hidden_state, np.ndarray)
    assert isinstance(out["hidden_states"][1], np.ndarray)
    assert out.attentions is None


# ------------------------------------------------------------------------------------ identity


def test_shared_tensor_becomes_one_shared_array() -> None:
    """A tensor at several places becomes one array object at those places."""
    t = torch.arange(3)
    out = to_numpy({"a": t, "b": [t, t.clone()], "c": Point(t, 1)})
    assert out["a"] is out["b"][0] is out["c"].x
    assert out["b"][1] is not out["a"]


@pytest.mark.parametrize("copy", [None, True])
def test_shared_tensor_identity_in_every_copy_mode(copy: bool | None) -> None:
    """Identity is kept whatever copy mode, including for tensors that need conversion."""
    t = torch.ones(2, dtype=torch.bfloat16)
    out = to_numpy([t, t], copy=copy)
    assert out[0] is out[1]


# -------------------------------------------------------------------------------------- copies


def test_copy_none_shares_memory_with_cpu_tensors() -> None:
    """copy=None gives views for native CPU tensors, including non-contiguous ones."""
    base = torch.arange(12.0).reshape(3, 4)
    out = to_numpy({"x": base, "t": base.t(), "g": base.clone().requires_grad_()})
    assert np.shares_memory(out["x"], base.numpy())
    assert np.shares_memory(out["t"], base.numpy())
    assert out["t"].strides == (4, 16)
    base[0, 0] = 100.0
    assert out["x"][0, 0] == 100.0  # a view: the documented caveat


def test_copy_none_is_constant_time_view_of_large_tensor() -> None:
    """A large tensor is not copied under copy=None (same data pointer)."""
    big = torch.empty(64, 1024, 1024, dtype=torch.uint8)
    arr = to_numpy(big)
    assert arr.ctypes.data == big.data_ptr()


@pytest.mark.parametrize("leaf", LEAVES)
def test_copy_true_shares_nothing(leaf: str) -> None:
    """copy=True: no result array shares memory with any input tensor or array."""
    make_leaf, expected = LEAVES[leaf]
    value = make_leaf()
    got = to_numpy([value], copy=True)[0]
    assert_same_tree(got, expected())
    arrays = got if isinstance(got, list) else [got]
    for arr in arrays:
        lo, hi = arr.ctypes.data, arr.ctypes.data + arr.nbytes
        if isinstance(value, np.ndarray):
            assert not np.shares_memory(arr, value)
        elif isinstance(value, torch.Tensor) and value.layout == torch.strided:
            storage = value.untyped_storage()
            s_lo = storage.data_ptr()
            s_hi = s_lo + storage.nbytes()
            assert hi <= s_lo or lo >= s_hi, "result overlaps the input tensor's storage"


def test_copy_true_gives_compact_arrays() -> None:
    """copy=True turns a strided view into a compact array."""
    base = torch.arange(12.0).reshape(3, 4)
    out = to_numpy(base[:, ::2], copy=True)
    assert out.flags.c_contiguous
    assert out.nbytes == 6 * 4


@pytest.mark.parametrize(
    ("leaf", "ok"),
    [
        ("float32", True),
        ("non_contiguous", True),
        ("requires_grad", True),
        ("parameter", True),
        ("zero_dim", True),
        ("empty", True),
        ("ndarray", True),
        ("nested", True),
        ("bfloat16", False),
        ("complex32", False),
        ("conj_view", False),
        ("neg_view", False),
        ("sparse_coo", False),
        ("sparse_csr", False),
        ("quantized", False),
    ],
)
def test_copy_false_raises_for_leaves_that_need_a_copy(leaf: str, ok: bool) -> None:
    """copy=False converts what it can share and names the first leaf that needs a copy."""
    tree = {"fine": torch.ones(2), "leaf": [LEAVES[leaf][0]()]}
    if ok:
        out = to_numpy(tree, copy=False)
        assert isinstance(out["fine"], np.ndarray)
        return
    with pytest.raises(ConversionError, match=r"tree\['leaf'\]\[0\]") as info:
        to_numpy(tree, copy=False)
    assert isinstance(info.value, ValueError)
    assert info.value.path == ("leaf", 0)
    assert "copy=False" in str(info.value)


def test_copy_false_with_ml_dtypes_is_zero_copy() -> None:
    """bfloat16 with ml_dtypes=True needs no copy, so copy=False accepts it."""
    pytest.importorskip("ml_dtypes")
    t = torch.ones(4, dtype=torch.bfloat16)
    arr = to_numpy(t, copy=False, ml_dtypes=True)
    assert arr.ctypes.data == t.data_ptr()


# -------------------------------------------------------------------------------------- dtypes

LOW_PRECISION = [
    "bfloat16",
    "float8_e4m3fn",
    "float8_e4m3fnuz",
    "float8_e5m2",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",
]


def _every_bit_pattern(name: str) -> torch.Tensor:
    """A tensor of dtype ``torch.<name>`` holding each of its bit patterns once."""
    dtype = getattr(torch, name, None)
    if dtype is None:
        pytest.skip(f"torch {torch.__version__} has no {name}")
    if dtype.itemsize == 1:
        return torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype)
    return torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)


@pytest.mark.parametrize("name", LOW_PRECISION)
def test_ml_dtypes_are_bit_exact_and_zero_copy(name: str) -> None:
    """ml_dtypes=True keeps every bit (NaN payloads too) and shares memory on the CPU."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bits = _every_bit_pattern(name)
    dtype = bits.dtype
    arr = to_numpy(bits, ml_dtypes=True)
    assert arr.dtype == np.dtype(getattr(ml_dtypes, name))
    assert arr.ctypes.data == bits.data_ptr()
    int_view = bits.view(torch.uint8 if dtype.itemsize == 1 else torch.int16).numpy()
    np.testing.assert_array_equal(arr.view(int_view.dtype), int_view)


@pytest.mark.parametrize("name", LOW_PRECISION)
def test_upcast_is_exact_for_every_finite_value(name: str) -> None:
    """Widening to float32 reproduces torch's own float() for every bit pattern."""
    bits = _every_bit_pattern(name)
    arr = to_numpy(bits)
    assert arr.dtype == np.float32
    want = bits.float().numpy()
    np.testing.assert_array_equal(arr, want)  # NaNs compare equal here


def test_float4_unpacks_low_nibble_first() -> None:
    """float4_e2m1fn_x2 holds two values per byte; the first sits in the low nibble."""
    if not hasattr(torch, "float4_e2m1fn_x2"):
        pytest.skip("no float4 in this torch")
    packed = torch.tensor([[0x21, 0xF8]], dtype=torch.uint8).view(torch.float4_e2m1fn_x2)
    out = to_numpy(packed)
    np.testing.assert_array_equal(out, np.array([[0.5, 1.0, -0.0, -6.0]], dtype=np.float32))
    assert np.signbit(out[0, 2])
    ml_dtypes = pytest.importorskip("ml_dtypes")
    exact = to_numpy(packed, ml_dtypes=True)
    assert exact.dtype == np.dtype(ml_dtypes.float4_e2m1fn)
    np.testing.assert_array_equal(exact.astype(np.float32), out)


def test_every_torch_dtype_converts_or_raises_conversion_error() -> None:
    """No raw torch TypeError escapes, whatever dtype the installed torch defines."""
    dtypes = {v for v in vars(torch).values() if isinstance(v, torch.dtype)}
    quantized = {torch.qint8, torch.quint8, torch.qint32, torch.quint4x2, torch.quint2x4}
    converted, refused = [], []
    for dtype in sorted(dtypes, key=str):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if dtype in quantized:
                    t = torch.quantize_per_tensor(torch.zeros(3), 1.0, 0, dtype)
                elif dtype.is_complex or dtype.is_floating_point or dtype == torch.bool:
                    t = torch.zeros(3, dtype=dtype)
                else:
                    t = torch.zeros(3, dtype=torch.uint8).view(dtype)
        except (RuntimeError, TypeError):
            continue  # torch itself cannot make a tensor of this dtype (bits types)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                to_numpy({"x": t})
            converted.append(dtype)
        except UnsupportedLeafError as exc:
            assert "tree['x']" in str(exc)
            refused.append(dtype)
    assert torch.bfloat16 in converted
    assert quantized <= set(converted)
    assert torch.float32 in converted
    assert len(converted) >= 20
    assert all(str(d).startswith(("torch.int", "torch.uint", "torch.bits")) for d in refused), (
        refused
    )


def test_missing_ml_dtypes_says_how_to_install() -> None:
    """Without ml_dtypes, ml_dtypes=True fails with the install command in the message."""
    script = textwrap.dedent(
        """
        import sys
        sys.modules["ml_dtypes"] = None  # not installed: import raises ImportError
        import numpy as np, torch, tonumpy
        from tonumpy import UnsupportedLeafError
        try:
            tonumpy.to_numpy({"w": torch.ones(2, dtype=torch.bfloat16)}, ml_dtypes=True)
        except UnsupportedLeafError as exc:
            assert "pip install ml_dtypes" in str(exc), exc
            assert exc.path == ("w",), exc.path
        else:
            raise AssertionError("no error")
        # the default path needs no ml_dtypes at all
        assert tonumpy.to_numpy(torch.ones(2, dtype=torch.bfloat16)).dtype == np.float32
        print("ok")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


# ------------------------------------------------------------------------------------- scalars


def test_scalars_true_gives_python_scalars_for_0d_tensors() -> None:
    """scalars=True: 0-d tensors become bool/int/float/complex; others stay arrays."""
    tree = {
        "loss": torch.tensor(0.5, requires_grad=True) * 1,
        "n": torch.tensor(3),
        "ok": torch.tensor(True),
        "z": torch.tensor(1 + 2j),
        "bf": torch.tensor(1.5, dtype=torch.bfloat16),
        "vec": torch.ones(2),
        "np0": np.float32(2.0),
    }
    out = to_numpy(tree, scalars=True)
    assert out["loss"] == 0.5
    assert type(out["loss"]) is float
    assert type(out["n"]) is int
    assert out["ok"] is True
    assert out["z"] == 1 + 2j
    assert type(out["bf"]) is float
    assert isinstance(out["vec"], np.ndarray)
    assert out["np0"] is tree["np0"]


# -------------------------------------------------------------------------------------- errors


def test_meta_tensor_error_names_the_path() -> None:
    """Meta tensors have no data: the error names the path and the reason."""
    tree = {"outputs": {"hidden_states": [torch.ones(1), torch.empty(2, device="meta")]}}
    with pytest.raises(UnsupportedLeafError) as info:
        to_numpy(tree)
    msg = str(info.value)
    assert "tree['outputs']['hidden_states'][1]" in msg
    assert "meta" in msg
    assert info.value.path == ("outputs", "hidden_states", 1)
    assert isinstance(info.value, TypeError)
    assert isinstance(info.value, TonumpyError)


def test_fake_tensor_error_names_the_path() -> None:
    """Fake tensors carry no data: a clear error naming the leaf."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fake = torch.empty(3)
    with pytest.raises(UnsupportedLeafError, match=r"tree\[0\].*fake"):
        to_numpy([fake])


@pytest.mark.parametrize("lone", [False, True], ids=["in_dict", "lone"])
@pytest.mark.parametrize("transform", ["vmap", "grad"])
def test_functorch_wrapped_tensor_error(transform: str, lone: bool) -> None:
    """Inside vmap/grad a tensor is wrapped; converting it names the path and the fix.

    A lone wrapped tensor (which to_numpy tries to convert without a walk) gets the same error.
    """
    caught: list[BaseException] = []

    def fn(x: torch.Tensor) -> torch.Tensor:
        try:
            to_numpy(x if lone else {"inside": x})
        except UnsupportedLeafError as exc:
            caught.append(exc)
        return x.sum()

    if transform == "vmap":
        torch.vmap(fn)(torch.ones(2, 3))
    else:
        torch.func.grad(fn)(torch.ones(3))
    assert caught
    if not lone:
        assert "tree['inside']" in str(caught[0])
    assert "torch.func" in str(caught[0])


def test_plain_tensor_subclass_converts() -> None:
    """An ordinary Python subclass of Tensor converts like a tensor."""

    class Tagged(torch.Tensor):
        pass

    t = torch.arange(3.0).as_subclass(Tagged)
    out = to_numpy({"t": t})["t"]
    np.testing.assert_array_equal(out, [0.0, 1.0, 2.0])


def test_wrapper_subclass_without_data_is_refused() -> None:
    """A __torch_dispatch__ wrapper subclass holding no data raises, naming the path."""

    class Wrapper(torch.Tensor):
        @staticmethod
        def __new__(cls, inner: torch.Tensor) -> Wrapper:
            return torch.Tensor._make_wrapper_subclass(cls, inner.shape, dtype=inner.dtype)  # type: ignore[attr-defined]

        @classmethod
        def __torch_dispatch__(
            cls, func: Any, types: Any, args: Any = (), kwargs: Any = None
        ) -> Any:
            raise RuntimeError("no data here")

    with pytest.raises(UnsupportedLeafError, match=r"tree\['w'\].*Wrapper"):
        to_numpy({"w": Wrapper(torch.ones(2))})


def test_cycle_raises_conversion_error_naming_path() -> None:
    """A list that contains itself is a cycle: ConversionError naming where, no hang."""
    loop: list[Any] = [torch.ones(1)]
    loop.append(loop)
    with pytest.raises(ConversionError, match=r"cycle.*tree\['a'\]\[1\]") as info:
        to_numpy({"a": loop})
    assert info.value.path == ("a", 1)


class _XY(NamedTuple):
    x: Any
    y: Any


def test_every_message_spells_a_namedtuple_field_as_an_attribute() -> None:
    """Cycle, depth and conversion errors all render a namedtuple field as ``.y``."""
    loop: list[Any] = [torch.ones(1)]
    loop.append(loop)
    with pytest.raises(ConversionError, match=r"cycle: tree\['p'\]\.y\[1\] ") as cycle:
        to_numpy({"p": _XY(torch.ones(1), loop)})
    assert cycle.value.path == ("p", 1, 1)
    deep: Any = torch.ones(1)
    for _ in range(optree.MAX_RECURSION_DEPTH + 50):
        deep = [deep]
    with pytest.raises(ConversionError, match=r"deeper than \d+ levels at tree\['p'\]\.y\[0\]"):
        to_numpy({"p": _XY(torch.ones(1), deep)})
    with pytest.raises(ConversionError, match=r"cannot convert tree\['p'\]\.y "):
        to_numpy({"p": _XY(1, torch.ones(2).to_sparse())}, copy=False)


def test_too_deep_tree_raises_conversion_error() -> None:
    """A tree deeper than the walker supports raises ConversionError, not RecursionError."""
    deep: Any = torch.ones(1)
    for _ in range(optree.MAX_RECURSION_DEPTH + 50):
        deep = [deep]
    with pytest.raises(ConversionError, match="deeper than") as info:
        to_numpy(deep)
    assert info.value.path is not None
    assert len(info.value.path) >= optree.MAX_RECURSION_DEPTH - 100


def test_errors_pickle_and_keep_path() -> None:
    """Errors survive pickling (multiprocessing, distributed) with their message."""
    err = ConversionError("cannot convert tree['a']", path=("a",))
    again = pickle.loads(pickle.dumps(err))
    assert str(again) == str(err)


# ------------------------------------------------------------------------------------ to_torch


def test_to_torch_shares_memory_by_default() -> None:
    """copy=None uses torch.from_numpy: the tensor is a view of the array."""
    arr = np.arange(6.0).reshape(2, 3)
    t = to_torch({"a": arr})["a"]
    assert t.data_ptr() == arr.ctypes.data
    t_copy = to_torch({"a": arr}, copy=True)["a"]
    assert t_copy.data_ptr() != arr.ctypes.data


def test_to_torch_copies_read_only_and_negative_strides_silently() -> None:
    """Read-only arrays and negative strides are copied without any warning."""
    ro = np.arange(4.0)
    ro.flags.writeable = False
    rev = np.arange(5)[::-1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = to_torch([ro, rev])
    assert torch.equal(out[0], torch.arange(4.0, dtype=torch.float64))
    assert torch.equal(out[1], torch.tensor([4, 3, 2, 1, 0]))
    with pytest.raises(ConversionError, match=r"tree\[1\]"):
        to_torch([np.arange(2), rev], copy=False)


def test_to_torch_byte_swapped_array() -> None:
    """Big-endian arrays are converted to native order with the same values."""
    arr = np.arange(4, dtype=">i4")
    assert torch.equal(to_torch(arr), torch.arange(4, dtype=torch.int32))


def test_to_torch_scalars_and_unconvertible_arrays() -> None:
    """NumPy scalars become 0-d tensors; object/str/datetime arrays stay as they are."""
    obj = np.array([object()], dtype=object)
    strings = np.array(["a"])
    dates = np.array(["2026-01-01"], dtype="datetime64[D]")
    out = to_torch({"s": np.float32(2.5), "o": obj, "u": strings, "d": dates, "p": 3})
    assert out["s"].shape == ()
    assert out["s"].dtype == torch.float32
    assert out["o"] is obj
    assert out["u"] is strings
    assert out["d"] is dates
    assert out["p"] == 3


def test_to_torch_device_and_dtype() -> None:
    """device= and dtype= move and cast; copy=False refuses a cast."""
    out = to_torch({"a": np.arange(3)}, dtype=torch.float32, device="cpu")
    assert out["a"].dtype == torch.float32
    with pytest.raises(ConversionError, match=r"tree\['a'\]"):
        to_torch({"a": np.arange(3)}, dtype=torch.float32, copy=False)


def test_to_torch_ml_dtypes_map_back_exactly() -> None:
    """ml_dtypes bfloat16/float8 arrays become the exact torch dtype with the same bits."""
    pytest.importorskip("ml_dtypes")
    src = {
        "bf": torch.arange(-20, 20, dtype=torch.int32).to(torch.int16).view(torch.bfloat16),
        "f8": torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e5m2),
    }
    back = to_torch(to_numpy(src, ml_dtypes=True))
    for key, tensor in src.items():
        assert back[key].dtype == tensor.dtype
        assert torch.equal(back[key].view(torch.uint8), tensor.view(torch.uint8))


@pytest.mark.parametrize("container", CONTAINERS)
def test_round_trip_keeps_containers(container: str) -> None:
    """to_torch(to_numpy(x, ml_dtypes=True)) gives back x's containers, dtypes and values."""
    build, _ = CONTAINERS[container]
    a, b = torch.arange(6).reshape(2, 3), torch.ones(2, dtype=torch.bfloat16)
    back = to_torch(to_numpy(build(a, b), ml_dtypes=True))
    assert_same_tree(back, build(a, b))
    if container == "model_output":
        assert back.logits is back["logits"]


def test_to_torch_moves_tensors_already_in_the_tree() -> None:
    """Tensors in the tree are cast with dtype= too, and cloned under copy=True."""
    t = torch.arange(3)
    out = to_torch({"t": t, "a": np.ones(2)}, dtype=torch.float64)
    assert out["t"].dtype == torch.float64
    assert to_torch({"t": t}, copy=True)["t"].data_ptr() != t.data_ptr()
    assert to_torch({"t": t})["t"] is t


# --------------------------------------------------------------------------------------- apply


def test_apply_maps_only_matching_types() -> None:
    """apply calls fn on leaves of the given types and keeps containers exact."""
    tree = {"p": Plain(torch.ones(2), "s"), "f": Frozen(np.ones(2), 3)}
    out = apply(lambda a: a * 2, tree, types=np.ndarray)
    assert isinstance(out["p"].x, torch.Tensor)
    np.testing.assert_array_equal(out["f"].x, [2.0, 2.0])
    assert type(out["f"]) is Frozen


def test_apply_error_keeps_type_and_notes_the_path() -> None:
    """An exception from fn propagates unchanged, with a note naming the leaf's path."""

    def boom(t: torch.Tensor) -> torch.Tensor:
        raise KeyError("bad")

    with pytest.raises(KeyError) as info:
        apply(boom, {"a": [1, torch.ones(1)]})
    notes = getattr(info.value, "__notes__", [])
    assert any("tree['a'][1]" in n for n in notes)


def test_conversion_error_is_not_raised_for_apply_with_is_leaf() -> None:
    """is_leaf works for apply as for to_numpy."""
    out = apply(lambda x: len(x), {"l": [1, 2]}, types=list, is_leaf=lambda x: isinstance(x, list))
    assert out == {"l": 2}


# ------------------------------------------------------------------------------- memory, public


def test_no_reference_to_graph_is_kept() -> None:
    """The result holds no reference to the input tensors or their autograd graph."""
    x = torch.ones(1000, requires_grad=True)
    y = x * 2
    import weakref

    ref = weakref.ref(y)
    out = to_numpy({"y": y}, copy=True)
    del y
    gc.collect()
    assert ref() is None
    assert out["y"][0] == 2.0


def test_public_api() -> None:
    """The documented names are exported, and the error hierarchy matches built-ins."""
    assert set(tonumpy.__all__) >= {
        "to_numpy",
        "to_torch",
        "apply",
        "TonumpyError",
        "ConversionError",
    }
    assert issubclass(ConversionError, ValueError)
    assert issubclass(UnsupportedLeafError, TypeError)
    with pytest.raises(TypeError):
        to_numpy(torch.ones(1), None)  # type: ignore[misc]  # options are keyword-only


@pytest.mark.cuda
def test_cuda_tensors_come_to_host() -> None:
    """CUDA tensors of every kind convert to the same values as their CPU twins."""
    for name, (make, expected) in LEAVES.items():
        value = make()
        if not isinstance(value, torch.Tensor) or value.is_quantized or name in {"complex32"}:
            continue
        got = to_numpy({"x": value.to("cuda")})["x"]
        assert_same_tree(got, expected())


@pytest.mark.cuda
def test_cuda_copy_false_raises() -> None:
    """copy=False refuses a device tensor, naming its path."""
    with pytest.raises(ConversionError, match=r"tree\['g'\]"):
        to_numpy({"g": torch.ones(2, device="cuda")}, copy=False)


def test_ordered_dict_subclass_order() -> None:
    """OrderedDict subclasses keep their order after conversion."""

    class MyOD(OrderedDict):  # type: ignore[type-arg]
        pass

    od = MyOD([("z", torch.ones(1)), ("a", torch.zeros(1))])
    out = to_numpy(od)
    assert type(out) is MyOD
    assert list(out) == ["z", "a"]
    out["new"] = 1  # still a working OrderedDict
    assert list(out)[-1] == "new"


def test_public_names_survive_submodule_imports() -> None:
    """No module shares a public name, and importing every submodule replaces none of them."""
    import importlib
    import pkgutil

    modules = [info.name for info in pkgutil.iter_modules(tonumpy.__path__)]
    assert not set(modules) & set(tonumpy.__all__)
    for module in modules:
        importlib.import_module(f"tonumpy.{module}")
    for name in tonumpy.__all__:
        value = getattr(tonumpy, name)
        assert not isinstance(value, type(tonumpy)), name


# ----------------------------------------------------------------------------------------
# Dataclass nodes: shared metadata for plain instances, per-instance metadata otherwise
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Pair:
    a: Any
    b: Any


@dataclasses.dataclass(frozen=True)
class _FrozenPair:
    a: Any
    b: Any

    def __post_init__(self) -> None:
        raise AssertionError("__post_init__ must not run on rebuild")


def test_dataclass_mixed_extra_state_in_one_tree() -> None:
    """Instances with and without extra attributes, in one tree, each rebuild as they were."""
    plain, extra = _Pair(torch.ones(1), 1), _Pair(torch.ones(2), 2)
    extra.note = "kept"  # type: ignore[attr-defined]
    with pytest.raises(AssertionError):
        _FrozenPair(torch.ones(1), 0)
    frozen_plain = object.__new__(_FrozenPair)
    object.__setattr__(frozen_plain, "a", torch.ones(3))
    object.__setattr__(frozen_plain, "b", 3)
    frozen_extra = copy_module.copy(frozen_plain)
    object.__setattr__(frozen_extra, "tag", torch.zeros(1))
    out = to_numpy([plain, extra, plain, frozen_plain, frozen_extra, extra])
    assert [type(o) for o in out] == [_Pair, _Pair, _Pair, _FrozenPair, _FrozenPair, _Pair]
    assert all(isinstance(o.a, np.ndarray) for o in out)
    assert [o.a.shape for o in out] == [(1,), (2,), (1,), (3,), (3,), (2,)]
    assert vars(out[0]).keys() == {"a", "b"}
    assert vars(out[1])["note"] == "kept"
    assert vars(out[3]).keys() == {"a", "b"}
    assert isinstance(out[4].tag, np.ndarray)  # extra attributes are converted too
    assert out[5].note == "kept"


def test_dataclass_treespecs_record_extra_attributes() -> None:
    """Batches with the same fields and attributes have equal treespecs; an extra one differs."""
    extra = _Pair(torch.ones(1), 1)
    extra.note = "x"  # type: ignore[attr-defined]
    _, spec_plain = tonumpy._tree.flatten([_Pair(torch.ones(1), 1)])
    _, spec_plain2 = tonumpy._tree.flatten([_Pair(torch.zeros(1), 2)])
    _, spec_extra = tonumpy._tree.flatten([extra])
    assert spec_plain == spec_plain2
    assert hash(spec_plain) == hash(spec_plain2)
    assert spec_extra != spec_plain
    assert copy_module.deepcopy(spec_plain) == spec_plain
    rebuilt = tonumpy._tree.unflatten(copy_module.deepcopy(spec_plain), [np.ones(1), 5])
    assert type(rebuilt[0]) is _Pair
    assert rebuilt[0].b == 5


def test_dataclass_accumulate_extra_attributes() -> None:
    """concat combines extra attributes like fields; a batch without them is a named mismatch."""
    first = _Pair(torch.ones(2), torch.zeros(2))
    second = _Pair(torch.ones(3), torch.zeros(3))
    first.note = second.note = "x"  # type: ignore[attr-defined]
    out = tonumpy.concat([first, second])
    assert type(out) is _Pair
    assert out.a.shape == (5,)
    assert out.note == ["x", "x"]  # type: ignore[attr-defined]
    acc = tonumpy.Accumulator()
    acc.append(first)
    with pytest.raises(ConversionError, match=r"note"):
        acc.append(_Pair(torch.ones(3), torch.zeros(3)))
    assert acc.result().b.shape == (2,)


def test_dataclass_missing_field_in_dict_with_extra_attribute() -> None:
    """A field read from the class default plus an extra attribute is not taken as plain."""

    @dataclasses.dataclass
    class WithDefault:
        a: Any
        b: Any = 7

    obj = WithDefault(torch.ones(1))
    del obj.b  # now read from the class default; the dict holds one field ...
    obj.note = "kept"  # type: ignore[attr-defined]  # ... and one extra attribute: 2 keys
    out = to_numpy(obj)
    assert isinstance(out.a, np.ndarray)
    assert out.b == 7
    assert out.note == "kept"


def test_dataclass_fieldless_one_field_and_setattr_override() -> None:
    """Zero and one field round-trip; a custom __setattr__ is not run by the rebuild."""

    @dataclasses.dataclass
    class Empty:
        pass

    @dataclasses.dataclass
    class One:
        a: Any

    calls: list[str] = []

    @dataclasses.dataclass
    class Guarded:
        a: Any
        b: Any

        def __setattr__(self, name: str, value: Any) -> None:
            calls.append(name)
            object.__setattr__(self, name, value)

    guarded = Guarded(torch.ones(1), 2)
    calls.clear()
    out = to_numpy([Empty(), One(torch.ones(2)), guarded])
    assert type(out[0]) is Empty
    assert isinstance(out[1].a, np.ndarray)
    assert isinstance(out[2].a, np.ndarray)
    assert out[2].b == 2
    assert calls == []


def test_dataclass_descriptor_field_and_slotted_base_with_dict() -> None:
    """A descriptor-typed field is set through its descriptor; slot and dict fields mix."""

    class Doubling:
        def __set_name__(self, owner: type, name: str) -> None:
            self.private = "_" + name

        def __get__(self, obj: Any, objtype: Any = None) -> Any:
            return 0 if obj is None else getattr(obj, self.private)

        def __set__(self, obj: Any, value: Any) -> None:
            object.__setattr__(obj, self.private, value * 2)

    @dataclasses.dataclass
    class WithDescriptor:
        x: Doubling = Doubling()  # noqa: RUF009

    @dataclasses.dataclass(slots=True)
    class Base:
        a: Any

    @dataclasses.dataclass
    class Child(Base):
        b: Any

    child = Child(torch.ones(1), torch.ones(2))
    child.note = "kept"  # type: ignore[attr-defined]
    out = to_numpy([WithDescriptor(3), Child(torch.ones(1), torch.ones(2)), child])
    assert out[0].x == 6  # 3 doubled by __init__; its storage (_x) is restored as it was
    assert isinstance(out[1].a, np.ndarray)
    assert isinstance(out[1].b, np.ndarray)
    assert not hasattr(out[1], "note")
    assert out[2].note == "kept"
    assert isinstance(out[2].a, np.ndarray)
