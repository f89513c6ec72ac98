"""Files other tools read the same way: tensor names kept, 0-d shapes kept, every stored layout
converted, and no member of a tonumpy file hidden from ``show``, ``load`` and ``convert``.

Each file tonumpy writes is read back by the reference reader of its format (``safetensors``,
``np.load``, ``torch.load(weights_only=True)``); Hugging Face models are tiny ones built from
a config.
"""

from __future__ import annotations

import io
import json
import shutil
import zipfile
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import torch

import tonumpy
from _helpers.models import tiny_bert
from tonumpy import _dtypes, cli
from tonumpy import io as tio

transformers = pytest.importorskip("transformers")
safetensors = pytest.importorskip("safetensors")
safetensors_torch = pytest.importorskip("safetensors.torch")


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(list(argv), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def names_in(path: Path) -> list[str]:
    """The tensor names of a .safetensors file, as the safetensors package reads them."""
    with safetensors.safe_open(str(path), "pt") as f:
        return list(f.keys())


def metadata_of(path: Path) -> dict[str, str]:
    with safetensors.safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype, key
        assert torch.equal(got[key], tensor.detach()), key


# ------------------------------------------------------------------ 1. names on write

ODD_KEYS = [
    "_orig_mod.layer.weight",  # torch.compile's prefix
    "dense/kernel:0",  # a TensorFlow name
    "A",
    "a",  # case twins
    "ünïcödé.权重.😀",
    "a b\tc",
    "../../etc/passwd",
    "..",
    "",
    "~2",
    "__tonumpy__",
    "con",
    "x" * 300,
    "layers.0.weight",
]


@pytest.mark.parametrize("via", ["pt", "npz"])
def test_a_state_dict_keeps_its_keys_as_tensor_names(tmp_path: Path, via: str) -> None:
    """Every key, whatever its characters, is the very same string in the .safetensors."""
    sd = {key: torch.full((i + 1,), float(i)) for i, key in enumerate(ODD_KEYS)}
    src = tmp_path / f"m.{via}"
    if via == "pt":
        torch.save(sd, src)
    else:
        tonumpy.save(src, sd)
    dst = tmp_path / "m.safetensors"
    code, _, err = run("convert", str(src), str(dst))
    assert code == 0, err
    assert sorted(names_in(dst)) == sorted(ODD_KEYS)
    assert_same_tensors(safetensors_torch.load_file(str(dst)), sd)
    back = tonumpy.load(dst)
    assert list(back) == ODD_KEYS  # tonumpy rebuilds the tree, in its order
    for key, tensor in sd.items():
        np.testing.assert_array_equal(back[key], tensor.numpy())


def test_a_nested_tree_gets_dotted_key_paths(tmp_path: Path) -> None:
    """Nested keys joined by dots (as torch and Hugging Face name weights); load rebuilds it."""
    tree = {
        "model": {"layer.weight": torch.ones(2), "layers": [torch.zeros(1), torch.ones(3)]},
        "optimizer": {"state": {0: {"exp_avg": torch.full((2,), 3.0)}}, "lr": 0.1},
        "epoch": 3,
    }
    src = tmp_path / "ckpt.pt"
    torch.save(tree, src)
    tio.convert(src, tmp_path / "ckpt.safetensors")
    assert names_in(tmp_path / "ckpt.safetensors") == [
        "model.layer.weight",
        "model.layers.0",
        "model.layers.1",
        "optimizer.state.0.exp_avg",
    ]
    back = tonumpy.load(tmp_path / "ckpt.safetensors")
    assert back["optimizer"]["state"][0]["exp_avg"].tolist() == [3.0, 3.0]
    assert back["optimizer"]["lr"] == 0.1
    assert back["epoch"] == 3
    assert [a.shape for a in back["model"]["layers"]] == [(1,), (3,)]


def test_a_lone_tensor_is_named_root(tmp_path: Path) -> None:
    """A file holding one bare tensor converts to .safetensors as the tensor named 'root'."""
    torch.save(torch.arange(3), tmp_path / "t.pt")
    tio.convert(tmp_path / "t.pt", tmp_path / "t.safetensors")
    assert names_in(tmp_path / "t.safetensors") == ["root"]
    np.testing.assert_array_equal(tonumpy.load(tmp_path / "t.safetensors"), [0, 1, 2])


@pytest.mark.parametrize(
    ("tree", "first", "second"),
    [
        ({"a.b": torch.ones(1), "a": {"b": torch.zeros(1)}}, "['a.b']", "['a']['b']"),
        ({1: torch.ones(1), "1": torch.zeros(1)}, "[1]", "['1']"),
    ],
    ids=["dotted-key-and-nesting", "int-and-str-key"],
)
def test_two_places_with_one_name_are_refused(
    tmp_path: Path, tree: dict[Any, Any], first: str, second: str
) -> None:
    """No name is made up: a tree whose dotted names collide is refused, naming both places."""
    torch.save(tree, tmp_path / "t.pt")
    with pytest.raises(tonumpy.ConversionError) as info:
        tio.convert(tmp_path / "t.pt", tmp_path / "t.safetensors")
    message = str(info.value)
    assert first in message
    assert second in message
    assert ".npz" in message  # the format that keeps both
    assert not (tmp_path / "t.safetensors").exists()


@pytest.mark.parametrize(
    ("key", "why"),
    [("__metadata__", "reserved"), ("bad\ud800", "UTF-8")],
    ids=["reserved", "surrogate"],
)
def test_names_safetensors_cannot_hold_are_refused(tmp_path: Path, key: str, why: str) -> None:
    """Key paths that .safetensors cannot name are refused before any file is written."""
    tonumpy.save(tmp_path / "t.npz", {key: torch.ones(1), "ok": torch.ones(1)})
    with pytest.raises(tonumpy.ConversionError, match=why):
        tio.convert(tmp_path / "t.npz", tmp_path / "t.safetensors")
    assert not (tmp_path / "t.safetensors").exists()


def test_a_tensor_under_two_keys_keeps_both(tmp_path: Path) -> None:
    """One tensor object at two places: both names, each its own bytes (the format shares none)."""
    t = torch.arange(4.0)
    tree = {"embed.weight": t, "head.weight": t, "other": [t]}
    torch.save(tree, tmp_path / "tied.pt")
    tio.convert(tmp_path / "tied.pt", tmp_path / "tied.safetensors")
    assert sorted(names_in(tmp_path / "tied.safetensors")) == [
        "embed.weight",
        "head.weight",
        "other.0",
    ]
    plain = safetensors_torch.load_file(str(tmp_path / "tied.safetensors"))
    assert all(torch.equal(v, t) for v in plain.values())
    back = tonumpy.load(tmp_path / "tied.safetensors")
    assert back["head.weight"].tolist() == back["other"][0].tolist() == [0.0, 1.0, 2.0, 3.0]
    tio.convert(tmp_path / "tied.safetensors", tmp_path / "again.safetensors")
    assert sorted(names_in(tmp_path / "again.safetensors")) == sorted(plain)


@pytest.fixture(scope="module")
def bert() -> torch.nn.Module:
    return tiny_bert().eval()


def fresh_bert() -> torch.nn.Module:
    model = tiny_bert()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    return model


@pytest.mark.parametrize("keep_vars", [False, True], ids=["state_dict", "keep_vars"])
def test_a_state_dict_loads_strictly_into_the_model(
    tmp_path: Path, bert: torch.nn.Module, keep_vars: bool
) -> None:
    """.pt state dict -> convert -> .safetensors -> load_state_dict(strict=True): the same weights.

    The masked-LM head ties its decoder weight to the word embeddings: with ``keep_vars`` the
    state dict holds that one Parameter under two keys.
    """
    sd = bert.state_dict(keep_vars=keep_vars)
    a, b = "bert.embeddings.word_embeddings.weight", "cls.predictions.decoder.weight"
    assert (sd[a] is sd[b]) == keep_vars
    torch.save(sd, tmp_path / "sd.pt")
    code, _, err = run("convert", str(tmp_path / "sd.pt"), str(tmp_path / "sd.safetensors"))
    assert code == 0, err
    loaded = safetensors_torch.load_file(str(tmp_path / "sd.safetensors"))
    assert_same_tensors(loaded, {k: v.detach() for k, v in sd.items()})
    model = fresh_bert()
    model.load_state_dict(loaded, strict=True)
    assert_same_tensors(model.state_dict(), bert.state_dict())


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.compile imports torch.jit
def test_a_compiled_models_state_dict_keeps_its_prefix(
    tmp_path: Path, bert: torch.nn.Module
) -> None:
    """torch.compile's ``_orig_mod.`` prefix is kept: the file loads into a compiled model."""
    compiled = torch.compile(bert)
    sd = compiled.state_dict()
    assert all(k.startswith("_orig_mod.") for k in sd)
    torch.save(sd, tmp_path / "c.pt")
    tio.convert(tmp_path / "c.pt", tmp_path / "c.safetensors")
    loaded = safetensors_torch.load_file(str(tmp_path / "c.safetensors"))
    assert sorted(loaded) == sorted(sd)
    target = torch.compile(fresh_bert())
    target.load_state_dict(loaded, strict=True)
    assert_same_tensors(target.state_dict(), sd)


@pytest.mark.parametrize("source", ["safetensors", "shards", "bin", "pt"])
def test_a_converted_checkpoint_loads_with_from_pretrained(
    tmp_path: Path, bert: torch.nn.Module, source: str
) -> None:
    """A save_pretrained directory (or a .pt state dict) -> convert -> from_pretrained."""
    src = tmp_path / "saved"
    if source == "pt":
        torch.save(bert.state_dict(), tmp_path / "sd.pt")
        src = tmp_path / "sd.pt"
    elif source == "shards":
        bert.save_pretrained(src, max_shard_size="20KB")
        assert (src / "model.safetensors.index.json").exists()
    else:
        bert.save_pretrained(src, safe_serialization=source == "safetensors")
    out = tmp_path / "converted"
    out.mkdir()
    bert.config.save_pretrained(out)
    code, _, err = run("convert", str(src), str(out / "model.safetensors"))
    assert code == 0, err
    # transformers 4 refuses a file whose metadata lacks it; save_pretrained writes it
    assert metadata_of(out / "model.safetensors")["format"] == "pt"
    again = type(bert).from_pretrained(out).eval()
    assert_same_tensors(again.state_dict(), bert.state_dict())


# ------------------------------------------------------------------ 2. 0-d bits

ML = sorted(_dtypes.ML_DTYPES.values())


@pytest.mark.parametrize("name", ML)
def test_zero_d_bits_keep_their_shape(tmp_path: Path, name: str) -> None:
    """A 0-d bfloat16/float8 leaf stored bit-exact loads back 0-d, with and without ml_dtypes."""
    t = torch.tensor(2.0).to(getattr(torch, name))
    torch.save({"x": t, "arr": t[...]}, tmp_path / "s.pt")
    tree = {"x": t, "arr": np.array(1.0, dtype=getattr(ml_dtypes, name))}  # an ml_dtypes array
    tonumpy.save(tmp_path / "saved.npz", tree, ml_dtypes=True)
    tio.convert(tmp_path / "s.pt", tmp_path / "dir", ml_dtypes=True)
    tio.convert(tmp_path / "s.pt", tmp_path / "conv.npz", ml_dtypes=True)
    tio.convert(tmp_path / "saved.npz", tmp_path / "copy.npz", ml_dtypes=True)  # members copied
    tio.convert(tmp_path / "s.pt", tmp_path / "t.safetensors")
    assert np.load(tmp_path / "saved.npz")["x"].shape == ()
    for target in ("saved.npz", "dir", "conv.npz", "copy.npz", "t.safetensors"):
        for exact in (True, False):
            back = tonumpy.load(tmp_path / target, ml_dtypes=exact)
            for key in ("x", "arr"):
                assert back[key].shape == (), (target, exact, key)
                assert float(back[key]) in (1.0, 2.0)
                want = np.dtype(getattr(ml_dtypes, name)) if exact else np.float32
                assert back[key].dtype == want
        assert tio.read(tmp_path / target).tree["x"].shape == ()


# ------------------------------------------------------------------ 3. every stored layout


def _layouts() -> dict[str, torch.Tensor]:
    base = torch.arange(24, dtype=torch.float32)
    return {
        "size1-stride2": torch.arange(4)[::2][:1],
        "size1-dims-odd-strides": base.reshape(2, 3, 4)[:1, :, ::3],
        "as-strided-size1": base.as_strided((1, 3), (7, 2), 1),
        "empty-odd-strides": torch.empty_strided((0, 3), (1, 5)),
        "empty-slice": base[5:5],
        "empty-stride0": base.as_strided((2, 0), (0, 3)),
        "transposed": base.reshape(4, 6).t(),
        "stepped": base[1::3],
        "storage-offset": base[3:7],
        "expanded": torch.tensor([1.0, 2.0]).expand(3, 2),
        "scalar-expanded": torch.tensor(5).expand(4),
        "overlapping": base.as_strided((3, 2), (1, 1)),
        "bool-strided": (base > 10)[::5],
        "bfloat16-size1-stride": base.to(torch.bfloat16)[::7][:1],
        "bfloat16-transposed": base.to(torch.bfloat16).reshape(4, 6).t(),
        "float8-stepped": base.to(torch.float8_e4m3fn)[::5],
        "complex-stepped": torch.complex(base, -base)[::4],
        "int8-size1-dims": base.to(torch.int8).reshape(1, 24, 1)[:, ::6, :],
        "zero-d-view": base[7],
    }


LAYOUTS = _layouts()


@pytest.mark.parametrize("dst", ["out.safetensors", "out.npz", "out", "one.npy"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_layout_torch_load_returns_converts(tmp_path: Path, layout: str, dst: str) -> None:
    """Views, offsets, odd strides, stride 0, empty: each converts, read back by the reference."""
    t = LAYOUTS[layout]
    shared = t[..., :1] if t.ndim else t[...]  # a second view of the same storage
    src = tmp_path / "a.pt"
    torch.save(t if dst == "one.npy" else {"w": t, "v": shared}, src)
    ref = torch.load(src, weights_only=True)
    code, _, err = run("convert", "--ml-dtypes", str(src), str(tmp_path / dst))
    assert code == 0, err
    want = {"w": ref} if dst == "one.npy" else ref
    if dst.endswith(".safetensors"):
        got = safetensors_torch.load_file(str(tmp_path / dst))
        assert_same_tensors(got, {k: v.contiguous() for k, v in want.items()})
        for shown in (src, tmp_path / dst):
            code, _, err = run("show", "--stats", str(shown))
            assert code == 0, err
        return
    if dst == "one.npy":
        read = {"w": np.load(tmp_path / dst)}
    elif dst == "out":
        read = {k: np.load(tmp_path / dst / f"{k}.npy") for k in want}
    else:
        with np.load(tmp_path / dst) as npz:
            read = {k: npz[k] for k in want}
    for key, tensor in want.items():
        stored = read[key]
        assert stored.shape == tuple(tensor.shape), key
        if tensor.dtype in _dtypes.ML_DTYPES:  # the bits, unsigned
            bits = tensor.contiguous().view(_dtypes.BITS[tensor.element_size()]).numpy()
            np.testing.assert_array_equal(stored, bits.view(stored.dtype))
        else:
            np.testing.assert_array_equal(stored, tensor.numpy())
    if dst != "one.npy":
        back = tonumpy.load(tmp_path / dst, ml_dtypes=True)
        exact = {k: tonumpy.to_numpy(v, ml_dtypes=True) for k, v in want.items()}
        for key in want:
            assert back[key].dtype == exact[key].dtype
            np.testing.assert_array_equal(back[key], exact[key])


# ------------------------------------------------------------------ 4. no hidden member


def _tonumpy_files(tmp_path: Path) -> dict[str, Path]:
    tree = {"w": torch.ones(2), "step": 1}
    tonumpy.save(tmp_path / "a.npz", tree)
    tio.convert(tmp_path / "a.npz", tmp_path / "a.safetensors")
    tio.convert(tmp_path / "a.npz", tmp_path / "adir")
    return {
        "safetensors": tmp_path / "a.safetensors",
        "npz": tmp_path / "a.npz",
        "dir": tmp_path / "adir",
    }


def _add_member(path: Path, kind: str, name: str, array: np.ndarray) -> None:
    if kind == "safetensors":
        meta = metadata_of(path)
        tensors = safetensors_torch.load_file(str(path))
        tensors[name] = torch.from_numpy(array)
        safetensors_torch.save_file(tensors, str(path), metadata=meta)
    elif kind == "npz":
        buffer = io.BytesIO()
        np.save(buffer, array)
        with zipfile.ZipFile(path, "a") as zf:
            zf.writestr(f"{name}.npy", buffer.getvalue())
    else:
        np.save(path / f"{name}.npy", array)


def _reference_members(path: Path, kind: str) -> list[str]:
    if kind == "safetensors":
        return names_in(path)
    if kind == "npz":
        with np.load(path) as npz:
            return [n for n in npz.files if n != "__tonumpy__"]
    return sorted(p.stem for p in path.glob("*.npy"))


@pytest.mark.parametrize("kind", ["safetensors", "npz", "dir"])
def test_a_member_the_structure_does_not_list_is_refused(tmp_path: Path, kind: str) -> None:
    """An array added to a tonumpy file: load, show and convert refuse it, naming the member."""
    path = _tonumpy_files(tmp_path)[kind]
    _add_member(path, kind, "extra", np.full(3, 7.0))
    assert "extra" in _reference_members(path, kind)  # what np.load / safetensors see
    with pytest.raises(tonumpy.FileFormatError, match=r"'extra'") as info:
        tonumpy.load(path)
    assert str(path) in str(info.value)
    assert "not list" in str(info.value)
    with pytest.raises(tonumpy.FileFormatError, match=r"'extra'"):
        tio.read(path)
    for argv in (["show", str(path)], ["convert", str(path), str(tmp_path / "out.npz")]):
        code, _, err = run(*argv)
        assert code == 2
        assert "'extra'" in err
        assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out.npz").exists()


@pytest.mark.parametrize("kind", ["safetensors", "npz", "dir"])
def test_many_unlisted_members_are_counted(tmp_path: Path, kind: str) -> None:
    """Arrays the structure does not place are refused, the first few named and the rest counted."""
    path = _tonumpy_files(tmp_path)[kind]
    for i in range(12):
        _add_member(path, kind, f"hidden{i:02d}", np.zeros(1))
    with pytest.raises(tonumpy.FileFormatError, match=r"12 arrays.*'hidden00'.*and 7 more"):
        tonumpy.load(path)


def test_an_array_listed_but_placed_nowhere_is_refused(tmp_path: Path) -> None:
    """A structure whose "arrays" lists a member that no node of its tree places is altered."""
    path = _tonumpy_files(tmp_path)["safetensors"]
    meta = metadata_of(path)
    structure = json.loads(meta["__tonumpy__"])
    structure["arrays"].append("extra")
    meta["__tonumpy__"] = json.dumps(structure)
    tensors = safetensors_torch.load_file(str(path))
    tensors["extra"] = torch.ones(1)
    safetensors_torch.save_file(tensors, str(path), metadata=meta)
    with pytest.raises(tonumpy.FileFormatError, match=r"'extra'"):
        tonumpy.load(path)


@pytest.mark.parametrize("kind", ["safetensors", "npz", "dir"])
def test_files_of_other_tools_load_every_member(tmp_path: Path, kind: str) -> None:
    """Without tonumpy's structure, every member is a leaf, as before."""
    arrays = {"w": np.ones(2), "extra": np.full(3, 7.0)}
    path = tmp_path / {"safetensors": "p.safetensors", "npz": "p.npz", "dir": "pdir"}[kind]
    if kind == "safetensors":
        safetensors_torch.save_file({k: torch.from_numpy(v) for k, v in arrays.items()}, str(path))
    elif kind == "npz":
        np.savez(path, **arrays)  # type: ignore[arg-type]
    else:
        path.mkdir()
        for key, array in arrays.items():
            np.save(path / f"{key}.npy", array)
    back = tonumpy.load(path)
    assert sorted(back) == ["extra", "w"]
    code, out, _ = run("show", str(path))
    assert code == 0
    assert "extra" in out


def test_a_directory_with_other_files_still_loads(tmp_path: Path) -> None:
    """Only .npy files are members of a directory: a README beside them is not data."""
    path = _tonumpy_files(tmp_path)["dir"]
    (path / "README.txt").write_text("notes")
    assert tonumpy.load(path)["step"] == 1
    shutil.rmtree(path)
