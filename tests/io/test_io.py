"""tonumpy.save / load / read / convert: structure, dtypes, safety of loading and of writing."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import pickle
import subprocess
import sys
import zipfile
from collections import OrderedDict, defaultdict, deque, namedtuple
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tonumpy
from tonumpy import io as tio
from tonumpy._format import _names

Point = namedtuple("Point", "x y")


@dataclasses.dataclass
class Pair:
    first: Any
    second: Any = None


@dataclasses.dataclass
class FakeModelOutput(OrderedDict):  # type: ignore[type-arg]
    loss: Any = None
    logits: Any = None
    attentions: Any = None

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            if getattr(self, field.name) is not None:
                self[field.name] = getattr(self, field.name)


def leftovers(folder: Path) -> list[str]:
    """Temporary files a failed write could have left."""
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


# ----------------------------------------------------------------------- save and load


def test_round_trip_keeps_structure_values_and_key_order(tmp_path: Path) -> None:
    """Containers, key order (not sorted), non-str keys and plain values come back exactly."""
    tree = {
        "z": torch.arange(3),
        "a": [torch.ones(2, 2), (1, 2.5, None), "text"],
        3: {"nested": np.float32(1.5), (1, "k"): b"\x00\xff"},
        "values": [True, False, None, float("inf"), -0.0, 1 + 2j, 10**30],
    }
    path = tmp_path / "t.npz"
    tonumpy.save(path, tree)
    out = tonumpy.load(path)
    assert list(out) == ["z", "a", 3, "values"]
    np.testing.assert_array_equal(out["z"], np.arange(3))
    assert out["a"][1] == (1, 2.5, None)
    assert isinstance(out["a"][1], tuple)
    assert out["a"][2] == "text"
    assert out[3][(1, "k")] == b"\x00\xff"
    assert out[3]["nested"].dtype == np.float32
    assert out["values"][:3] == [True, False, None]
    assert out["values"][3] == float("inf")
    assert out["values"][5] == 1 + 2j
    assert out["values"][6] == 10**30


def test_nan_survives(tmp_path: Path) -> None:
    """A NaN leaf is saved and loaded back as NaN."""
    path = tmp_path / "t.npz"
    tonumpy.save(path, {"x": float("nan")})
    assert np.isnan(tonumpy.load(path)["x"])


def test_classes_come_back_as_dicts_with_their_names_recorded(tmp_path: Path) -> None:
    """namedtuple, dataclass, ModelOutput (None fields kept), deque, torch.return_types."""
    tree = {
        "point": Point(torch.zeros(1), 2),
        "pair": Pair(torch.ones(1)),
        "output": FakeModelOutput(loss=torch.tensor(1.0), logits=torch.ones(2)),
        "queue": deque([1, 2]),
        "top": torch.max(torch.tensor([[1.0, 3.0]]), dim=1),
    }
    path = tmp_path / "t.npz"
    tonumpy.save(path, tree)
    out = tonumpy.load(path)
    assert type(out["point"]) is dict
    assert list(out["point"]) == ["x", "y"]
    assert out["pair"]["second"] is None
    assert list(out["output"]) == ["loss", "logits", "attentions"]
    assert out["output"]["attentions"] is None
    assert out["queue"] == [1, 2]
    assert list(out["top"]) == ["values", "indices"]
    classes = tio.read(path).classes
    assert classes[("point",)].endswith("Point")
    assert classes[("output",)].endswith("FakeModelOutput")
    assert classes[("top",)] == "torch.return_types.max"


def test_input_tree_is_not_mutated(tmp_path: Path) -> None:
    """save leaves the input tree, its tensors and their requires_grad as they were."""
    t = torch.ones(2, requires_grad=True)
    tree = {"t": t, "l": [1]}
    tonumpy.save(tmp_path / "t.npz", tree)
    assert tree["t"] is t
    assert t.requires_grad
    assert tree["l"] == [1]


@pytest.mark.parametrize("name", ["bfloat16", "float8_e4m3fn", "float8_e5m2"])
def test_low_precision_floats_survive_exactly_with_ml_dtypes(tmp_path: Path, name: str) -> None:
    """Bits + dtype name stored; ml_dtypes=True gives them back bit for bit."""
    dtype = getattr(torch, name)
    t = torch.tensor([0.1, -2.5, 448.0, 1e-3]).to(dtype)
    path = tmp_path / "t.npz"
    tonumpy.save(path, {"t": t}, ml_dtypes=True)
    exact = tonumpy.load(path, ml_dtypes=True)["t"]
    assert exact.dtype == np.dtype(getattr(ml_dtypes, name))
    bits = t.view(torch.uint8 if t.element_size() == 1 else torch.int16).numpy()
    np.testing.assert_array_equal(exact.view(bits.dtype), bits)
    wide = tonumpy.load(path)["t"]  # no ml_dtypes: the documented float32 widening
    np.testing.assert_array_equal(wide, t.float().numpy())
    plain = np.load(path)  # other tools see the raw bits, with the dtype in the structure
    assert plain["t"].dtype.itemsize == t.element_size()


def test_low_precision_floats_widen_by_default(tmp_path: Path) -> None:
    """bfloat16 leaves are saved as float32 by default, the original dtype kept in the structure."""
    t = torch.tensor([1.5, 2.0], dtype=torch.bfloat16)
    path = tmp_path / "t.npz"
    tonumpy.save(path, {"t": t})
    assert np.load(path)["t"].dtype == np.float32  # readable anywhere, exact widening
    assert tio.read(path).sources[("t",)]["dtype"] == "bfloat16"


@pytest.mark.parametrize("dst", ["t.npz", "dir"])
def test_large_low_precision_tensors_widen_in_chunks_exactly(tmp_path: Path, dst: str) -> None:
    """Widening streams in chunks: several chunks, a non-contiguous view, exact values."""
    t = torch.randn(700, 1000).to(torch.bfloat16).T  # > 2 chunks, transposed
    f8 = torch.randn(3000).to(torch.float8_e4m3fn)
    src = tmp_path / "src.pt"
    torch.save({"t": t, "f8": f8}, src)
    tio.convert(src, tmp_path / dst)
    out = tonumpy.load(tmp_path / dst)
    np.testing.assert_array_equal(out["t"], t.float().numpy())
    np.testing.assert_array_equal(out["f8"], f8.float().numpy())
    assert out["t"].shape == (1000, 700)


def test_widening_keeps_special_values_bit_for_bit(tmp_path: Path) -> None:
    """Widening bfloat16 keeps NaN, infinities, signed zeros and subnormals exactly."""
    specials = [float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1e-40, -3.0e38]
    t = torch.tensor(specials).to(torch.bfloat16)
    path = tmp_path / "t.npz"
    tonumpy.save(path, {"t": t})
    src = tmp_path / "t.pt"
    torch.save({"t": t}, src)
    tio.convert(src, tmp_path / "c.npz")
    for out in (tonumpy.load(path)["t"], tonumpy.load(tmp_path / "c.npz")["t"]):
        np.testing.assert_array_equal(out.view(np.uint32), t.float().numpy().view(np.uint32))


def test_ml_dtypes_arrays_are_stored_exactly(tmp_path: Path) -> None:
    """ml_dtypes arrays are stored as their bits and loaded back identical with ml_dtypes=True."""
    arr = np.array([1.5, -3.0], dtype=ml_dtypes.bfloat16)
    path = tmp_path / "t.npz"
    tonumpy.save(path, [arr])
    back = tonumpy.load(path, ml_dtypes=True)[0]
    assert back.dtype == arr.dtype
    np.testing.assert_array_equal(back.view(np.uint16), arr.view(np.uint16))


def test_plain_numpy_npz_and_npy_load(tmp_path: Path) -> None:
    """Plain NumPy .npz (member order kept) and .npy files load."""
    np.savez(tmp_path / "p.npz", b=np.arange(2), a=np.ones(3))
    out = tonumpy.load(tmp_path / "p.npz")
    assert list(out) == ["b", "a"]
    np.testing.assert_array_equal(out["a"], np.ones(3))
    np.save(tmp_path / "one.npy", np.eye(2))
    np.testing.assert_array_equal(tonumpy.load(tmp_path / "one.npy"), np.eye(2))


def test_tonumpy_npz_is_a_plain_npz(tmp_path: Path) -> None:
    """Any NumPy opens it without pickle; members are named after the dotted key paths."""
    path = tmp_path / "t.npz"
    tonumpy.save(path, {"model": {"layer.0.weight": torch.eye(2)}, "x": [torch.zeros(1)]})
    with np.load(path, allow_pickle=False) as npz:
        assert set(npz.files) == {"__tonumpy__", "model.layer.0.weight", "x.0"}
        np.testing.assert_array_equal(npz["model.layer.0.weight"], np.eye(2))


def test_shared_leaf_is_stored_once(tmp_path: Path) -> None:
    """A leaf that appears twice in a tree is stored once and loaded at both places."""
    t = torch.arange(4)
    path = tmp_path / "t.npz"
    tonumpy.save(path, {"a": t, "b": t})
    with zipfile.ZipFile(path) as zf:
        assert len(zf.namelist()) == 2  # the structure and one array
    out = tonumpy.load(path)
    np.testing.assert_array_equal(out["b"], np.arange(4))


def test_unstorable_leaf_names_its_path(tmp_path: Path) -> None:
    """An unstorable leaf (object, object array) is refused naming its path; nothing is left."""
    path = tmp_path / "t.npz"
    with pytest.raises(tonumpy.ConversionError, match=r"tree\['cache'\]\[1\].*object"):
        tonumpy.save(path, {"cache": [torch.ones(1), object()]})
    with pytest.raises(tonumpy.ConversionError, match="object array"):
        tonumpy.save(path, {"o": np.array([None, 1], dtype=object)})
    assert not path.exists()
    assert leftovers(tmp_path) == []


def test_cycle_is_a_clean_error(tmp_path: Path) -> None:
    """Saving a tree with a cycle is a ConversionError, not a recursion crash."""
    loop: list[Any] = [torch.ones(1)]
    loop.append(loop)
    with pytest.raises(tonumpy.ConversionError, match="cycle"):
        tonumpy.save(tmp_path / "t.npz", loop)


def test_compressed_npz(tmp_path: Path) -> None:
    """compress=True writes a compressed .npz that loads back the same values."""
    path = tmp_path / "t.npz"
    tonumpy.save(path, {"z": torch.zeros(10_000)}, compress=True)
    assert path.stat().st_size < 10_000
    np.testing.assert_array_equal(tonumpy.load(path)["z"], np.zeros(10_000, np.float32))


# --------------------------------------------------------------------- atomic writes


def test_save_never_overwrites_without_permission(tmp_path: Path) -> None:
    """save(overwrite=False) keeps an existing file; the default replaces it atomically."""
    path = tmp_path / "t.npz"
    path.write_bytes(b"precious")
    with pytest.raises(FileExistsError):
        tonumpy.save(path, {"a": torch.ones(1)}, overwrite=False)
    assert path.read_bytes() == b"precious"
    tonumpy.save(path, {"a": torch.ones(1)})  # the library default replaces, atomically
    assert list(tonumpy.load(path)) == ["a"]


def test_failed_write_leaves_nothing_behind(tmp_path: Path) -> None:
    """A failure half-way (here: the second leaf cannot be converted) leaves no partial file."""
    tree = {"a": torch.ones(3), "b": torch.empty(3, device="meta")}
    path = tmp_path / "t.npz"
    with pytest.raises(tonumpy.UnsupportedLeafError, match="meta"):
        tonumpy.save(path, tree)
    assert not path.exists()
    with pytest.raises(tio.FileFormatError, match="meta tensor"):
        tio.convert(_torch_file(tmp_path, tree), tmp_path / "dir")
    assert not (tmp_path / "dir").exists()
    path.write_bytes(b"old")
    with pytest.raises(tonumpy.UnsupportedLeafError):
        tonumpy.save(path, tree)
    assert path.read_bytes() == b"old"  # the old file is untouched
    assert leftovers(tmp_path) == []


def _torch_file(folder: Path, obj: Any, name: str = "src.pt", **kwargs: Any) -> Path:
    path = folder / name
    torch.save(obj, path, **kwargs)
    return path


def test_convert_refuses_existing_destination(tmp_path: Path) -> None:
    """convert refuses an existing destination naming overwrite=True (no CLI flag), keeping it."""
    src = _torch_file(tmp_path, {"a": torch.ones(1)})
    dst = tmp_path / "out.npz"
    dst.write_bytes(b"keep")
    with pytest.raises(FileExistsError, match="overwrite=True") as info:
        tio.convert(src, dst)
    assert "--" not in str(info.value)  # a library message names parameters, not CLI flags
    assert dst.read_bytes() == b"keep"
    tio.convert(src, dst, overwrite=True)
    assert list(tonumpy.load(dst)) == ["a"]


def test_convert_refuses_same_file(tmp_path: Path) -> None:
    """convert onto its own source file is refused, even with overwrite=True."""
    path = tmp_path / "t.npz"
    tonumpy.save(path, {"a": np.ones(1)})
    with pytest.raises(tio.FileFormatError, match="source file"):
        tio.convert(path, path, overwrite=True)


def test_force_never_replaces_a_directory_with_other_files(tmp_path: Path) -> None:
    """overwrite=True never replaces a directory holding files tonumpy did not write."""
    src = _torch_file(tmp_path, {"a": torch.ones(1)})
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("years of work")
    with pytest.raises(FileExistsError, match="more than a tonumpy export"):
        tio.convert(src, home, overwrite=True)
    assert (home / "thesis.tex").read_text() == "years of work"
    out = tmp_path / "export"
    tio.convert(src, out)
    tio.convert(_torch_file(tmp_path, {"b": torch.ones(1)}, "b.pt"), out, overwrite=True)
    assert sorted(os.listdir(out)) == ["__tonumpy__.json", "b.npy"]
    assert leftovers(tmp_path) == []


def test_unsupported_destination_fails_before_reading(tmp_path: Path) -> None:
    """An unsupported destination is refused, listing the formats, before the source is read."""
    expected = r"\.npz, \.npy, \.safetensors, \.parquet, or \.pt, \.pth, \.bin or \.ckpt"
    with pytest.raises(tio.FileFormatError, match=expected):
        tio.convert(tmp_path / "missing.pt", tmp_path / "out.pkl")


def test_npy_destination_holds_one_array(tmp_path: Path) -> None:
    """A .npy destination takes a tree of exactly one array; more is refused, nothing written."""
    src = _torch_file(tmp_path, torch.arange(3))
    tio.convert(src, tmp_path / "one.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "one.npy"), np.arange(3))
    src2 = _torch_file(tmp_path, {"a": torch.ones(1), "b": torch.ones(1)}, "two.pt")
    with pytest.raises(tio.FileFormatError, match="one array"):
        tio.convert(src2, tmp_path / "two.npy")
    assert not (tmp_path / "two.npy").exists()


# ----------------------------------------------------------------- .npy directory names

NASTY_KEYS = [
    "..",
    "../../escape",
    "/etc/passwd",
    "C:\\Windows\\evil",
    "a\x00b",
    "x" * 5000,
    "x" * 5000 + "y",
    "a/b",
    "a_b",
    "A_B",
    ".hidden",
    "-rf",
    "con",
    "__tonumpy__",
    "ünïcödé",
    "",
    " ",
]


def test_npy_directory_names_are_contained_and_unique(tmp_path: Path) -> None:
    """No key can name a file outside the directory, hidden, too long, or twice."""
    tree = {key: torch.full((1,), float(i)) for i, key in enumerate(NASTY_KEYS)}
    src = _torch_file(tmp_path, tree)
    out = tmp_path / "sub" / "out"
    out.parent.mkdir()
    tio.convert(src, out)
    files = sorted(os.listdir(out))
    assert len(files) == len(NASTY_KEYS) + 1  # one per leaf, and the structure
    assert len({f.casefold() for f in files}) == len(files)
    for name in files:
        assert not name.startswith(".")
        assert len(name.encode()) <= 255
        assert (out / name).resolve().parent == out.resolve()
    assert sorted(os.listdir(tmp_path / "sub")) == ["out"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.pt", "sub"]
    back = tonumpy.load(out)  # the structure maps every file back to its real key
    assert list(back) == NASTY_KEYS
    for i, key in enumerate(NASTY_KEYS):
        assert back[key][0] == i


@given(st.text(max_size=300))
@settings(max_examples=200, deadline=None)
def test_sanitised_names_are_always_safe(text: str) -> None:
    """File names made from any key are safe: ASCII, no leading dot or dash, no '..', bounded."""
    (name,) = _names.unique_names([(text,)])
    assert _names.is_safe_name(name)
    assert all(c.isascii() and (c.isalnum() or c in "._-~") for c in name)
    assert not name.startswith((".", "-"))
    assert ".." not in name
    assert len(name) <= _names.MAX_NAME


def test_a_directory_structure_cannot_point_outside(tmp_path: Path) -> None:
    """A tampered __tonumpy__.json naming ../ files is refused, not followed."""
    out = tmp_path / "out"
    tio.convert(_torch_file(tmp_path, {"a": torch.ones(1)}), out)
    structure = (out / "__tonumpy__.json").read_text().replace('"a"]', '"../secret"]')
    (out / "__tonumpy__.json").write_text(structure)
    np.save(tmp_path / "secret.npy", np.ones(1))
    with pytest.raises(tio.FileFormatError, match="unsafe file"):
        tonumpy.load(out)


# ------------------------------------------------------------------------- torch files


def test_torch_file_loads_with_weights_only_and_mmap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading a torch file calls torch.load with weights_only=True and mmap."""
    calls: list[dict[str, Any]] = []
    real = torch.load

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    src = _torch_file(tmp_path, {"w": torch.ones(2)})
    out = tonumpy.load(src)
    np.testing.assert_array_equal(out["w"], np.ones(2, np.float32))
    assert calls[-1]["weights_only"] is True
    assert calls[-1]["mmap"] is True
    legacy = _torch_file(
        tmp_path, {"w": torch.ones(2)}, "legacy.pt", _use_new_zipfile_serialization=False
    )
    np.testing.assert_array_equal(tonumpy.load(legacy)["w"], np.ones(2, np.float32))
    assert calls[-1]["mmap"] is False  # the legacy format cannot be memory-mapped
    assert calls[-1]["weights_only"] is True


