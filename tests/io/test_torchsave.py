"""``convert SRC out.pt``: a file that torch.load(weights_only=True) reads, identically."""

from __future__ import annotations

import collections
import io
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
import safetensors.torch
import torch
import transformers

import tonumpy
from _helpers.models import tiny_bert
from tonumpy import cli
from tonumpy import io as tio
from tonumpy.errors import ConversionError


class Pair(NamedTuple):
    a: torch.Tensor
    b: int


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(list(argv), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def flat(tree: Any, path: tuple[Any, ...] = ()) -> dict[tuple[Any, ...], Any]:
    """Key path -> leaf, containers by their exact type (a dict and an OrderedDict differ)."""
    if type(tree) in (dict, collections.OrderedDict):
        out: dict[tuple[Any, ...], Any] = {path: type(tree)}
        for key, value in tree.items():
            out.update(flat(value, (*path, key)))
        return out
    if type(tree) in (list, tuple):
        out = {path: (type(tree), len(tree))}
        for i, value in enumerate(tree):
            out.update(flat(value, (*path, i)))
        return out
    return {path: tree}


def raw(t: torch.Tensor) -> bytes:
    return t.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()


def assert_same_tensors(got: Any, expected: Any) -> None:
    """Names, container types, shapes, dtypes and bytes: identical."""
    got_flat, expected_flat = flat(got), flat(expected)
    assert list(got_flat) == list(expected_flat)
    for path, want in expected_flat.items():
        have = got_flat[path]
        if isinstance(want, torch.Tensor):
            assert isinstance(have, torch.Tensor), path
            assert have.dtype == want.dtype, path
            assert have.shape == want.shape, path
            assert raw(have) == raw(want), path
        else:
            assert type(have) is type(want), path
            assert have == want, path


def test_npz_to_pt_reads_back_in_torch_load(tmp_path: Path) -> None:
    """Every dtype torch has, bfloat16 and float8 kept exact, plain values, a shared tensor."""
    shared = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    big_endian = np.arange(4, dtype=">f4")
    tree = {
        "bf16": torch.tensor([1.5, -2.25, 3e38], dtype=torch.bfloat16),
        "f8": torch.tensor([0.5, -1.0], dtype=torch.float8_e4m3fn),
        "dtypes": [np.arange(3, dtype=t) for t in ("i1", "u1", "i2", "u2", "i8", "f2", "f8")],
        "flags": np.array([True, False]),
        "complex": np.array([1 + 2j], dtype=np.complex64),
        "big_endian": big_endian,
        "fortran": np.asfortranarray(np.arange(6, dtype=np.int32).reshape(2, 3)),
        "scalar": np.float64(2.5),
        "shared": (shared, shared),
        "values": (None, "text", 3, 2.5, True, b"raw", 1 - 1j),
    }
    src, dst = tmp_path / "src.npz", tmp_path / "out.pt"
    tonumpy.save(src, tree, ml_dtypes=True)
    tio.convert(src, dst)
    got = torch.load(dst, weights_only=True)
    expected = {
        "bf16": tree["bf16"],
        "f8": tree["f8"],
        "dtypes": [torch.from_numpy(a) for a in tree["dtypes"]],
        "flags": torch.tensor([True, False]),
        "complex": torch.tensor([1 + 2j], dtype=torch.complex64),
        "big_endian": torch.arange(4, dtype=torch.float32),
        "fortran": torch.arange(6, dtype=torch.int32).reshape(2, 3),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "shared": (shared, shared),
        "values": tree["values"],
    }
    assert_same_tensors(got, expected)
    assert got["shared"][0].untyped_storage().data_ptr() == (
        got["shared"][1].untyped_storage().data_ptr()
    )  # stored once, as torch.save stores a tensor at two places


def test_checkpoint_and_safetensors_to_pt(tmp_path: Path) -> None:
    """A Hugging Face checkpoint directory and a bfloat16 .safetensors file, back to torch."""
    model = tiny_bert(transformers.BertModel).eval()
    model.save_pretrained(tmp_path / "bert")
    state = model.state_dict()
    assert run("convert", str(tmp_path / "bert"), str(tmp_path / "bert.pt"))[0] == 0
    got = torch.load(tmp_path / "bert.pt", weights_only=True)
    assert set(got) == set(state)
    assert_same_tensors(got, {name: state[name] for name in got})

    tensors = {"w": torch.randn(3, 2).to(torch.bfloat16), "b": torch.zeros(2)}
    safetensors.torch.save_file(tensors, tmp_path / "w.safetensors")
    tio.convert(tmp_path / "w.safetensors", tmp_path / "w.pth")
    reference = safetensors.torch.load_file(tmp_path / "w.safetensors")  # in the file's order
    assert_same_tensors(torch.load(tmp_path / "w.pth", weights_only=True), reference)


def test_torch_file_to_pt_keeps_ordered_dicts(tmp_path: Path) -> None:
    """Converting a torch file to .pt keeps OrderedDicts, loadable with weights_only=True."""
    state = collections.OrderedDict(w=torch.ones(2, 2), b=torch.zeros(2))
    torch.save({"state": state, "step": 4}, tmp_path / "ckpt.pt")
    tio.convert(tmp_path / "ckpt.pt", tmp_path / "copy.pt")
    got = torch.load(tmp_path / "copy.pt", weights_only=True)
    assert_same_tensors(got, {"state": state, "step": 4})


def test_classes_torch_load_cannot_rebuild_are_refused_or_made_plain(tmp_path: Path) -> None:
    """A namedtuple (as a dataclass or ModelOutput) is refused, naming it, unless asked."""
    src, dst = tmp_path / "src.npz", tmp_path / "out.pt"
    tonumpy.save(src, {"out": {"pair": Pair(torch.ones(2), 3)}})
    with pytest.raises(ConversionError, match=r"out\.pair is a .*Pair in the source") as info:
        tio.convert(src, dst)
    assert info.value.path == ("out", "pair")
    assert "plain_containers=True" in str(info.value)
    assert not dst.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src.npz"]  # no temporary left behind
    code, _, err = run("convert", str(src), str(dst))
    assert code == 2
    assert "--plain-containers" in err
    assert err.count("\n") == 1
    code, _, err = run("convert", str(src), str(dst), "--plain-containers")
    assert code == 0, err
    got = torch.load(dst, weights_only=True)
    assert_same_tensors(got, {"out": {"pair": {"a": torch.ones(2), "b": 3}}})


def test_arrays_torch_has_no_dtype_for_are_refused(tmp_path: Path) -> None:
    """Arrays of a dtype torch lacks (strings) are refused for .pt, naming the leaf; no file."""
    src, dst = tmp_path / "src.npz", tmp_path / "out.pt"
    np.savez(src, names=np.array(["a", "b"]), ok=np.ones(2))
    with pytest.raises(ConversionError, match=r"names is an array of dtype <U1") as info:
        tio.convert(src, dst)
    assert info.value.path == ("names",)
    assert not dst.exists()


def test_pt_output_follows_the_overwrite_rules(tmp_path: Path) -> None:
    """As every writer: refused without overwrite (the file untouched), atomic with it."""
    src, dst = tmp_path / "src.npz", tmp_path / "out.pt"
    np.savez(src, w=np.ones(3))
    dst.write_bytes(b"precious")
    dst.chmod(0o640)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        tio.convert(src, dst)
    assert dst.read_bytes() == b"precious"
    code, _, err = run("convert", str(src), str(dst))
    assert code == 2
    assert "--force" in err
    tio.convert(src, dst, overwrite=True)
    assert dst.stat().st_mode & 0o777 == 0o640  # a replaced file keeps its mode, as cp does
    assert_same_tensors(
        torch.load(dst, weights_only=True), {"w": torch.ones(3, dtype=torch.float64)}
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.pt", "src.npz"]
    with pytest.raises(tonumpy.FileFormatError, match="only a suffix"):
        tio.convert(src, tmp_path / ".pt")


@pytest.mark.parametrize("name", ["x.pt", "x.PTH", "x.bin", "x.ckpt"])
def test_save_writes_a_torch_file_under_every_name_read_as_one(tmp_path: Path, name: str) -> None:
    """save to a name tonumpy, torch and HF read as torch.save gives what convert writes there."""
    tree = {"w": torch.ones(2, dtype=torch.bfloat16), "pair": Pair(torch.zeros(1), 3)}
    with pytest.raises(ConversionError, match=r"pair is a .*Pair") as info:
        tonumpy.save(tmp_path / name, tree)  # as convert: a class weights_only cannot rebuild
    assert info.value.path == ("pair",)
    assert list(tmp_path.iterdir()) == []
    tonumpy.save(tmp_path / name, tree, plain_containers=True)
    tonumpy.save(tmp_path / "x.npz", tree, ml_dtypes=True)
    tio.convert(tmp_path / "x.npz", tmp_path / f"via{name}", plain_containers=True)
    got = torch.load(tmp_path / name, weights_only=True)
    assert_same_tensors(got, torch.load(tmp_path / f"via{name}", weights_only=True))
    assert_same_tensors(got, {"w": tree["w"], "pair": {"a": torch.zeros(1), "b": 3}})


@pytest.mark.parametrize("name", ["x.pickle", "x.bak", "x.npz.tmp"])
def test_save_refuses_a_name_of_no_kind_it_writes(tmp_path: Path, name: str) -> None:
    """A suffix no reader knows is refused, as by convert, rather than guessed."""
    with pytest.raises(tonumpy.FileFormatError, match=r"cannot write .* files; the destination"):
        tonumpy.save(tmp_path / name, {"w": torch.ones(2)})
    assert list(tmp_path.iterdir()) == []


def test_numpy_scalars_become_tensors_and_other_objects_are_refused(tmp_path: Path) -> None:
    """A torch file read with unsafe_load may hold NumPy scalars and other objects."""
    src = tmp_path / "src.pt"
    torch.save({"x": np.float64(1.5), "n": np.int32(3), "s": slice(1, 2)}, src)
    with pytest.raises(ConversionError, match=r"out\.pt: s is a slice") as info:
        tio.convert(src, tmp_path / "out.pt", unsafe_load=True)
    assert info.value.path == ("s",)
    torch.save({"x": np.float64(1.5), "n": np.int32(3)}, src)
    tio.convert(src, tmp_path / "out.pt", unsafe_load=True)
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    assert_same_tensors(
        got, {"x": torch.tensor(1.5, dtype=torch.float64), "n": torch.tensor(3, dtype=torch.int32)}
    )


def test_ml_dtypes_arrays_keep_their_dtype(tmp_path: Path) -> None:
    """An ml_dtypes bfloat16/float8 array leaf becomes a tensor of that dtype, bit for bit."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    from tonumpy.io import _torchsave

    values = np.array([1.5, -2.25, 0.0], dtype=np.float32)
    tree = {
        "bf16": values.astype(ml_dtypes.bfloat16),
        "f8": values.astype(ml_dtypes.float8_e4m3fn),
    }
    _torchsave.write(tmp_path / "x.pt", tree, {}, overwrite=False, plain_containers=False)
    got = torch.load(tmp_path / "x.pt", weights_only=True)
    assert_same_tensors(
        got,
        {
            "bf16": torch.from_numpy(values).to(torch.bfloat16),
            "f8": torch.from_numpy(values).to(torch.float8_e4m3fn),
        },
    )
    with pytest.raises(ConversionError, match=r"i4 is an array of dtype int4"):
        _torchsave.write(
            tmp_path / "y.pt",
            {"i4": np.zeros(2, dtype=ml_dtypes.int4)},
            {},
            overwrite=False,
            plain_containers=False,
        )
