"""The file format as one data model: what save stores is what to_numpy walks; one bit layout;
one directory format; old files still load."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import types
import zipfile
from collections import ChainMap, UserList, namedtuple
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import optree
import pytest
import torch

import tonumpy
from _helpers.trees import CONTAINERS
from tonumpy import io as tio
from tonumpy._format import _structure

DATA = Path(__file__).resolve().parents[1] / "data" / "format_v1"


def structure_of(path: Path) -> Any:
    """The JSON structure a ``.npz`` written by tonumpy holds."""
    with np.load(path) as npz:
        return json.loads(npz["__tonumpy__"].tobytes())


def arrays_in(tree: Any) -> list[np.ndarray]:
    """The arrays of a loaded tree (plain dicts, lists and tuples), depth first."""
    if isinstance(tree, dict):
        return [a for v in tree.values() for a in arrays_in(v)]
    if isinstance(tree, list | tuple):
        return [a for v in tree for a in arrays_in(v)]
    return [tree] if isinstance(tree, np.ndarray) else []


# ------------------------------------------------------------- save walks as to_numpy does


class Box:
    """A user's class, registered with optree in tonumpy's namespace, with named entries."""

    def __init__(self, a: Any, b: Any) -> None:
        self.a, self.b = a, b


class Pairing:
    """A user's class registered without path entries: its children are 0 and 1."""

    def __init__(self, a: Any, b: Any) -> None:
        self.a, self.b = a, b


optree.register_pytree_node(
    Box, lambda x: ((x.a, x.b), None, ("a", "b")), lambda _, c: Box(*c), namespace="tonumpy"
)
optree.register_pytree_node(
    Pairing, lambda x: ((x.a, x.b), None), lambda _, c: Pairing(*c), namespace="tonumpy"
)


def test_a_type_registered_with_optree_saves_as_it_converts(tmp_path: Path) -> None:
    """to_numpy walks a type registered in the "tonumpy" namespace; save stores it the same way."""
    tree = {"box": Box(torch.arange(3.0), 5), "pair": Pairing(torch.ones(2), "s")}
    converted = tonumpy.to_numpy(tree)
    assert isinstance(converted["box"], Box)
    path = tmp_path / "t.npz"
    tonumpy.save(path, tree)
    out = tonumpy.load(path)
    assert list(out["box"]) == ["a", "b"]  # named entries: a mapping of them
    np.testing.assert_array_equal(out["box"]["a"], converted["box"].a)
    assert out["box"]["b"] == 5
    assert isinstance(out["pair"], tuple)  # unnamed entries 0, 1: a tuple
    np.testing.assert_array_equal(out["pair"][0], converted["pair"].a)
    assert out["pair"][1] == "s"
    classes = tio.read(path).classes
    assert classes[("box",)].endswith(".Box")
    assert classes[("pair",)].endswith(".Pairing")


@pytest.mark.parametrize("kind", sorted(CONTAINERS))
def test_every_container_to_numpy_knows_is_saved(tmp_path: Path, kind: str) -> None:
    """Each container kind of the conversion tests: save stores both leaves, exactly."""
    make, _ = CONTAINERS[kind]
    a, b = torch.arange(3.0), torch.ones(2, dtype=torch.int32)
    path = tmp_path / "t.npz"
    tonumpy.save(path, make(a, b))
    got = sorted(arrays_in(tonumpy.load(path)), key=lambda x: x.size)
    want = [a.numpy()] if kind == "bare" else [b.numpy(), a.numpy()]
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype
        np.testing.assert_array_equal(g, w)


class Tagged(list):  # type: ignore[type-arg]
    """A list subclass whose instances carry an attribute."""


class Row(tuple):  # type: ignore[type-arg]
    """A tuple subclass."""

    __slots__ = ()


@dataclasses.dataclass
class Record:
    weights: Any