def test_numpy_objects_in_checkpoints_are_allow_listed(tmp_path: Path) -> None:
    """Arrays, scalars and dtypes as real checkpoints hold them load without --unsafe-load."""
    obj = {
        "arr": np.arange(6, dtype=np.int16).reshape(2, 3),
        "scalar": np.float64(2.5),
        "dtype": np.dtype("float32"),
        "when": np.array(["2026-11-28"], dtype="M8[D]"),
        "rng": np.random.default_rng(0).integers(0, 5, size=3),
    }
    out = tio.read(_torch_file(tmp_path, obj)).tree
    np.testing.assert_array_equal(out["arr"], obj["arr"])
    assert out["scalar"] == 2.5
    assert out["dtype"] == np.float32
    assert out["when"][0] == np.datetime64("2026-11-28")


def test_torch_file_classes_are_never_imported(tmp_path: Path) -> None:
    """A class from a module with import side effects: loaded as a dict, module never imported."""
    module = tmp_path / "sideeffect_mod.py"
    marker = tmp_path / "IMPORTED"
    module.write_text(
        "import dataclasses, pathlib\n"
        f"pathlib.Path({str(marker)!r}).write_text('imported')\n"
        "@dataclasses.dataclass\nclass Record:\n    weights: object\n    step: int\n"
    )
    script = (
        "import sys, torch; sys.path.insert(0, sys.argv[1]); import sideeffect_mod as m;"
        "torch.save({'r': m.Record(torch.ones(2), 7)}, sys.argv[2])"
    )
    src = tmp_path / "rec.pt"
    subprocess.run([sys.executable, "-c", script, str(tmp_path), str(src)], check=True)
    marker.unlink()
    contents = tio.read(src)
    assert not marker.exists()
    assert "sideeffect_mod" not in sys.modules
    assert contents.classes[("r",)] == "sideeffect_mod.Record"
    assert contents.tree["r"]["step"] == 7
    torch.testing.assert_close(contents.tree["r"]["weights"], torch.ones(2))


