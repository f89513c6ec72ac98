"""tonumpy.save writes every kind convert writes, chosen by the file's name, read back exactly.

Each file save writes is read back by the reference library of its format
(``safetensors.safe_open``, ``torch.load(weights_only=True)``, ``np.load(allow_pickle=False)``,
``pyarrow``) and by ``tonumpy.load``: identical keys, dtypes, shapes and bytes. Options,
refusals and overwrite rules are those of ``convert``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch
from safetensors import safe_open

import tonumpy
from tonumpy import io as tio
from tonumpy.errors import ConversionError, OptionError

pq = pytest.importorskip("pyarrow.parquet")


class Pair(NamedTuple):
    a: torch.Tensor
    b: int


def _bytes(x: Any) -> bytes:
    if isinstance(x, torch.Tensor):
        return x.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return np.ascontiguousarray(x).tobytes()


def _state() -> dict[str, torch.Tensor]:
    """A state dict of the dtypes .safetensors and .pt hold, bfloat16 and float8 included."""
    g = torch.Generator().manual_seed(0)
    return {
        "_orig_mod.layer.weight": torch.randn(3, 4, generator=g),
        "dense/kernel:0": torch.randn(2, generator=g).to(torch.bfloat16),
        "A": torch.randn(2, 2, generator=g).to(torch.float16),
        "a": torch.arange(5, dtype=torch.int64)[::2],  # a view: only its elements are written
        "f8": torch.randn(3, generator=g).to(torch.float8_e4m3fn),
        "mask": torch.tensor([True, False]),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
    }


def _numpy_state() -> dict[str, torch.Tensor]:
    """The same, of dtypes NumPy has (what .npz, .npy and directories hold as they are)."""
    return {k: v for k, v in _state().items() if k not in ("dense/kernel:0", "f8")}


def _same(got: Any, want: Any, key: str) -> None:
    want_dtype = str(want.dtype).removeprefix("torch.")
    got_dtype = str(got.dtype).removeprefix("torch.")
    assert got_dtype == want_dtype, key
    assert tuple(got.shape) == tuple(want.shape), key
    assert _bytes(got) == _bytes(want), key


def _check_load(path: Path, want: dict[str, Any]) -> None:
    back = tonumpy.load(path, ml_dtypes=True)
    assert list(back) == list(want)
    for key, tensor in want.items():
        if not isinstance(tensor, torch.Tensor):
            assert back[key] == tensor
            continue
        _same(back[key], tonumpy.to_numpy(tensor, ml_dtypes=True), key)


@pytest.mark.parametrize("suffix", [".safetensors", ".SafeTensors"])
def test_safetensors_keeps_keys_dtypes_and_bytes(tmp_path: Path, suffix: str) -> None:
    """A state dict: the very same names, bfloat16/float8 exact whatever ml_dtypes says."""
    want = _state()
    path = tmp_path / f"model{suffix}"
    tonumpy.save(path, want)
    with safe_open(str(path), "pt") as f:
        assert sorted(f.keys()) == sorted(want)
        assert f.metadata()["format"] == "pt"
        for key in want:
            _same(f.get_tensor(key), want[key], key)
    _check_load(path, want)
    # what convert writes from the .npz of the same tree, byte for byte
    tonumpy.save(tmp_path / "tree.npz", want, ml_dtypes=True)
    tio.convert(tmp_path / "tree.npz", tmp_path / "via.safetensors")
    assert path.read_bytes() == (tmp_path / "via.safetensors").read_bytes()


def test_safetensors_state_dict_loads_strictly_into_the_model(tmp_path: Path) -> None:
    """model.load_state_dict(safetensors load_file(...), strict=True) takes what save wrote."""
    from safetensors.torch import load_file

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    tonumpy.save(tmp_path / "model.safetensors", model.state_dict())
    tonumpy.save(tmp_path / "model.pt", model.state_dict())
    for state in (
        load_file(str(tmp_path / "model.safetensors")),
        torch.load(tmp_path / "model.pt", weights_only=True),
    ):
        other = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
        other.load_state_dict(state, strict=True)
        for mine, theirs in zip(model.parameters(), other.parameters(), strict=True):
            assert torch.equal(mine, theirs)


def test_safetensors_writes_each_place_and_refuses_naming_the_path(tmp_path: Path) -> None:
    """Tied weights keep both names; a dtype safetensors lacks is refused, nothing written."""
    t = torch.ones(2)
    path = tmp_path / "tied.safetensors"
    tonumpy.save(path, {"encoder.w": t, "decoder.w": t})
    with safe_open(str(path), "pt") as f:
        assert sorted(f.keys()) == ["decoder.w", "encoder.w"]
    with pytest.raises(ConversionError, match=r"complex128") as info:
        tonumpy.save(
            tmp_path / "bad.safetensors", {"x": {"z": torch.zeros(2, dtype=torch.cdouble)}}
        )
    assert info.value.path == ("x", "z")
    assert not (tmp_path / "bad.safetensors").exists()


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".ckpt"])
def test_torch_file_reads_back_in_torch_load(tmp_path: Path, suffix: str) -> None:
    """Exact names, dtypes, shapes and bytes; a tensor at two places is stored once."""
    want = _state()
    tree = {**want, "tied": want["A"], "step": 7, "names": ["x", None], "shape": (2, 3)}
    path = tmp_path / f"model{suffix}"
    tonumpy.save(path, tree, is_leaf=lambda x: type(x) is tuple)  # a tuple of ints, a value
    back = torch.load(path, weights_only=True)
    assert list(back) == [*want, "tied", "step", "names", "shape"]
    for key in want:
        assert type(back[key]) is torch.Tensor
        _same(back[key], want[key], key)
    assert back["tied"].untyped_storage().data_ptr() == back["A"].untyped_storage().data_ptr()
    assert (back["step"], back["names"], back["shape"]) == (7, ["x", None], (2, 3))
    _check_load(path, {**want, "tied": want["A"], "step": 7, "names": ["x", None], "shape": (2, 3)})


def test_torch_file_of_tensors_anywhere(tmp_path: Path) -> None:
    """Tensors needing grad, Parameters, tensors of other devices: plain CPU tensors."""
    p = torch.nn.Parameter(torch.ones(2))
    tree = {"p": p, "g": (torch.ones(2, requires_grad=True) * 2), "l": [torch.zeros(1)]}
    tonumpy.save(tmp_path / "x.pt", tree)
    back = torch.load(tmp_path / "x.pt", weights_only=True)
    assert type(back["p"]) is torch.Tensor
    assert not back["g"].requires_grad
    assert torch.equal(back["g"], torch.full((2,), 2.0))
    assert isinstance(back["l"], list)


def test_torch_file_refuses_what_weights_only_cannot_read(tmp_path: Path) -> None:
    """The refusals of convert: a class, an array torch has no dtype for; nothing written."""
    with pytest.raises(ConversionError, match=r"x\.pt: out is a .*Pair in the source") as info:
        tonumpy.save(tmp_path / "x.pt", {"out": Pair(torch.ones(1), 2)})
    assert info.value.path == ("out",)
    assert "plain_containers=True" in str(info.value)
    with pytest.raises(ConversionError, match=r"names is an array of dtype <U1") as info:
        tonumpy.save(tmp_path / "x.pt", {"names": np.array(["a", "b"])})
    assert info.value.path == ("names",)
    assert list(tmp_path.iterdir()) == []
    tonumpy.save(tmp_path / "x.pt", {"out": Pair(torch.ones(1), 2)}, plain_containers=True)
    assert torch.load(tmp_path / "x.pt", weights_only=True) == {"out": {"a": torch.ones(1), "b": 2}}


def test_torch_file_of_a_model_output_as_plain_dicts(tmp_path: Path) -> None:
    """A ModelOutput (attribute keys) becomes a dict of plain str keys, as convert writes it."""
    from transformers.modeling_outputs import BaseModelOutput

    out = BaseModelOutput(last_hidden_state=torch.ones(1, 2), hidden_states=(torch.zeros(1),))
    tonumpy.save(tmp_path / "o.npz", out)
    with pytest.raises(ConversionError, match="BaseModelOutput") as info:
        tonumpy.save(tmp_path / "o.pt", out)
    assert info.value.path == ()
    tonumpy.save(tmp_path / "o.pt", out, plain_containers=True)
    back = torch.load(tmp_path / "o.pt", weights_only=True)
    assert list(back) == list(tonumpy.load(tmp_path / "o.npz"))  # the fields the .npz keeps
    assert [type(k) for k in back] == [str, str, str]  # not the walker's key-path entries
    assert torch.equal(back["last_hidden_state"], torch.ones(1, 2))
    assert type(back["hidden_states"]) is tuple


def test_option_refusals_read_well_on_the_command_line(tmp_path: Path) -> None:
    """convert --plain-containers to a .npz: one line naming the flag, nothing written."""
    import io

    from tonumpy import cli

    torch.save({"a": torch.ones(1)}, tmp_path / "x.pt")
    err = io.StringIO()
    code = cli.main(
        ["convert", str(tmp_path / "x.pt"), str(tmp_path / "o.npz"), "--plain-containers"],
        stdout=io.StringIO(),
        stderr=err,
    )
    assert code == 2
    assert "convert(--plain-containers): a .npz file records the class" in err.getvalue()
    assert "plain_containers" not in err.getvalue()
    assert not (tmp_path / "o.npz").exists()


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {name: z[name] for name in z.files if name != "__tonumpy__"}


def _read_dir(path: Path) -> dict[str, np.ndarray]:
    names = json.loads((path / "__tonumpy__.json").read_text())["arrays"]
    return {n: np.load(path / f"{n}.npy", allow_pickle=False) for n in names}


@pytest.mark.parametrize(
    ("name", "reader"),
    [("x.npz", _read_npz), ("x", _read_dir), ("x.d/", _read_dir)],
    ids=["npz", "no-suffix-dir", "slash-dir"],
)
def test_npz_and_directories_read_back_in_numpy(
    tmp_path: Path, name: str, reader: Callable[[Path], dict[str, np.ndarray]]
) -> None:
    """np.load(allow_pickle=False) of each member: the array, exactly; a name without a
    suffix (or ending in /) is a directory of .npy files, as for convert."""
    want = {"layer.weight": torch.randn(3, 4), "a": torch.arange(3), "m": torch.tensor(True)}
    path = tmp_path / name
    tonumpy.save(os.path.join(tmp_path, name), want)
    assert path.is_dir() == (name != "x.npz")
    got = reader(path)
    assert list(got) == list(want)
    for key, tensor in want.items():
        _same(got[key], tensor.numpy(), key)
    _check_load(path, want)


def test_npy_holds_one_array(tmp_path: Path) -> None:
    """A tree that is one array: np.load reads it; a tree of more is refused, nothing written."""
    t = torch.arange(6, dtype=torch.int16).reshape(2, 3)
    tonumpy.save(tmp_path / "x.npy", t)
    _same(np.load(tmp_path / "x.npy", allow_pickle=False), t, "x")
    _same(tonumpy.load(tmp_path / "x.npy"), t, "x")
    with pytest.raises(tonumpy.FileFormatError, match=r"a \.npy file holds one array"):
        tonumpy.save(tmp_path / "y.npy", {"a": t, "b": t})
    assert not (tmp_path / "y.npy").exists()


def test_parquet_reads_back_in_pyarrow(tmp_path: Path) -> None:
    """One row per example: pyarrow's columns hold the rows, exactly."""
    want = {"logits": torch.randn(4, 3), "label": torch.arange(4)}
    tonumpy.save(tmp_path / "p.parquet", want)
    table = pq.read_table(tmp_path / "p.parquet")
    assert table.column_names == ["logits", "label"]
    label = table.column("label").to_numpy()
    _same(label, want["label"], "label")
    logits = np.stack(table.column("logits").to_numpy(zero_copy_only=False))
    _same(logits, want["logits"], "logits")
    _check_load(tmp_path / "p.parquet", want)