def test_containers_save_refused_before_are_stored(tmp_path: Path) -> None:
    """UserList, SimpleNamespace, ChainMap, tuple and list subclasses, dataclass attributes."""
    tagged = Tagged([torch.ones(1)])
    tagged.note = "kept"  # type: ignore[attr-defined]
    record = Record(torch.ones(1))
    record.extra = torch.zeros(2)  # type: ignore[attr-defined]
    tree = {
        "user_list": UserList([torch.ones(1), 2]),
        "namespace": types.SimpleNamespace(a=torch.ones(1), b="s"),
        "chain": ChainMap({"a": torch.ones(1)}, {"b": 2}),
        "tagged": tagged,
        "row": Row((torch.ones(1), 3)),
        "record": record,
    }
    path = tmp_path / "t.npz"
    tonumpy.save(path, tree)
    out = tonumpy.load(path)
    assert out["user_list"][1] == 2
    assert isinstance(out["user_list"], list)
    assert out["namespace"]["b"] == "s"
    assert out["chain"]["maps"][1] == {"b": 2}
    assert out["tagged"]["note"] == "kept"  # items and attributes: a mapping of both
    np.testing.assert_array_equal(out["tagged"][0], np.ones(1, np.float32))
    assert isinstance(out["row"], tuple)
    assert out["row"][1] == 3
    np.testing.assert_array_equal(out["record"]["extra"], np.zeros(2, np.float32))
    assert tio.read(path).classes[("row",)].endswith(".Row")


def test_a_transformers_cache_is_stored_as_to_numpy_returns_it(tmp_path: Path) -> None:
    """A model output holding a DynamicCache: the cache's layers as tuples of arrays."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=64)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        output = model(torch.arange(6).reshape(1, 6), use_cache=True)
    key = "cache" if "cache" in output else "past_key_values"
    converted = tonumpy.to_numpy(output)
    path = tmp_path / "out.npz"
    tonumpy.save(path, output)
    out = tonumpy.load(path)
    assert len(out[key]) == len(converted[key]) == 2
    for layer_out, layer_ref in zip(out[key], converted[key], strict=True):
        assert isinstance(layer_out, tuple)
        for got, want in zip(layer_out, layer_ref, strict=True):
            np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(out["logits"], converted["logits"])


def test_a_batch_encoding_is_stored_as_its_items(tmp_path: Path) -> None:
    """A fast tokenizer's output: its arrays are stored; its Encoding objects (tokenizer
    state, which no file holds) are not, as before."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[UNK]": 0, "a": 1, "b": 2, "[PAD]": 3}
    special = {"unk_token": "[UNK]", "pad_token": "[PAD]"}  # tokens, not secrets
    backend = tokenizers.Tokenizer(
        tokenizers.models.WordLevel(vocab, unk_token=special["unk_token"])
    )
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=special["pad_token"]
    )
    encoding = tokenizer(["a b", "b"], padding=True, return_tensors="pt")
    assert encoding.encodings is not None
    path = tmp_path / "batch.npz"
    tonumpy.save(path, {"inputs": encoding})
    out = tonumpy.load(path)["inputs"]
    assert list(out) == ["input_ids", "attention_mask"]
    np.testing.assert_array_equal(out["input_ids"], [[1, 2], [2, 3]])
    np.testing.assert_array_equal(out["attention_mask"], [[1, 1], [1, 0]])
    assert tio.read(path).classes[("inputs",)].endswith("BatchEncoding")


def test_save_takes_is_leaf_as_to_numpy_does(tmp_path: Path) -> None:
    """is_leaf= keeps a node whole; one that holds a tensor cannot be stored without pickle."""

    class Holder:
        def __init__(self) -> None:
            self.t = torch.ones(1)

    path = tmp_path / "t.npz"
    tree = {"kept": Holder(), "w": torch.ones(2)}
    with pytest.raises(tonumpy.UnsupportedLeafError, match=r"tree\['kept'\].*is_leaf="):
        tonumpy.save(path, tree)  # the walker refuses it, as to_numpy does
    keep = lambda x: isinstance(x, Holder)  # noqa: E731
    assert tonumpy.to_numpy(tree, is_leaf=keep)["kept"] is tree["kept"]
    with pytest.raises(tonumpy.ConversionError, match=r"cannot store tree\['kept'\] \(Holder\)"):
        tonumpy.save(path, tree, is_leaf=keep)
    shape = {"shape": (2, 3), "w": torch.ones(2)}
    tonumpy.save(path, shape, is_leaf=lambda x: type(x) is tuple)  # a tuple kept as a value
    assert tonumpy.load(path)["shape"] == (2, 3)
    with pytest.raises(TypeError, match="is_leaf must return True or False"):
        tonumpy.save(path, shape, is_leaf=lambda x: "yes")
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_errors_name_the_place_as_to_numpy_does(tmp_path: Path) -> None:
    """One path renderer: a namedtuple field reads .y, as in every other message."""
    point = namedtuple("point", "x y")
    with pytest.raises(tonumpy.ConversionError, match=r"tree\['out'\]\.y \(object\)") as info:
        tonumpy.save(tmp_path / "t.npz", {"out": point(torch.ones(1), object())})
    assert info.value.path == ("out", "y")