def test_model_output_like_classes_from_torch_files(tmp_path: Path) -> None:
    """OrderedDict-dataclasses keep items and None fields; namedtuples become indexed dicts."""
    obj = {
        "out": FakeModelOutput(loss=torch.tensor(0.5), logits=torch.ones(2)),
        "pt": Point(torch.zeros(1), 3),
        "top": torch.max(torch.tensor([[1.0, 3.0]]), dim=1),
    }
    contents = tio.read(_torch_file(tmp_path, obj))
    assert list(contents.tree["out"]) == ["loss", "logits", "attentions"]
    assert contents.tree["out"]["attentions"] is None
    assert contents.tree["pt"][1] == 3
    assert list(contents.tree["top"]) == ["values", "indices"]
    assert contents.classes[("out",)].endswith("FakeModelOutput")


def test_common_standard_library_containers_in_checkpoints(tmp_path: Path) -> None:
    """defaultdict (with a builtin factory), deque and datetime load without running code."""
    factory = defaultdict(list)
    factory["a"].append(torch.ones(1))
    obj = {"dd": factory, "q": deque([1, 2], maxlen=5), "when": datetime.datetime(2026, 11, 28)}
    contents = tio.read(_torch_file(tmp_path, obj))
    assert contents.tree["q"] == [1, 2]
    torch.testing.assert_close(contents.tree["dd"]["a"][0], torch.ones(1))
    assert contents.classes[("dd",)] == "collections.defaultdict"
    assert contents.classes[("when",)] == "datetime.datetime"
    tio.convert(_torch_file(tmp_path, obj, "again.pt"), tmp_path / "out.npz")
    assert tonumpy.load(tmp_path / "out.npz")["q"] == [1, 2]


