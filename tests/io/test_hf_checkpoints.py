"""Hugging Face checkpoint directories (``save_pretrained``) read as one tree; safetensors
metadata kept. Real tiny models, built from a config (nothing downloaded)."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import tonumpy
from _helpers.models import tiny_bert
from tonumpy import cli
from tonumpy import io as tio

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")
safetensors = pytest.importorskip("safetensors")


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(list(argv), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_bert(transformers.BertModel).eval()


@pytest.fixture(scope="module")
def sharded(model: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("hf") / "bert"
    model.save_pretrained(folder, max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").exists()
    assert len(list(folder.glob("model-*-of-*.safetensors"))) > 2
    return folder


def saved(folder: Path) -> dict[str, torch.Tensor]:
    """What the shards hold, read by the safetensors package itself."""
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(safetensors_torch.load_file(str(shard)))
    return out


def test_sharded_checkpoint_is_one_tree(sharded: Path) -> None:
    """load, show and convert read the shards joined through the index, in its order."""
    expected = saved(sharded)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    tree = tonumpy.load(sharded)
    assert list(tree) == list(index["weight_map"])
    assert set(tree) == set(expected)
    for name, tensor in expected.items():
        np.testing.assert_array_equal(tree[name], tensor.numpy())
    code, out, err = run("show", str(sharded))
    assert code == 0, err
    assert out.splitlines()[0].startswith(f"{sharded}: hugging face checkpoint")
    assert f"{len(expected)} arrays" in out.splitlines()[-1]
    dst = sharded.parent / "bert.npz"
    code, _, err = run("convert", str(sharded), str(dst))
    assert code == 0, err
    back = tonumpy.load(dst)
    assert list(back) == list(tree)
    np.testing.assert_array_equal(
        back["embeddings.word_embeddings.weight"], tree["embeddings.word_embeddings.weight"]
    )


def test_single_file_checkpoint(model: torch.nn.Module, tmp_path: Path) -> None:
    """A save_pretrained folder with one model.safetensors reads as a checkpoint, metadata kept."""
    model.save_pretrained(tmp_path / "bert")
    assert sorted(os.listdir(tmp_path / "bert")) == ["config.json", "model.safetensors"]
    contents = tio.read(tmp_path / "bert")
    assert contents.format == "hugging face checkpoint"
    assert set(contents.tree) == set(saved(tmp_path / "bert"))
    assert contents.metadata == {"format": "pt"}


def test_checkpoint_to_safetensors_keeps_metadata(sharded: Path) -> None:
    """The shards' __metadata__ ({"format": "pt"}) survives into the joined file."""
    dst = sharded.parent / "joined.safetensors"
    tio.convert(sharded, dst, overwrite=True)
    with safetensors.safe_open(str(dst), framework="pt") as f:
        assert f.metadata()["format"] == "pt"
        assert set(f.keys()) == set(saved(sharded))
    # and transformers loads the joined file as a checkpoint of the same model
    model = transformers.BertModel.from_pretrained(sharded)
    state = safetensors_torch.load_file(str(dst))
    for name, tensor in model.state_dict().items():
        if name in state:
            torch.testing.assert_close(state[name], tensor)


def test_safetensors_to_safetensors_keeps_metadata(tmp_path: Path) -> None:
    """Converting .safetensors to .safetensors keeps the source's own metadata."""
    src = tmp_path / "in.safetensors"
    safetensors_torch.save_file(
        {"w": torch.ones(2, dtype=torch.bfloat16)}, str(src), metadata={"format": "pt", "by": "me"}
    )
    dst = tmp_path / "out.safetensors"
    assert run("convert", str(src), str(dst))[0] == 0
    with safetensors.safe_open(str(dst), framework="pt") as f:
        metadata = f.metadata()
        torch.testing.assert_close(f.get_tensor("w"), torch.ones(2, dtype=torch.bfloat16))
    assert metadata["format"] == "pt"
    assert metadata["by"] == "me"
    assert tio.read(dst).metadata == {"format": "pt", "by": "me"}


def test_bin_shards_with_their_index(model: torch.nn.Module, tmp_path: Path) -> None:
    """The older save_pretrained format: pytorch_model-0000x-of-0000y.bin and an index."""
    folder = tmp_path / "bert-bin"
    folder.mkdir()
    state = model.state_dict()
    names = list(state)
    halves = [names[: len(names) // 2], names[len(names) // 2 :]]
    weight_map = {}
    for i, part in enumerate(halves, 1):
        shard = f"pytorch_model-0000{i}-of-00002.bin"
        torch.save({n: state[n] for n in part}, folder / shard)
        weight_map.update(dict.fromkeys(part, shard))
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    tree = tonumpy.load(folder)
    assert list(tree) == names
    np.testing.assert_array_equal(tree[names[-1]], state[names[-1]].numpy())


def test_index_and_shards_must_agree(sharded: Path, tmp_path: Path) -> None:
    """A sharded checkpoint whose index names a shard that is not there is refused."""
    broken = tmp_path / "broken"
    broken.mkdir()
    for entry in sharded.iterdir():
        (broken / entry.name).write_bytes(entry.read_bytes())
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "model-00099-of-00099.safetensors"
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="model-00099-of-00099"):
        tio.read(broken)
    del index["weight_map"][first]
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(tio.FileFormatError, match="does not list"):
        tio.read(broken)


def test_a_linked_shard_is_refused(sharded: Path, tmp_path: Path) -> None:
    """A shard that is a symbolic link (it may lead anywhere) is refused, as in .npy folders."""
    linked = tmp_path / "linked"
    linked.mkdir()
    for entry in sharded.iterdir():
        if entry.name.startswith("model-00001"):
            os.symlink(entry, linked / entry.name)
        else:
            (linked / entry.name).write_bytes(entry.read_bytes())
    code, _, err = run("show", str(linked))
    assert code == 2
    assert "symbolic link" in err