def test_cycles_and_depth_are_named_by_the_walker(tmp_path: Path) -> None:
    """save refuses a cycle and a tree too deep, naming the path where the walker met them."""
    loop: list[Any] = [torch.ones(1)]
    loop.append({"again": loop})
    with pytest.raises(tonumpy.ConversionError, match="cycle") as info:
        tonumpy.save(tmp_path / "t.npz", loop)
    assert info.value.path == (1, "again")
    deep: Any = torch.ones(1)
    for _ in range(3000):
        deep = [deep]
    with pytest.raises(tonumpy.ConversionError, match="deeper than") as info:
        tonumpy.save(tmp_path / "t.npz", deep)
    assert info.value.path is not None
    assert list(tmp_path.iterdir()) == []


def test_the_deepest_tree_a_file_holds_round_trips(tmp_path: Path) -> None:
    """MAX_DEPTH levels save and load; one more is refused before anything is written."""
    deep: Any = {"w": torch.ones(1)}
    for _ in range(_structure.MAX_DEPTH - 1):
        deep = {"k": deep}
    tonumpy.save(tmp_path / "t.npz", deep)
    out = tonumpy.load(tmp_path / "t.npz")
    for _ in range(_structure.MAX_DEPTH - 1):
        out = out["k"]
    np.testing.assert_array_equal(out["w"], np.ones(1, np.float32))
    with pytest.raises(
        tonumpy.ConversionError, match=r"deeper than 250 levels.*tree\[0\]\['k'\]"
    ) as info:
        tonumpy.save(tmp_path / "u.npz", [deep])
    assert len(info.value.path or ()) == _structure.MAX_DEPTH + 1
    assert not (tmp_path / "u.npz").exists()


def test_a_shared_tensor_is_stored_once_and_keeps_its_dtype_everywhere(tmp_path: Path) -> None:
    """Both places name one array, each with the bits' dtype (bfloat16 comes back twice)."""
    t = torch.tensor([1.5, -2.0], dtype=torch.bfloat16)
    path = tmp_path / "t.npz"
    tonumpy.save(path, {"a": t, "b": [t]}, ml_dtypes=True)
    with zipfile.ZipFile(path) as zf:
        assert sorted(zf.namelist()) == ["__tonumpy__.npy", "a.npy"]
    out = tonumpy.load(path, ml_dtypes=True)
    assert out["a"].dtype == out["b"][0].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(out["b"][0].astype(np.float32), [1.5, -2.0])


def test_save_checks_its_flags(tmp_path: Path) -> None:
    """save, convert and load refuse non-boolean flags, naming the call, and write nothing."""
    with pytest.raises(tonumpy.OptionError, match=r"save\(ml_dtypes=1"):
        tonumpy.save(tmp_path / "t.npz", {"a": torch.ones(1)}, ml_dtypes=1)  # type: ignore[arg-type]
    with pytest.raises(tonumpy.OptionError, match=r"convert\(overwrite='yes'"):
        tio.convert(tmp_path / "t.npz", tmp_path / "u.npz", overwrite="yes")  # type: ignore[arg-type]
    with pytest.raises(tonumpy.OptionError, match=r"load\(unsafe_load=None"):
        tonumpy.load(tmp_path / "t.npz", unsafe_load=None)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------ one bit layout


@pytest.mark.parametrize(("name", "bits"), [("bfloat16", "uint16"), ("float8_e4m3fn", "uint8")])
@pytest.mark.parametrize("dst", ["t.npz", "dir", "one.npy"])
def test_bits_are_stored_unsigned_with_the_dtype_in_the_structure(
    tmp_path: Path, name: str, bits: str, dst: str
) -> None:
    """save and convert --ml-dtypes: the raw bits as uint16/uint8, the name in "dtype"."""
    t = torch.tensor([0.5, -2.5, 448.0]).to(getattr(torch, name))
    src = tmp_path / "src.pt"
    torch.save(t if dst.endswith(".npy") else {"t": t}, src)
    tio.convert(src, tmp_path / dst, ml_dtypes=True)
    if dst == "t.npz":
        with np.load(tmp_path / dst) as npz:
            stored = npz["t"]
        assert structure_of(tmp_path / dst)["tree"]["v"][0]["dtype"] == name
        exact = tonumpy.load(tmp_path / dst, ml_dtypes=True)["t"]
    elif dst == "dir":
        stored = np.load(tmp_path / dst / "t.npy")
        node = json.loads((tmp_path / dst / "__tonumpy__.json").read_text())["tree"]["v"][0]
        assert node["dtype"] == name
        exact = tonumpy.load(tmp_path / dst, ml_dtypes=True)["t"]
    else:
        stored = exact = np.load(tmp_path / dst)  # a lone .npy has no structure: bits only
    assert stored.dtype == np.dtype(bits)
    want = t.view(torch.uint8 if t.element_size() == 1 else torch.int16).numpy()
    np.testing.assert_array_equal(stored, want.view(bits))
    if dst != "one.npy":
        assert exact.dtype == np.dtype(getattr(ml_dtypes, name))
        np.testing.assert_array_equal(exact.view(bits), stored)