def test_pickled_object_arrays_in_npz_are_refused(tmp_path: Path) -> None:
    """A .npz holding pickled object arrays is refused, saying only pickle could read it."""
    path = tmp_path / "obj.npz"
    np.savez(path, o=np.array([{"a": 1}], dtype=object))
    with pytest.raises(tio.FileFormatError, match="only pickle can read"):
        tonumpy.load(path)


class _RunsCommand:
    def __init__(self, marker: Path, how: str) -> None:
        self.marker = marker
        self.how = how

    def __reduce__(self) -> Any:
        if self.how == "system":
            return (os.system, (f"touch {self.marker}",))
        if self.how == "popen":
            return (subprocess.Popen, (["touch", str(self.marker)],))
        if self.how == "exec":
            return (exec, (f"open({str(self.marker)!r}, 'w').close()",))
        return (eval, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("how", ["system", "popen", "exec", "eval"])
@pytest.mark.parametrize("fmt", ["zip", "legacy", "raw-pickle"])
def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path: Path, how: str, fmt: str) -> None:
    """A pickle that would run a command is refused and the command never runs."""
    marker = tmp_path / "PWNED"
    payload = {"weights": torch.ones(2), "evil": _RunsCommand(marker, how)}
    path = tmp_path / "evil.pt"
    if fmt == "raw-pickle":
        path.write_bytes(pickle.dumps(payload, protocol=2))
    else:
        torch.save(payload, path, _use_new_zipfile_serialization=fmt == "zip")
    # a bare pickle is not a torch.save file; either way it is refused before anything runs
    expected = (
        (tio.UnsafeFileError, tio.FileFormatError) if fmt == "raw-pickle" else tio.UnsafeFileError
    )
    with pytest.raises(expected) as info:
        tio.read(path)
    if fmt != "raw-pickle":
        assert "refused" in str(info.value)
        assert "unsafe_load=True" in str(info.value)
        assert "--unsafe-load" not in str(info.value)
    assert "\n" not in str(info.value)
    assert not marker.exists()
    with pytest.raises((tio.UnsafeFileError, tio.FileFormatError)):
        tio.convert(path, tmp_path / "out.npz")
    assert not (tmp_path / "out.npz").exists()
    assert not marker.exists()


