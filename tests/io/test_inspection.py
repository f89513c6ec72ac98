"""Looking inside files through tonumpy.io's public names, and errors that name an option."""

from __future__ import annotations

import os
import pickle
import zipfile
from collections import namedtuple
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch

import tonumpy
from tonumpy import io as tio

Pair = namedtuple("Pair", "a b")


# ------------------------------------------------------------------------- reading lazily


def test_lazy_read_leaves_npz_members_in_the_file(tmp_path: Path) -> None:
    """read(lazy=True) gives .npz members as LazyArray headers whose data reads on demand."""
    path = tmp_path / "a.npz"
    np.savez(path, w=np.arange(6, dtype=np.int32).reshape(2, 3), b=np.ones(2))
    contents = tio.read(path, lazy=True)
    member = contents.tree["w"]
    assert isinstance(member, tio.LazyArray)
    assert (member.shape, member.dtype, member.nbytes, member.bits) == (
        (2, 3),
        np.dtype("int32"),
        24,
        None,
    )
    np.testing.assert_array_equal(member.array(), np.arange(6).reshape(2, 3))
    assert not isinstance(tio.read(path).tree["w"], tio.LazyArray)


def test_lazy_read_of_a_corrupt_member_fails_only_when_the_member_is_read(tmp_path: Path) -> None:
    """lazy=True reads headers only: a damaged member's data is refused when it is read."""
    path = tmp_path / "a.npz"
    np.savez(path, w=np.arange(1000, dtype=np.int64))
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("w.npy")
    raw[info.header_offset + 30 + len("w.npy") + 200] ^= 0xFF  # one byte of the data
    path.write_bytes(bytes(raw))
    with pytest.raises(tonumpy.FileFormatError):
        tio.read(path)
    member = tio.read(path, lazy=True).tree["w"]
    assert member.shape == (1000,)
    with pytest.raises(tonumpy.FileFormatError):
        member.array()


def test_lazy_read_leaves_torch_checksums_to_verify(tmp_path: Path) -> None:
    """read(lazy=True) of a torch.save file verifies no record; Contents.verify does, per leaf."""
    path = tmp_path / "x.pt"
    torch.save({"w": torch.arange(4.0)}, path)
    contents = tio.read(path, lazy=True)
    assert contents.verify is not None
    contents.verify(contents.tree["w"])
    assert contents.tree["w"].tolist() == [0.0, 1.0, 2.0, 3.0]


def test_lazy_takes_exactly_true_or_false(tmp_path: Path) -> None:
    """read(lazy=1) is refused, naming the option, as every flag of the library is."""
    path = tmp_path / "a.npz"
    np.savez(path, w=np.ones(1))
    with pytest.raises(tonumpy.OptionError, match="lazy"):
        tio.read(path, lazy=1)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- walking


def test_walk_lists_nodes_with_the_range_of_their_leaves() -> None:
    """walk gives the leaves and each node's kind, keys and leaf range, parents first."""
    leaves, nodes = tio.walk({"p": Pair(torch.ones(2), None), "n": [1, "x"]})
    by_path = {node.path: node for node in nodes}
    assert nodes[0].path == ()
    pair = by_path[("p",)]
    assert (pair.kind, pair.keys, pair.type) == ("dict", ("a", "b"), Pair)  # stored by field
    assert leaves[pair.first : pair.first + pair.size][0].tolist() == [1.0, 1.0]
    assert by_path[("p", "b")].kind == "none"
    numbers = by_path[("n",)]
    assert leaves[numbers.first : numbers.first + numbers.size] == [1, "x"]
    assert all(isinstance(node, tio.Node) for node in nodes)


def test_walk_keeps_lazy_members_whole(tmp_path: Path) -> None:
    """A LazyArray is a leaf of the walk, never walked into."""
    path = tmp_path / "a.npz"
    np.savez(path, w=np.ones(3))
    leaves, nodes = tio.walk(tio.read(path, lazy=True).tree)
    assert len(leaves) == 1
    assert isinstance(leaves[0], tio.LazyArray)
    assert [node.kind for node in nodes] == ["dict", "leaf"]


# ------------------------------------------------------------------------------ values


@pytest.mark.parametrize("lazy", [False, True])
def test_value_chunks_cover_every_value_in_order(tmp_path: Path, lazy: bool) -> None:
    """value_chunks gives every value, at most `items` at a time, from any kind of leaf."""
    array = np.arange(24, dtype=np.float64).reshape(4, 6).T  # not C-contiguous
    path = tmp_path / "a.npz"
    tonumpy.save(path, {"x": array})
    leaf = tio.read(path, lazy=lazy).tree["x"]
    chunks = list(tio.value_chunks(leaf, 5))
    assert all(chunk.ndim == 1 and chunk.size <= 5 for chunk in chunks)
    order = "F" if lazy and leaf.fortran else "C"  # a member comes in the order of its file
    np.testing.assert_array_equal(np.concatenate(chunks), array.reshape(-1, order=order))
    tensor_chunks = list(tio.value_chunks(torch.from_numpy(array.copy()).T, 7))
    np.testing.assert_array_equal(np.concatenate(tensor_chunks), array.T.reshape(-1))