@pytest.mark.parametrize("name", ["x.safetensors", "x.pt", "x.bin", "x.npy", "x"])
def test_compress_is_refused_where_nothing_is_compressed(tmp_path: Path, name: str) -> None:
    """compress= applies to .npz and .parquet; elsewhere it is refused, naming the kind."""
    with pytest.raises(OptionError, match=r"save\(compress=True\): a .* uncompressed"):
        tonumpy.save(tmp_path / name, torch.ones(2), compress=True)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["x.npz", "x.safetensors", "x.npy", "x", "x.parquet"])
def test_plain_containers_is_refused_where_classes_are_kept(tmp_path: Path, name: str) -> None:
    """plain_containers= applies to torch.save files only, in save as in convert."""
    with pytest.raises(OptionError, match=r"save\(plain_containers=True\)"):
        tonumpy.save(tmp_path / name, torch.ones(2), plain_containers=True)
    tonumpy.save(tmp_path / "src.npz", torch.ones(2))
    with pytest.raises(OptionError, match=r"convert\(plain_containers=True\)"):
        tio.convert(tmp_path / "src.npz", tmp_path / "dst.npz", plain_containers=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.npz"]


@pytest.mark.parametrize("name", ["x.npz", "x.safetensors", "x.pt", "x.npy", "x.parquet"])
def test_every_kind_follows_the_overwrite_rules(tmp_path: Path, name: str) -> None:
    """overwrite=False refuses (the file untouched); the default replaces it, keeping its mode."""
    path = tmp_path / name
    path.write_bytes(b"precious")
    path.chmod(0o640)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        tonumpy.save(path, torch.ones(2), overwrite=False)
    assert path.read_bytes() == b"precious"
    tonumpy.save(path, torch.ones(2))
    assert path.stat().st_mode & 0o777 == 0o640
    np.testing.assert_array_equal(tonumpy.load(path), np.ones(2, np.float32))
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no temporary file left


def test_a_directory_replaces_only_an_export(tmp_path: Path) -> None:
    """A name without a suffix never replaces a file, nor a directory holding other files."""
    (tmp_path / "file").write_bytes(b"keep")
    with pytest.raises(FileExistsError, match="not a directory"):
        tonumpy.save(tmp_path / "file", {"a": torch.ones(1)})
    assert (tmp_path / "file").read_bytes() == b"keep"
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="more than a tonumpy export"):
        tonumpy.save(home, {"a": torch.ones(1)})
    out = tmp_path / "out"
    tonumpy.save(out, {"a": torch.ones(1)})
    with pytest.raises(FileExistsError, match="overwrite=True"):
        tonumpy.save(out, {"b": torch.ones(1)}, overwrite=False)
    tonumpy.save(out, {"b": torch.ones(1)})
    assert sorted(os.listdir(out)) == ["__tonumpy__.json", "b.npy"]