def test_unsafe_load_reads_what_safe_loading_cannot(tmp_path: Path) -> None:
    """A pickle protocol the weights-only loader lacks: refused, unless unsafe_load=True."""
    path = _torch_file(tmp_path, {"a": np.ones(1)}, pickle_protocol=4)
    with pytest.raises(tio.FileFormatError, match="unsafe_load=True"):
        tio.read(path)
    assert tonumpy.load(path, unsafe_load=True)["a"][0] == 1.0


def test_cycles_in_a_pickle_are_clean_errors(tmp_path: Path) -> None:
    """A pickled tree with a cycle is a FileFormatError naming the cycle."""
    loop: list[Any] = [torch.ones(1)]
    loop.append(loop)
    with pytest.raises(tio.FileFormatError, match="cycle"):
        tio.read(_torch_file(tmp_path, loop))


def test_unknown_and_missing_files(tmp_path: Path) -> None:
    """A missing file is FileNotFoundError; a file of no known format says so."""
    with pytest.raises(FileNotFoundError):
        tonumpy.load(tmp_path / "missing.pt")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(tio.FileFormatError, match="not a file tonumpy reads"):
        tonumpy.load(tmp_path / "notes.txt")


def test_sniffs_files_without_a_known_suffix(tmp_path: Path) -> None:
    """Files without a known suffix are recognised by their content (torch, npz)."""
    torch.save({"a": torch.ones(1)}, tmp_path / "checkpoint")
    np.savez(tmp_path / "arrays.npz", a=np.ones(1))
    os.rename(tmp_path / "arrays.npz", tmp_path / "arrays.data")
    assert tio.read(tmp_path / "checkpoint").format == "torch"
    assert tio.read(tmp_path / "arrays.data").format == "npz"