def test_ml_dtypes_arrays_and_npz_copies_store_unsigned_bits(tmp_path: Path) -> None:
    """An ml_dtypes array, and a member copied from an old file with signed bits: uint16."""
    arr = np.array([1.5, -3.0], dtype=ml_dtypes.bfloat16)
    tonumpy.save(tmp_path / "a.npz", {"x": arr})
    with np.load(tmp_path / "a.npz") as npz:
        assert npz["x"].dtype == np.uint16
    tio.convert(DATA / "tree.npz", tmp_path / "b.npz", ml_dtypes=True)  # int16 bits in DATA
    with np.load(DATA / "tree.npz") as old, np.load(tmp_path / "b.npz") as new:
        assert old["bf16"].dtype == np.int16
        assert new["bf16"].dtype == np.uint16
        np.testing.assert_array_equal(new["bf16"], old["bf16"].view(np.uint16))


# ------------------------------------------------------------------------ old files load


def test_files_in_the_first_format_still_load(tmp_path: Path) -> None:
    """A .npz and a directory written before this change (bfloat16 bits as int16).

    Both were written by tonumpy at commit e97d067: ``tonumpy.save("tree.npz", TREE,
    ml_dtypes=True)`` with ``TREE`` below (``Point``, ``Pair`` defined in ``__main__``), and
    ``tonumpy.io.convert(src, "export", ml_dtypes=True)`` from a ``torch.save`` of
    ``{"w": bfloat16 [1.0, 2.0], "meta": {"step": 4}}``.
    """
    out = tonumpy.load(DATA / "tree.npz", ml_dtypes=True)
    assert list(out) == [
        "z",
        "a",
        3,
        "values",
        "point",
        "pair",
        "bf16",
        "f8",
        "again",
        "size",
        "set",
    ]
    np.testing.assert_array_equal(out["z"], np.arange(4, dtype=np.int32))
    np.testing.assert_array_equal(out["again"], out["z"])
    assert out["a"][1] == (1, 2.5, None)
    assert out[3][(1, "k")] == b"\x00\xff"
    assert out["values"][0] is True
    assert out["values"][1] is None
    assert np.isnan(out["values"][2])
    assert out["values"][3:] == [1 + 2j, 10**30]
    assert list(out["point"]) == ["x", "y"]
    assert out["pair"]["second"] is None
    assert out["bf16"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(
        out["bf16"].view(np.uint16),
        torch.tensor([0.1, -2.5, 448.0])
        .to(torch.bfloat16)
        .view(torch.int16)
        .numpy()
        .view(np.uint16),
    )
    assert out["f8"].dtype == ml_dtypes.float8_e4m3fn
    np.testing.assert_array_equal(out["f8"].astype(np.float32), [0.5, -1.0])
    assert out["size"] == (2, 3)
    assert out["set"] == [7]
    assert tio.read(DATA / "tree.npz").classes[("point",)] == "__main__.Point"
    wide = tonumpy.load(DATA / "tree.npz")["bf16"]
    assert wide.dtype == np.float32
    export = tonumpy.load(DATA / "export", ml_dtypes=True)
    assert export["w"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(export["w"].astype(np.float32), [1.0, 2.0])
    assert export["meta"] == {"step": 4}
    shutil.copytree(DATA / "export", tmp_path / "export")  # and it converts onward
    tio.convert(tmp_path / "export", tmp_path / "again.npz", ml_dtypes=True)
    assert tonumpy.load(tmp_path / "again.npz", ml_dtypes=True)["w"].dtype == ml_dtypes.bfloat16


def test_the_same_tree_gets_the_same_structure_as_before(tmp_path: Path) -> None:
    """Saving the tree of the old file again writes the old structure (class names aside)."""
    point = namedtuple("Point", "x y")

    @dataclasses.dataclass
    class Pair:
        first: Any
        second: Any = None

    shared = torch.arange(4, dtype=torch.int32)
    tree = {
        "z": shared,
        "a": [torch.ones(2, 2), (1, 2.5, None), "text"],
        3: {"nested": np.float32(1.5), (1, "k"): b"\x00\xff"},
        "values": [True, None, float("nan"), 1 + 2j, 10**30],
        "point": point(torch.zeros(1), 2),
        "pair": Pair(torch.tensor([1.5, -2.0])),
        "bf16": torch.tensor([0.1, -2.5, 448.0], dtype=torch.bfloat16),
        "f8": torch.tensor([0.5, -1.0], dtype=torch.float8_e4m3fn),
        "again": shared,
        "size": torch.Size([2, 3]),
        "set": {7},
    }
    tonumpy.save(tmp_path / "new.npz", tree, ml_dtypes=True)

    def without_classes(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: without_classes(v) for k, v in node.items() if k != "c" or "." not in v}
        if isinstance(node, list):
            return [without_classes(v) for v in node]
        return node

    old, new = structure_of(DATA / "tree.npz"), structure_of(tmp_path / "new.npz")
    assert without_classes(new) == without_classes(old)
    assert new["tree"]["v"][5]["c"].endswith("Pair")


# ------------------------------------------------------------------ one directory format


_MAGIC = b"\x93NUMPY\x01\x00"


def _write_growable_npy(path: Path, array: np.ndarray, room: int = 512) -> None:
    """A .npy whose header is padded with spaces to ``room`` bytes, as a growing file has it."""
    fields = {"descr": np.lib.format.dtype_to_descr(array.dtype), "fortran_order": False}
    text = repr({**fields, "shape": array.shape})
    body = text.ljust(room - len(_MAGIC) - 2 - 1) + "\n"
    with path.open("xb") as f:
        f.write(_MAGIC + len(body).to_bytes(2, "little") + body.encode("latin1"))
        f.write(np.ascontiguousarray(array).tobytes())


def test_a_directory_written_outside_io_reads_with_structure_and_dtypes(tmp_path: Path) -> None:
    """What Accumulator(directory=) writes: _structure's names and JSON, padded headers,
    bfloat16 bits as uint16, and a list of per-batch values; load and show read it."""
    batches = [
        {"logits": torch.randn(2, 3).to(torch.bfloat16), "ids": torch.arange(2), "split": "a"},
        {"logits": torch.randn(1, 3).to(torch.bfloat16), "ids": torch.arange(1), "split": "b"},
    ]
    first = _structure.layout(batches[0], ml_dtypes=True)  # names the files at the first batch
    assert first.names == ["logits", "ids"]
    flat, _ = optree.tree_flatten(batches[0], namespace="tonumpy")  # the walker's order
    for index, path in zip(first.flat, first.paths, strict=True):
        assert flat[index] is batches[0][path[0]]
    folder = tmp_path / "run"
    folder.mkdir()
    columns = {}
    for name, path in zip(first.names, first.paths, strict=True):
        whole = torch.cat([b[path[0]] for b in batches])
        column = (
            whole.view(torch.int16).numpy().view(np.uint16)
            if whole.dtype == torch.bfloat16
            else whole.numpy()
        )
        _write_growable_npy(folder / f"{name}.npy", column)
        columns[path] = column
    held = {"logits": columns[("logits",)], "ids": columns[("ids",)], "split": ["a", "b"]}
    final = _structure.layout(held, ml_dtypes=True)
    assert final.names == first.names  # names depend on the arrays' key paths only
    for index, path in enumerate(final.paths):
        final.complete(index, "bfloat16" if path == ("logits",) else None, str(columns[path].dtype))
    fd = os.open(folder / "__tonumpy__.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    os.write(fd, final.structure_bytes())
    os.close(fd)
    out = tonumpy.load(folder, ml_dtypes=True)
    assert list(out) == ["logits", "ids", "split"]
    assert out["logits"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(out["logits"].view(np.uint16), columns[("logits",)])
    np.testing.assert_array_equal(out["ids"], [0, 1, 0])
    assert out["split"] == ["a", "b"]
    widened = tonumpy.load(folder)["logits"]
    np.testing.assert_array_equal(widened, torch.cat([b["logits"] for b in batches]).float())
    assert tio.read(folder).format == "tonumpy npy directory"