def test_value_chunks_widen_bfloat16_from_every_kind_of_leaf(tmp_path: Path) -> None:
    """bfloat16 as a tensor, an ml_dtypes array or stored bits comes as float32 values."""
    tensor = torch.tensor([1.5, -2.0, 3.25], dtype=torch.bfloat16)
    path = tmp_path / "bits.npz"
    tonumpy.save(path, {"x": tensor}, ml_dtypes=True)
    stored = tio.read(path, lazy=True).tree["x"]
    assert isinstance(stored, tio.LazyArray)
    assert stored.bits == "bfloat16"
    as_array = np.array([1.5, -2.0, 3.25], dtype=ml_dtypes.bfloat16)
    for leaf in (tensor, as_array, stored):
        (chunk,) = list(tio.value_chunks(leaf, 10))
        assert chunk.dtype == np.float32
        assert chunk.tolist() == [1.5, -2.0, 3.25]


def test_value_chunks_refuse_a_meta_tensor() -> None:
    """A meta tensor has no values: value_chunks raises UnsupportedLeafError."""
    with pytest.raises(tonumpy.UnsupportedLeafError):
        list(tio.value_chunks(torch.empty(3, device="meta")))


def test_nbytes_of_each_kind_of_leaf(tmp_path: Path) -> None:
    """nbytes: data bytes of tensors (sparse: indices and values), arrays, lazy members."""
    path = tmp_path / "a.npz"
    np.savez(path, w=np.ones((2, 5), dtype=np.float32))
    sparse = torch.eye(4).to_sparse()  # 4 values and 2 x 4 int64 indices
    assert tio.nbytes(torch.ones(3, dtype=torch.float64)) == 24
    assert tio.nbytes(sparse) == 4 * 4 + 2 * 4 * 8
    assert tio.nbytes(torch.empty(1000, device="meta")) == 0
    assert tio.nbytes(tio.read(path, lazy=True).tree["w"]) == 40
    assert tio.nbytes(np.int16(3)) == 2
    assert tio.nbytes("not an array") == 0


def test_escape_and_short_make_file_text_safe_for_a_terminal() -> None:
    """escape turns control characters into escapes; short bounds a repr of anything."""
    assert tio.escape("\x1b]0;owned\x07") == "\\x1b]0;owned\\x07"
    assert tio.short(b"x" * 10**7, 20) == "b'xxxxxxxxxxxxxxx..."
    assert tio.short(10**5000) == "<int of 16610 bits>"


# ----------------------------------------------------------------- errors naming an option


def test_an_existing_destination_is_a_destination_exists_error(tmp_path: Path) -> None:
    """overwrite=False on an existing file: DestinationExistsError (a FileExistsError) naming it."""
    dst = tmp_path / "out.npz"
    tonumpy.save(dst, {"x": 1})
    tonumpy.save(tmp_path / "other.npz", {"x": 2})
    for call in (
        lambda: tonumpy.save(dst, {"x": 2}, overwrite=False),
        lambda: tio.convert(tmp_path / "other.npz", dst),
    ):
        with pytest.raises(FileExistsError) as info:
            call()
        error = info.value
        assert isinstance(error, tonumpy.DestinationExistsError)
        assert str(error) == f"{dst} exists; pass overwrite=True to replace it"
        assert error.option == "overwrite"
        assert error.with_option("--force") == f"{dst} exists; pass --force to replace it"


def test_the_option_survives_pickling() -> None:
    """An error naming an option keeps .option and its other spelling across pickle."""
    error = tonumpy.UnsafeFileError.naming("x.pt: refused. ", "unsafe_load", " reads it.")
    back = pickle.loads(pickle.dumps(error))
    assert (type(back), str(back), back.option) == (
        tonumpy.UnsafeFileError,
        "x.pt: refused. unsafe_load=True reads it.",
        "unsafe_load",
    )
    assert back.with_option("--unsafe-load") == "x.pt: refused. --unsafe-load reads it."


def test_errors_without_an_option_name_none() -> None:
    """Most errors name no option: .option is None and with_option gives the message."""
    error = tonumpy.FileFormatError("x.npz: truncated")
    assert error.option is None
    assert error.with_option("--force") == "x.npz: truncated"


def test_refusals_name_the_option_that_lifts_them(tmp_path: Path) -> None:
    """Code in a pickle names unsafe_load; a class container for .pt names plain_containers."""
    evil = tmp_path / "evil.pt"
    torch.save({"f": os.getcwd}, evil)
    with pytest.raises(tonumpy.UnsafeFileError) as unsafe:
        tio.read(evil)
    assert unsafe.value.option == "unsafe_load"
    assert "unsafe_load=True" in str(unsafe.value)
    src = tmp_path / "tree.npz"
    tonumpy.save(src, {"out": Pair(torch.ones(1), torch.zeros(1))})
    with pytest.raises(tonumpy.ConversionError) as plain:
        tio.convert(src, tmp_path / "out.pt")
    assert plain.value.option == "plain_containers"
    assert "pass plain_containers=True to write it as a dict" in str(plain.value)
    with pytest.raises(tonumpy.OptionError) as option:
        tio.convert(src, tmp_path / "out.npz", plain_containers=True)
    assert option.value.option == "plain_containers"
    assert str(option.value).startswith("convert(plain_containers=True): a .npz file records")