@pytest.mark.cuda
def test_device_of_a_cuda_checkpoint_is_recorded(tmp_path: Path) -> None:
    """A CUDA checkpoint reads onto the CPU, its original device recorded per leaf."""
    src = _torch_file(tmp_path, {"w": torch.ones(2, device="cuda")})
    contents = tio.read(src)
    assert contents.tree["w"].device.type == "cpu"
    assert contents.sources[("w",)]["device"] == "cuda:0"


# ------------------------------------------------------------------------- safetensors


def test_safetensors_round_trip_is_exact(tmp_path: Path) -> None:
    """A tree through .safetensors comes back with its keys, values, dtypes and plain values."""
    tree = {
        "layer.weight": torch.randn(3, 2).to(torch.bfloat16),
        "scale": torch.tensor(2.0),
        "meta": {"step": 4, "name": "tiny"},
        "arr": np.arange(3, dtype=np.int32),
    }
    src = _torch_file(tmp_path, tree)
    dst = tmp_path / "out.safetensors"
    tio.convert(src, dst)
    contents = tio.read(dst)
    assert contents.format == "safetensors"
    back = contents.tree
    assert back["layer.weight"].dtype == torch.bfloat16
    assert torch.equal(back["layer.weight"], tree["layer.weight"])
    assert back["scale"].shape == ()
    assert back["meta"] == {"step": 4, "name": "tiny"}
    safetensors_torch = pytest.importorskip("safetensors.torch")
    plain = safetensors_torch.load_file(str(dst))  # any safetensors reader sees the tensors
    assert set(plain) == {"layer.weight", "scale", "arr"}