@pytest.mark.parametrize("name", [".pt", ".safetensors", "x."])
def test_names_convert_refuses_are_refused(tmp_path: Path, name: str) -> None:
    """A name that is only a suffix, or ends in '.', as for convert."""
    with pytest.raises(tonumpy.FileFormatError, match=r"only a suffix|ending in '\.'"):
        tonumpy.save(tmp_path / name, torch.ones(1))
    assert list(tmp_path.iterdir()) == []


def test_ml_dtypes_keeps_bits_in_numpy_kinds(tmp_path: Path) -> None:
    """ml_dtypes=True: the bits in .npz and directories; default: widened to float32."""
    t = torch.tensor([1.5, -2.25], dtype=torch.bfloat16)
    for name in ("x.npz", "d"):
        tonumpy.save(tmp_path / name, {"t": t})
        assert tonumpy.load(tmp_path / name)["t"].dtype == np.float32
        tonumpy.save(tmp_path / name, {"t": t}, ml_dtypes=True)
        back = tonumpy.load(tmp_path / name, ml_dtypes=True)["t"]
        assert back.dtype.name == "bfloat16"
        assert _bytes(back) == _bytes(t)


@pytest.mark.parametrize("name", ["x.pt", "x.safetensors"])
def test_lazy_views_are_written_as_their_values(tmp_path: Path, name: str) -> None:
    """A conjugate or negative view, a transposed tensor: their values, as torch shows them."""
    z = torch.tensor([1 + 2j, 3 - 1j], dtype=torch.complex64)
    tree = {"conj": z.conj(), "neg": z.conj().imag, "t": torch.arange(6.0).reshape(2, 3).T}
    tonumpy.save(tmp_path / name, tree)
    if name.endswith(".pt"):
        back = torch.load(tmp_path / name, weights_only=True)
    else:
        with safe_open(str(tmp_path / name), "pt") as f:
            back = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open's API
    for key, t in tree.items():
        assert torch.equal(back[key], t.resolve_conj().resolve_neg()), key


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["x.pt", "x.safetensors", "x.npz"])
def test_device_tensors_are_written_from_the_cpu(tmp_path: Path, name: str) -> None:
    """Tensors of a GPU: the file holds their values; torch.load gives CPU tensors."""
    tree = {"w": torch.arange(4.0, device="cuda"), "b": torch.ones(2, device="cuda").bfloat16()}
    tonumpy.save(tmp_path / name, tree, ml_dtypes=True)  # bfloat16 bits in the .npz too
    if name.endswith(".pt"):
        back = torch.load(tmp_path / name, weights_only=True)
        assert all(t.device.type == "cpu" for t in back.values())
        for key, t in tree.items():
            assert torch.equal(back[key], t.cpu()), key
    for key, value in tonumpy.load(tmp_path / name, ml_dtypes=True).items():
        assert _bytes(value) == _bytes(tree[key].cpu()), key