def test_plain_safetensors_file_loads(tmp_path: Path) -> None:
    """A .safetensors file written by the reference library loads (bfloat16 widened)."""
    safetensors_torch = pytest.importorskip("safetensors.torch")
    path = tmp_path / "plain.safetensors"
    safetensors_torch.save_file({"w": torch.ones(2, dtype=torch.bfloat16)}, str(path))
    out = tonumpy.load(path)
    np.testing.assert_array_equal(out["w"], np.ones(2, np.float32))


def test_safetensors_need_no_safetensors_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """tonumpy reads and writes .safetensors itself; the files are the package's format."""
    src = _torch_file(tmp_path, {"a": torch.arange(3.0), "b": torch.ones(2, dtype=torch.bfloat16)})
    with monkeypatch.context() as patched:
        patched.setitem(sys.modules, "safetensors", None)
        patched.setitem(sys.modules, "safetensors.torch", None)
        tio.convert(src, tmp_path / "x.safetensors")
        back = tio.read(tmp_path / "x.safetensors").tree
    torch.testing.assert_close(back["a"], torch.arange(3.0))
    safetensors_torch = pytest.importorskip("safetensors.torch")
    plain = safetensors_torch.load_file(str(tmp_path / "x.safetensors"))
    torch.testing.assert_close(plain["b"], torch.ones(2, dtype=torch.bfloat16))


def test_import_tonumpy_stays_light() -> None:
    """import tonumpy loads neither safetensors, ml_dtypes nor the CLI."""
    code = (
        "import sys, tonumpy; "
        "print([m for m in ('safetensors', 'ml_dtypes', 'tonumpy.cli') if m in sys.modules])"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


# ---------------------------------------------------------------- corrupt input (fuzz)


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """Small valid files of every kind the loaders read, by file name."""
    folder = tmp_path_factory.mktemp("samples")
    tree = {"w": torch.arange(6.0).reshape(2, 3), "meta": {"s": "x", "n": [1, 2]}}
    torch.save(tree, folder / "zip.pt")
    torch.save(tree, folder / "legacy.pt", _use_new_zipfile_serialization=False)
    tonumpy.save(folder / "tree.npz", tree, ml_dtypes=True)
    np.save(folder / "one.npy", np.arange(5))
    tio.convert(folder / "zip.pt", folder / "tree.safetensors")
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@given(data=st.data())
@settings(
    max_examples=150,
    deadline=5000,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
def test_corrupted_files_give_clean_errors(
    samples: dict[str, bytes], tmp_path: Path, data: st.DataObject
) -> None:
    """Truncated, bit-flipped or spliced files: they load, or raise a TonumpyError; no crash."""
    name = data.draw(st.sampled_from(sorted(samples)))
    blob = bytearray(samples[name])
    how = data.draw(st.sampled_from(["truncate", "flip", "splice"]))
    if how == "truncate":
        blob = blob[: data.draw(st.integers(0, len(blob) - 1))]
    elif how == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
    else:
        at = data.draw(st.integers(0, len(blob)))
        blob[at:at] = data.draw(st.binary(min_size=1, max_size=64))
    path = tmp_path / f"fuzz-{name}"
    path.write_bytes(bytes(blob))
    try:
        tonumpy.load(path, ml_dtypes=True)
    except tonumpy.TonumpyError as exc:
        assert "\n" not in str(exc)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(["t", "v", "k", "i", "c", "dtype", "from", "x"]), inner)
    ),
    max_leaves=20,
)


@given(tree=_JSON, arrays=st.lists(st.text(max_size=8), max_size=3))
@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_any_structure_json_loads_or_fails_cleanly(
    tmp_path: Path, tree: Any, arrays: list[str]
) -> None:
    """A tampered structure (any JSON in place of the tree) never escapes as a raw error."""
    raw = json.dumps({"format": "tonumpy", "version": 1, "tree": tree, "arrays": arrays})
    path = tmp_path / "tampered.npz"
    with zipfile.ZipFile(path, "w") as zf, zf.open("__tonumpy__.npy", "w") as member:
        np.lib.format.write_array(member, np.frombuffer(raw.encode(), dtype=np.uint8))
    try:
        tonumpy.load(path)
    except tonumpy.TonumpyError as exc:
        assert "\n" not in str(exc)


def test_npz_to_npz_streams_members_and_keeps_what_they_were(tmp_path: Path) -> None:
    """Members are copied as they are read: values exact, bit-exact ones widened on request."""
    tree = {"w": torch.randn(3, 5).to(torch.bfloat16), "i": np.arange(4), "f": np.ones((2, 3)).T}
    tonumpy.save(tmp_path / "a.npz", tree, ml_dtypes=True)
    tio.convert(tmp_path / "a.npz", tmp_path / "wide.npz")
    tio.convert(tmp_path / "a.npz", tmp_path / "exact.npz", ml_dtypes=True)
    wide = tonumpy.load(tmp_path / "wide.npz")
    np.testing.assert_array_equal(wide["w"], tree["w"].float().numpy())
    np.testing.assert_array_equal(wide["i"], np.arange(4))
    np.testing.assert_array_equal(wide["f"], np.ones((3, 2)))
    assert tio.read(tmp_path / "wide.npz").sources[("w",)] == {"dtype": "bfloat16"}
    exact = tonumpy.load(tmp_path / "exact.npz", ml_dtypes=True)
    assert exact["w"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(
        exact["w"].view(np.uint16), tree["w"].view(torch.int16).numpy().view(np.uint16)
    )


def test_file_errors_are_exported_from_tonumpy_and_still_from_io() -> None:
    """FileFormatError and UnsafeFileError live in tonumpy.errors, beside the others."""
    from tonumpy import errors

    for name in ("FileFormatError", "UnsafeFileError"):
        error = getattr(tonumpy, name)
        assert name in tonumpy.__all__
        assert error is getattr(errors, name) is getattr(tio, name)
        assert issubclass(error, tonumpy.TonumpyError)
        assert issubclass(error, ValueError)
    assert tonumpy.__all__ == sorted(tonumpy.__all__)
