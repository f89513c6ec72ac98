"""Differential tests: tonumpy against the reference libraries, on seeded generated files.

Three directions, each on trees of every dtype the format has (0-d, empty, non-contiguous and
shared-storage tensors, odd key names, metadata):

* written by the reference (``safetensors.torch.save_file``, ``np.savez``, ``torch.save``), read
  by tonumpy (``read``, ``load``, ``show --stats``, ``convert`` to every format): the same keys,
  dtypes, shapes, bytes and metadata;
* written by tonumpy (``save``, ``convert``), read by the reference (``safe_open``,
  ``np.load(allow_pickle=False)``): the same;
* malformed variants of reference files (one mutation each): tonumpy refuses what the reference
  refuses (for ``.safetensors``: exactly what it refuses), read in a child process whose
  address space is capped at what it had plus a constant, so that nothing is allocated from
  sizes the file declares.

The generators are seeded (:data:`SEED`): a failure names its case and replays.
"""

from __future__ import annotations

import io
import json
import os
import pickletools
import random
import re
import struct
import subprocess
import sys
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import tonumpy
import tonumpy.cli
import tonumpy.io as tio
from _helpers import hostile as _hostile

SEED = 19
TREES = 40  # trees per direction; the mutations come on top

# every dtype .safetensors has that torch and NumPy (with ml_dtypes) can hold
SAFETENSORS_DTYPES = [
    torch.bool,
    torch.int8,
    torch.uint8,
    torch.int16,
    torch.uint16,
    torch.int32,
    torch.uint32,
    torch.int64,
    torch.uint64,
    torch.float16,
    torch.float32,
    torch.float64,
    torch.bfloat16,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.complex64,
]
TORCH_DTYPES = [*SAFETENSORS_DTYPES, torch.complex128]
NUMPY_DTYPES = [
    np.bool_,
    np.int8,
    np.uint8,
    np.int16,
    np.uint16,
    np.int32,
    np.uint32,
    np.int64,
    np.uint64,
    np.float16,
    np.float32,
    np.float64,
    np.complex64,
    np.complex128,
]
NAMES = [
    "layer.0.weight",
    "_orig_mod.layer.weight",
    "dense/kernel:0",
    "a/b/c",
    "x~2",
    "A",
    "a",
    "ünïcødé",
    "日本語.重み",
    "emoji😀",
    "with space",
    ".hidden",
    "a..b",
    "k" * 300,
]
SHAPES: list[tuple[int, ...]] = [(), (0,), (3,), (2, 3), (1, 0, 2), (4, 1), (2, 2, 2)]


# ------------------------------------------------------------------------------ generators


def _rng(offset: int) -> random.Random:
    """The seeded generator of one test."""
    return random.Random(SEED + offset)  # noqa: S311 - reproducible test data, not secrets


def _tensor(rng: random.Random, dtype: torch.dtype) -> torch.Tensor:
    """Random bytes as a ``dtype`` tensor of a random shape (NaNs and all)."""
    shape = rng.choice(SHAPES)
    numel = int(np.prod(shape)) if shape else 1
    if not numel:
        return torch.empty(shape, dtype=dtype)
    raw = np.frombuffer(rng.randbytes(numel * dtype.itemsize), np.uint8).copy()
    if dtype == torch.bool:
        raw &= 1
    return torch.from_numpy(raw).view(dtype).reshape(shape)


def _names(rng: random.Random) -> list[str]:
    return rng.sample(NAMES, rng.randint(1, 6))


def _flat_tree(rng: random.Random, dtypes: list[torch.dtype]) -> dict[str, torch.Tensor]:
    return {name: _tensor(rng, rng.choice(dtypes)) for name in _names(rng)}


def _torch_tree(rng: random.Random, dtypes: list[torch.dtype]) -> dict[str, torch.Tensor]:
    """A state dict with non-contiguous views and storage shared between keys (tied weights)."""
    tree = _flat_tree(rng, dtypes)
    base = _tensor(rng, rng.choice(dtypes)).reshape(-1)
    big = torch.cat([base, base, base]) if base.numel() else base
    extra = {
        "view.strided": big[::2],
        "view.one-strided": big[::2][:1],  # shape (1,), stride (2,)
        "view.transposed": big[: (big.numel() // 2) * 2].reshape(2, -1).t(),
        "tied.decoder": big,
        "tied.embedding": big,
    }
    for name, value in extra.items():
        if rng.random() < 0.5:
            tree[name] = value
    return tree


def _metadata(rng: random.Random) -> dict[str, str]:
    return {rng.choice(["format", "note", "ü", "k.v/w"]): rng.choice(["pt", "", "x" * 40, "日本"])}


def _raw(x: Any) -> bytes:
    """The bytes of a tensor or array, in C order (NaN payloads included)."""
    if isinstance(x, torch.Tensor):
        if not x.numel():
            return b""
        dense = torch.empty(x.shape, dtype=x.dtype).copy_(x)  # fresh strides, even for (1,)
        return dense.reshape(-1).view(torch.uint8).numpy().tobytes()
    return np.ascontiguousarray(x).tobytes()


def _same_bytes(a: Any, b: Any) -> bool:
    return _raw(a) == _raw(b)


# NumPy has no such types: a .npy file holds their bits (np.load sees unsigned integers of
# the same width), the tonumpy structure beside them says what they are
_BITS_ONLY = (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2)


def _check_leaf(got: Any, want: torch.Tensor, where: str, *, npy: bool = False) -> None:
    """``got`` (a tensor or a NumPy array) is ``want``: dtype, shape, bytes."""
    if isinstance(got, torch.Tensor):
        assert got.dtype == want.dtype, where
    elif npy and want.dtype in _BITS_ONLY:
        assert got.dtype == np.dtype(f"u{want.dtype.itemsize}"), where
    else:
        assert got.dtype.name == str(want.dtype).removeprefix("torch."), where
    assert tuple(got.shape) == tuple(want.shape), where
    assert _same_bytes(got, want), where


def _structure(array_names: list[str], text: str) -> dict[str, str]:
    """Source key -> stored member name, from a flat tree's ``__tonumpy__`` structure."""
    doc = json.loads(text)
    tree = doc["tree"]
    return {key: doc["arrays"][node["i"]] for key, node in zip(tree["k"], tree["v"], strict=True)}


# ---------------------------------------------------------------- tonumpy's files, read back


def _check_converted(
    src: Path,
    want: dict[str, torch.Tensor],
    tmp: Path,
    tag: str,
    metadata: dict[str, str] | None = None,
) -> None:
    """``convert`` src to every format (``.pt`` read back by ``torch.load(weights_only=True)``);
    the reference reads each back as ``want`` (and the
    ``.safetensors`` output keeps the source's ``metadata``)."""
    st_out = tmp / f"{tag}.safetensors"
    tio.convert(src, st_out, ml_dtypes=True)
    with safe_open(st_out, "pt") as f:
        kept = f.metadata() or {}
        assert {k: kept.get(k) for k in metadata or {}} == (metadata or {}), (tag, kept)
        assert set(f.keys()) == set(want), f"{tag}: the tensor names of {st_out.name}"
        for key, value in want.items():
            _check_leaf(f.get_tensor(key), value, f"{tag}: {key!r} in .safetensors")
    npz_out = tmp / f"{tag}.npz"
    tio.convert(src, npz_out, ml_dtypes=True)
    with np.load(npz_out, allow_pickle=False) as z:
        members = _structure(z.files, z["__tonumpy__"].tobytes().decode())
        assert set(members) == set(want), tag
        assert len(z.files) == len(set(members.values())) + 1, f"{tag}: unlisted npz members"
        for key, value in want.items():
            _check_leaf(z[members[key]], value, f"{tag}: {key!r} in .npz", npy=True)
    out_dir = tmp / f"{tag}_dir"
    tio.convert(src, out_dir, ml_dtypes=True)
    members = _structure([], (out_dir / "__tonumpy__.json").read_text())
    for key, value in want.items():
        _check_leaf(
            np.load(out_dir / f"{members[key]}.npy", allow_pickle=False),
            value,
            f"{tag}: {key!r} in a directory",
            npy=True,
        )
    pt_out = tmp / f"{tag}.pt"
    tio.convert(src, pt_out, ml_dtypes=True)
    back_pt = torch.load(pt_out, weights_only=True)
    assert set(back_pt) == set(want), f"{tag}: the keys torch.load reads from {pt_out.name}"
    for key, value in want.items():
        _check_leaf(back_pt[key], value, f"{tag}: {key!r} in .pt")
    for out in (st_out, npz_out, out_dir, pt_out):
        back = tonumpy.load(out, ml_dtypes=True)
        assert set(back) == set(want), f"{tag}: tonumpy.load of {out.name}"
        for key, value in want.items():
            _check_leaf(back[key], value, f"{tag}: {key!r} loaded from {out.name}")


def _show_stats(path: Path, want: dict[str, Any]) -> None:
    """``show --stats`` lists every key with its shape and dtype, and counts every array."""
    out, err = io.StringIO(), io.StringIO()
    code = tonumpy.cli.main(["show", "--stats", str(path)], stdout=out, stderr=err)
    assert code == 0, err.getvalue()
    shown = out.getvalue()
    assert re.search(rf"^{len(want)} arrays?, ", shown, re.MULTILINE), shown
    lines = shown.splitlines()
    title = lines[1]
    at = {column: title.index(column) for column in ("type", "shape", "dtype", "device")}
    rows = {
        line[2 : at["type"]].strip(): (
            line[at["shape"] : at["dtype"]].strip(),
            line[at["dtype"] : at["device"]].strip(),
        )
        for line in lines[3:-1]
    }
    for key, value in want.items():
        shape, dtype = rows[key]
        assert shape == str(tuple(value.shape)), (key, shown)
        assert dtype == str(value.dtype).removeprefix("torch."), (key, shown)


def test_safetensors_written_by_the_reference_read_by_tonumpy(tmp_path: Path) -> None:
    """safetensors.torch.save_file -> read/load/show/convert: the same names, bytes, metadata."""
    rng = _rng(0)
    for case in range(TREES):
        want = _flat_tree(rng, SAFETENSORS_DTYPES)
        metadata = _metadata(rng)
        path = tmp_path / f"ref{case}.safetensors"
        save_file(want, path, metadata=metadata)
        contents = tio.read(path)
        assert set(contents.tree) == set(want), case
        assert contents.metadata == metadata, case
        for key, value in want.items():
            _check_leaf(contents.tree[key], value, f"case {case}: {key!r}")
        loaded = tonumpy.load(path, ml_dtypes=True)
        for key, value in want.items():
            _check_leaf(loaded[key], value, f"case {case}: {key!r} (load)")
        _show_stats(path, want)
        if case % 4 == 0:
            _check_converted(path, want, tmp_path, f"st{case}", metadata)


def test_npz_written_by_numpy_read_by_tonumpy(tmp_path: Path) -> None:
    """np.savez -> load/convert: the same member names, dtypes, shapes, bytes."""
    rng = _rng(1)
    for case in range(TREES):
        want = {
            name: _tensor(
                rng, torch.from_numpy(np.empty(0, rng.choice(NUMPY_DTYPES))).dtype
            ).numpy()
            for name in _names(rng)
            if not name.startswith("/")
        }
        path = tmp_path / f"np{case}.npz"
        np.savez(path, **want)
        loaded = tonumpy.load(path)
        assert set(loaded) == set(want), case
        for key, value in want.items():
            _check_leaf(loaded[key], torch.from_numpy(value), f"case {case}: {key!r}")
        _show_stats(path, want)
        if case % 4 == 0:
            safe = {k: torch.from_numpy(v) for k, v in want.items() if v.dtype != np.complex128}
            if len(safe) == len(want):
                _check_converted(path, safe, tmp_path, f"c_np{case}")


def test_torch_save_read_by_tonumpy_and_converted(tmp_path: Path) -> None:
    """torch.save (views, tied weights) -> load/convert: what torch.load(weights_only) gives."""
    rng = _rng(2)
    for case in range(TREES):
        dtypes = SAFETENSORS_DTYPES if case % 2 else TORCH_DTYPES
        tree = _torch_tree(rng, dtypes)
        path = tmp_path / f"t{case}.pt"
        torch.save(tree, path)
        want = torch.load(path, weights_only=True)
        loaded = tonumpy.load(path, ml_dtypes=True)
        assert set(loaded) == set(want), case
        for key, value in want.items():
            _check_leaf(loaded[key], value, f"case {case}: {key!r}")
        _show_stats(path, want)
        if case % 4 == 1:
            _check_converted(path, want, tmp_path, f"pt{case}")


def test_npz_written_by_tonumpy_read_by_numpy(tmp_path: Path) -> None:
    """tonumpy.save -> np.load(allow_pickle=False): every leaf, its bytes, nothing else."""
    rng = _rng(3)
    for case in range(TREES):
        want = _torch_tree(rng, TORCH_DTYPES)
        path = tmp_path / f"s{case}.npz"
        tonumpy.save(path, want, ml_dtypes=True)
        with np.load(path, allow_pickle=False) as z:
            members = _structure(z.files, z["__tonumpy__"].tobytes().decode())
            assert set(members) == set(want), case
            for key, value in want.items():
                _check_leaf(z[members[key]], value, f"case {case}: {key!r}", npy=True)


# ----------------------------------------------------------------------- malformed variants

_RUNNER = r"""
import json, resource, sys
import numpy as np
import torch
import tonumpy

def vm():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))

def out_of_memory(text):  # the allocator failing, whatever error carries it
    return any(words in text for words in ("allocate memory", "DefaultCPUAllocator"))

cases, headroom = json.loads(sys.argv[1]), int(sys.argv[2])
limit = vm() + headroom
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
results = []
for path, reader in cases:
    try:
        if reader == "torch":  # the reference, under the same cap
            tree = torch.load(path, weights_only=True)
            for value in tree.values():
                (value.dequantize() if value.is_quantized else value).clone()
            leaves = []
        else:
            tree = tonumpy.load(path, ml_dtypes=True)
            leaves = tree.values() if isinstance(tree, dict) else [tree]
        for leaf in leaves:
            np.ascontiguousarray(leaf).tobytes()
        results.append(["accepted", ""])
    except MemoryError as exc:
        results.append(["memory", repr(exc)])
    except (tonumpy.TonumpyError, OSError) as exc:
        text = str(exc)
        ok = "\n" not in text and path in text and not out_of_memory(text)
        results.append(["refused" if ok else "badmessage", text])
    except Exception as exc:
        text = f"{type(exc).__name__}: {exc}"
        results.append(["memory" if out_of_memory(text) else "crashed", text])
print(json.dumps(results))
"""
HEADROOM = 256 << 20  # bytes of address space the reading child may add (the files are KBs)


def _verdicts(cases: list[tuple[Path, str]]) -> list[list[str]]:
    """[verdict, message] of each (path, reader) in one memory-capped child process.

    ``reader`` is ``"tonumpy"`` (``tonumpy.load``) or ``"torch"`` (``torch.load`` with
    ``weights_only=True``, the reference, which a malformed pickle may make allocate).
    """
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-c", _RUNNER, json.dumps([[str(p), r] for p, r in cases]), str(HEADROOM)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results: list[list[str]] = json.loads(done.stdout.splitlines()[-1])
    return results


def _split(blob: bytes) -> tuple[dict[str, Any], bytes]:
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def _join(header: bytes, data: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header + data


def _dumps(header: dict[str, Any]) -> bytes:
    return json.dumps(header).encode()


Mutation = Callable[[random.Random, dict[str, Any], bytes], bytes]


def _tensor_key(rng: random.Random, header: dict[str, Any]) -> str:
    return rng.choice(sorted(k for k in header if k != "__metadata__"))


def _offset(rng: random.Random, header: dict[str, Any], data: bytes) -> bytes:
    key = _tensor_key(rng, header)
    header[key]["data_offsets"][rng.randint(0, 1)] += rng.choice([-1, 1, 2, len(data)])
    return _join(_dumps(header), data)


def _swap_offsets(rng: random.Random, header: dict[str, Any], data: bytes) -> bytes:
    key = _tensor_key(rng, header)
    header[key]["data_offsets"].reverse()
    return _join(_dumps(header), data)


def _shape(rng: random.Random, header: dict[str, Any], data: bytes) -> bytes:
    info = header[_tensor_key(rng, header)]
    choice = rng.randint(0, 4)
    if choice == 0:
        info["shape"].append(1)  # the same size: accepted by both
    elif choice == 1 and info["shape"]:
        info["shape"][0] += 1
    elif choice == 2:
        info["shape"].insert(0, 0)
    elif choice == 3:
        info["shape"] = [-1] if rng.random() < 0.5 else [1.0]
    else:
        info["shape"] = [2**64 - 1, 2]
    return _join(_dumps(header), data)


def _dtype(rng: random.Random, header: dict[str, Any], data: bytes) -> bytes:
    info = header[_tensor_key(rng, header)]
    info["dtype"] = rng.choice(
        ["U8", "I8", "F16", "BF16", "I16", "U16", "F32", "I32", "F64", "u8", "F128", "", "BOOL", 7]
    )
    return _join(_dumps(header), data)


def _metadata_value(rng: random.Random, header: dict[str, Any], data: bytes) -> bytes:
    header["__metadata__"] = rng.choice([[], 0, "", None, {"k": 1}, {"k": None}, {}, {"k": "v"}])
    return _join(_dumps(header), data)


def _duplicate(rng: random.Random, header: dict[str, Any], data: bytes) -> bytes:
    key = _tensor_key(rng, header)
    copy = json.loads(json.dumps(header[key]))
    if rng.random() < 0.5:
        copy["data_offsets"] = [x + 1 for x in copy["data_offsets"]]
    text = _dumps(header)
    return _join(b"{" + json.dumps(key).encode() + b":" + _dumps(copy) + b"," + text[1:], data)


def _json_text(rng: random.Random, header: dict[str, Any], data: bytes) -> bytes:
    text = bytearray(_dumps(header))
    at = rng.randrange(len(text))
    choice = rng.randint(0, 5)
    if choice == 0:
        del text[at]
    elif choice == 1:
        text.insert(at, rng.choice(b'{}[],:"\\ 0a'))
    elif choice == 2:
        text += b"\x00" * rng.randint(1, 7)  # padding that is not JSON whitespace
    elif choice == 3:
        text += b" \t\n\r"[: rng.randint(1, 4)]  # padding that is
    elif choice == 4:
        text = bytearray(text.replace(b'"shape"', b'"x": NaN, "shape"', 1))
    else:
        text = bytearray(text.replace(b'"shape"', b'"x": "\\udc00", "shape"', 1))
    return _join(bytes(text), data)


def _header_length(rng: random.Random, header: dict[str, Any], data: bytes) -> bytes:
    text = _dumps(header)
    blob = bytearray(_join(text, data))
    blob[:8] = struct.pack("<Q", len(text) + rng.choice([-1, 1, 2**40, -len(text)]))
    return bytes(blob)


def _data_length(rng: random.Random, header: dict[str, Any], data: bytes) -> bytes:
    if rng.random() < 0.5 or not data:
        return _join(_dumps(header), data + b"\xee" * rng.randint(1, 9))
    return _join(_dumps(header), data[:-1])


def _empty_inside(rng: random.Random, header: dict[str, Any], data: bytes) -> bytes:
    end = max(info["data_offsets"][1] for k, info in header.items() if k != "__metadata__")
    at = rng.randint(0, end)
    header["zz.empty"] = {"dtype": "U8", "shape": [0], "data_offsets": [at, at]}
    return _join(_dumps(header), data)


def _rename(rng: random.Random, header: dict[str, Any], data: bytes) -> bytes:
    key = _tensor_key(rng, header)
    text = _dumps(header).replace(
        json.dumps(key).encode(),
        rng.choice([b'"\\ud800"', b'"\\ud83d\\ude00"', b'"\\u0000"', b'""']),
        1,
    )
    return _join(text, data)


MUTATIONS: list[Mutation] = [
    _offset,
    _swap_offsets,
    _shape,
    _dtype,
    _metadata_value,
    _duplicate,
    _json_text,
    _header_length,
    _data_length,
    _empty_inside,
    _rename,
]


def _reference_accepts(path: Path) -> bool:
    try:
        with safe_open(path, "pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                f.get_tensor(key)
            f.metadata()
    except Exception:  # noqa: BLE001 - any refusal of the reference counts
        return False
    return True


def _malformed_safetensors(folder: Path) -> tuple[list[Path], list[bool]]:
    """Reference-written files with one mutation each, and whether safe_open reads each."""
    rng = _rng(4)
    paths, accepted = [], []
    for case in range(len(MUTATIONS) * 16):
        tree = _flat_tree(rng, [torch.uint8, torch.float32, torch.bfloat16, torch.int64])
        header, data = _split(safetensors.torch.save(tree, metadata=_metadata(rng)))
        mutation = MUTATIONS[case % len(MUTATIONS)]
        path = folder / f"m{case}_{mutation.__name__}.safetensors"
        path.write_bytes(mutation(rng, header, data))
        paths.append(path)
        accepted.append(_reference_accepts(path))
    return paths, accepted


Verdicts = dict[str, tuple[list[Path], list[bool], list[list[str]]]]


@pytest.fixture(scope="module")
def malformed(tmp_path_factory: pytest.TempPathFactory) -> Verdicts:
    """kind -> (files, whether the reference reads each, tonumpy's [verdict, message] on each).

    tonumpy reads all of them in one child process, under one memory cap; so does
    ``torch.load`` the pickles whose numbers were changed (the reference may allocate there).
    """
    folder = tmp_path_factory.mktemp("malformed")
    kinds = {
        "safetensors": _malformed_safetensors(folder),
        "zip": _malformed_zips(folder),
    }
    pickles = _malformed_pickles(folder)
    cases = [(p, "tonumpy") for paths, _ in kinds.values() for p in paths]
    cases += [(p, "tonumpy") for p in pickles] + [(p, "torch") for p in pickles]
    verdicts = _verdicts(cases)
    references = verdicts[-len(pickles) :]
    kinds["pickle"] = (pickles, [verdict == "accepted" for verdict, _ in references])
    out: Verdicts = {}
    for kind, (paths, accepted) in kinds.items():
        out[kind] = (paths, accepted, verdicts[: len(paths)])
        verdicts = verdicts[len(paths) :]
    return out


def test_malformed_safetensors_are_refused_exactly_as_the_reference_does(
    malformed: Verdicts,
) -> None:
    """One mutation each: tonumpy accepts exactly what safe_open accepts, within the memory cap."""
    paths, expected, verdicts = malformed["safetensors"]
    wrong = [
        f"{path.name}: reference {'accepts' if want else 'refuses'}, tonumpy {verdict}: "
        f"{text[:200]}"
        for path, want, (verdict, text) in zip(paths, expected, verdicts, strict=True)
        if verdict != ("accepted" if want else "refused")
    ]
    assert not wrong, "\n".join(wrong)
    assert 0 < sum(expected) < len(expected)  # both kinds were generated


def _zip_mutations(blob: bytes, rng: random.Random, member: str) -> bytes:
    """One damage to a zip: a flipped byte of a member's data or CRC, or a renamed member."""
    data = bytearray(blob)
    zf = zipfile.ZipFile(io.BytesIO(blob))
    info = zf.getinfo(member)
    local = info.header_offset
    name_len, extra_len = struct.unpack("<HH", data[local + 26 : local + 30])
    start = local + 30 + name_len + extra_len
    choice = rng.randint(0, 3)
    if choice == 0 and info.file_size:
        data[start + rng.randrange(info.file_size)] ^= 1 << rng.randrange(8)
    elif choice == 1:
        data[local + 14] ^= 0xFF  # the local header's CRC-32
    elif choice == 2:  # renamed in both headers, to a name of the same length
        old = member.encode()
        new = old[:-1] + (b"x" if not old.endswith(b"x") else b"y")
        data = bytearray(bytes(data).replace(old, new))
    else:
        data = data[: rng.randint(len(data) // 2, len(data) - 1)]
    return bytes(data)


def _numpy_accepts(path: Path) -> bool:
    try:
        with path.open("rb") as f, np.load(f, allow_pickle=False) as z:
            for key in z.files:
                z[key]
    except Exception:  # noqa: BLE001 - any refusal of the reference counts
        return False
    return True


def _torch_accepts(path: Path) -> bool:
    try:
        torch.load(path, weights_only=True)
    except Exception:  # noqa: BLE001 - any refusal of the reference counts
        return False
    return True


def _malformed_zips(folder: Path) -> tuple[list[Path], list[bool]]:
    """.npz and .pt files with one damaged member, and whether the reference reads each."""
    rng = _rng(5)
    paths, accepted = [], []
    for case in range(48):
        tree = _flat_tree(rng, [torch.uint8, torch.float32, torch.int64])
        buffer = io.BytesIO()
        if case % 2:
            np.savez(buffer, **{k.replace("/", "_"): v.numpy() for k, v in tree.items()})
            suffix, accepts = ".npz", _numpy_accepts
        else:
            torch.save(tree, buffer)
            suffix, accepts = ".pt", _torch_accepts
        blob = buffer.getvalue()
        members = [i.filename for i in zipfile.ZipFile(io.BytesIO(blob)).infolist()]
        member = rng.choice([m for m in members if "/data/" in m or suffix == ".npz"] or members)
        path = folder / f"z{case}{suffix}"
        path.write_bytes(_zip_mutations(blob, rng, member))
        paths.append(path)
        accepted.append(accepts(path))
    return paths, accepted


def test_malformed_zips_refused_by_the_reference_are_refused(malformed: Verdicts) -> None:
    """.npz and .pt with one damaged member (CRC, data, name, truncation): refused if the
    reference refuses, within the memory cap."""
    paths, expected, verdicts = malformed["zip"]
    wrong = [
        f"{path.name}: the reference refuses it, tonumpy {verdict}: {text[:200]}"
        for path, want, (verdict, text) in zip(paths, expected, verdicts, strict=True)
        if not want and verdict != "refused"
    ]
    assert not wrong, "\n".join(wrong)
    assert not any(verdict in ("memory", "crashed") for verdict, _ in verdicts), verdicts
    assert not all(expected)


def _with_pickle(blob: bytes, pickled: bytes) -> bytes:
    """A zip ``torch.save`` file with its data.pkl replaced (CRCs and sizes made right)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(blob)) as zin, zipfile.ZipFile(out, "w") as zout:
        for info in zin.infolist():
            is_pickle = info.filename.endswith("/data.pkl")
            zout.writestr(info, pickled if is_pickle else zin.read(info.filename))
    return out.getvalue()


def _mutate_pickle(rng: random.Random, pickled: bytes) -> bytes:
    """One number of the pickle (a size, stride, offset or storage numel) or one storage key
    changed: the file stays a well-formed zip whose checksums match."""
    ops = list(pickletools.genops(pickled))
    spans = [(pos, ops[i + 1][2]) for i, (_, _, pos) in enumerate(ops[:-1])]
    numbers = [
        (i, arg)
        for i, (op, arg, _) in enumerate(ops)
        if op.name in ("BININT", "BININT1", "BININT2", "LONG1")
    ]
    keys = [i for i, (op, arg, _) in enumerate(ops) if op.name == "BINUNICODE" and arg.isdigit()]
    if keys and rng.random() < 0.2:
        index = rng.choice(keys)
        raw = str(int(ops[index][1]) + 1).encode()
        new = b"X" + struct.pack("<I", len(raw)) + raw
    else:
        index, value = rng.choice(numbers)
        value = rng.choice([value + 1, value - 1, 0, -1, 2**31 - 1, 2**32, 2**40, value * 1000])
        raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
        new = b"\x8a" + bytes([len(raw)]) + raw  # LONG1
    begin, end = spans[index]
    return pickled[:begin] + new + pickled[end:]


def _malformed_pickles(folder: Path) -> list[Path]:
    """``torch.save`` files (views, tied weights, quantized tensors) with one number changed."""
    rng = _rng(6)
    paths = []
    for case in range(48):
        tree: dict[str, Any] = _torch_tree(rng, [torch.uint8, torch.float32, torch.int64])
        if case % 3 == 0:
            with warnings.catch_warnings():  # "quantized tensors are deprecated"
                warnings.simplefilter("ignore")
                tree["quantized"] = torch.quantize_per_tensor(torch.ones(3), 0.5, 0, torch.qint8)
        buffer = io.BytesIO()
        torch.save(tree, buffer)
        blob = buffer.getvalue()
        with zipfile.ZipFile(io.BytesIO(blob)) as zf:
            name = next(n for n in zf.namelist() if n.endswith("/data.pkl"))
            pickled = zf.read(name)
        path = folder / f"p{case}.pt"
        path.write_bytes(_with_pickle(blob, _mutate_pickle(rng, pickled)))
        paths.append(path)
    return paths


def test_pickles_the_reference_refuses_are_refused_before_allocating(
    malformed: Verdicts,
) -> None:
    """A size, stride, offset, numel or storage key changed in a .pt's pickle: whatever
    torch.load(weights_only=True) refuses (or runs out of the memory cap on), tonumpy refuses
    in one line, and tonumpy never runs out of memory or crashes on any of them."""
    paths, expected, verdicts = malformed["pickle"]
    wrong = [
        f"{path.name}: tonumpy {verdict}: {text[:200]}"
        for path, want, (verdict, text) in zip(paths, expected, verdicts, strict=True)
        if verdict != "refused" and (not want or verdict != "accepted")
    ]
    assert not wrong, "\n".join(wrong)
    assert 0 < sum(expected) < len(expected)


# ---------------------------------------------------------- the cases of the issue, by name


def _u8(numel: int, begin: int, end: int) -> str:
    return f'{{"dtype":"U8","shape":[{numel}],"data_offsets":[{begin},{end}]}}'


REFUSED_BY_BOTH = {  # name: (header text, data, words the one error line must hold)
    "gap": ('{"a":' + _u8(1, 0, 1) + ',"b":' + _u8(1, 2, 3) + "}", b"\x01\xee\x02", "gap"),
    "first-not-at-0": ('{"a":' + _u8(1, 1, 2) + "}", b"\xee\x01", "gap"),
    "trailing-bytes": ('{"a":' + _u8(1, 0, 1) + "}", b"\x01" + b"\xee" * 16, "after the last"),
    "empty-inside-other": (
        '{"e":' + _u8(0, 1, 1) + ',"b":' + _u8(2, 0, 2) + "}",
        b"\x01\x02",
        "overlap",
    ),
    "duplicate-key": ('{"a":' + _u8(1, 0, 1) + ',"a":' + _u8(1, 1, 2) + "}", b"\x01\x02", "gap"),
    "metadata-list": ('{"__metadata__":[],"a":' + _u8(1, 0, 1) + "}", b"\x01", "__metadata__"),
    "metadata-zero": ('{"__metadata__":0,"a":' + _u8(1, 0, 1) + "}", b"\x01", "__metadata__"),
    "metadata-empty-string": (
        '{"__metadata__":"","a":' + _u8(1, 0, 1) + "}",
        b"\x01",
        "__metadata__",
    ),
    "metadata-twice": (
        '{"__metadata__":{},"__metadata__":{},"a":' + _u8(1, 0, 1) + "}",
        b"\x01",
        "twice",
    ),
    "lone-surrogate-name": ('{"\\ud800":' + _u8(1, 0, 1) + "}", b"\x01", "surrogate"),
    "nan-in-header": (
        '{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"x":NaN}}',
        b"\x01",
        "not JSON",
    ),
    "integer-beyond-a-double": (
        '{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"x":1' + "0" * 309 + "}}",
        b"\x01",
        "out of range",
    ),
    "minus-zero-shape": ('{"a":{"dtype":"U8","shape":[-0],"data_offsets":[0,0]}}', b"", "shape"),
    "nested-128-deep": (
        '{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"x":' + "[" * 126 + "]" * 126 + "}}",
        b"\x01",
        "nested",
    ),
    "shape-overflows": (
        '{"a":{"dtype":"U8","shape":[9223372036854775808,2,0],"data_offsets":[0,0]}}',
        b"",
        "overflows",
    ),
    "nul-padding": ('{"a":' + _u8(1, 0, 1) + "}\x00\x00", b"\x01", "not JSON"),
    "field-twice": (
        '{"a":{"dtype":"U8","dtype":"U8","shape":[1],"data_offsets":[0,1]}}',
        b"\x01",
        "twice",
    ),
}
ACCEPTED_BY_BOTH = {  # what serde reads and Python's json might not: tonumpy takes them too
    "duplicate-key-last-valid": (
        '{"a":{"dtype":"U8","shape":[1],"data_offsets":[7,9]},"a":' + _u8(1, 0, 1) + "}",
        b"\x01",
    ),
    "metadata-null": ('{"__metadata__":null,"a":' + _u8(1, 0, 1) + "}", b"\x01"),
    "description-as-list": ('{"a":["U8",[1],[0,1]]}', b"\x01"),
    "space-padding": ('{"a":' + _u8(1, 0, 1) + "}   \t\n", b"\x01"),
    "nested-127-deep": (
        '{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"x":' + "[" * 125 + "]" * 125 + "}}",
        b"\x01",
    ),
    "unknown-field": ('{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"x":1e300}}', b"\x01"),
    "empty-at-the-end": ('{"a":' + _u8(1, 0, 1) + ',"e":' + _u8(0, 1, 1) + "}", b"\x01"),
}
# Deliberate exceptions (docs/cli.md): safe_open takes these, tonumpy refuses them, saying why
TONUMPY_STRICTER = {
    "packed-float4": ('{"a":{"dtype":"F4","shape":[2],"data_offsets":[0,1]}}', b"\x01", "NumPy"),
    "empty-shape-numpy-cannot-hold": (
        '{"a":{"dtype":"F64","shape":[2305843009213693952,0],"data_offsets":[0,0]}}',
        b"",
        "NumPy cannot hold",
    ),
}


_ONE_FLOAT = _hostile._storage("FloatStorage", "0", 1)
PICKLE_STRICTER = {  # torch.load(weights_only=True) reads these; torch.save never writes them
    "negative-stride": (_hostile._tensor(_ONE_FLOAT, (1,), (-1,)), "bad shape"),
    "record-with-two-sizes": (
        b"("
        + _hostile._tensor(_ONE_FLOAT, (1,), (1,))
        + _hostile._tensor(_hostile._storage("FloatStorage", "0", 2), (1,), (1,))
        + b"t",
        "two sizes",
    ),
}


def _write_cases(folder: Path, cases: dict[str, tuple[Any, ...]]) -> dict[str, Path]:
    folder.mkdir(exist_ok=True)
    paths = {}
    for name, (header, data, *_) in cases.items():
        path = folder / f"{name}.safetensors"
        path.write_bytes(_join(header.encode("utf-8", "surrogatepass"), data))
        paths[name] = path
    return paths


@pytest.fixture(scope="module")
def named(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[Any]]]:
    """name -> (file, results of the CLI's `show` and the library's `load` on it), for the
    refused cases and the deliberate exceptions, each in a forked, memory-capped child."""
    folder = tmp_path_factory.mktemp("named")
    paths = {**_write_cases(folder, REFUSED_BY_BOTH), **_write_cases(folder, TONUMPY_STRICTER)}
    for name, (body, _) in PICKLE_STRICTER.items():
        paths[name] = _hostile._pt(folder / f"{name}.pt", body)
    argv = [[command, str(p)] for p in paths.values() for command in ("show", "load")]
    results = _hostile.run_corpus(argv, folder / "run")
    return {
        name: (path, results[2 * i : 2 * i + 2]) for i, (name, path) in enumerate(paths.items())
    }


def test_files_the_reference_refuses_are_refused_in_one_line(
    named: dict[str, tuple[Path, list[Any]]],
) -> None:
    """Each case of the issue (and more): safe_open refuses, `tonumpy show` exits 2 with one
    line that names the file and the defect; the library refuses it too."""
    for name, (_, _, words) in REFUSED_BY_BOTH.items():
        path, results = named[name]
        assert not _reference_accepts(path), name
        for result in results:
            assert result["rc"] == 2, (name, result)
            lines = result["stderr"].splitlines()
            assert len(lines) == 1, (name, result["stderr"])
            assert str(path) in lines[0], lines[0]
            assert words in lines[0], (name, lines[0])


def test_files_the_reference_accepts_are_read_alike(tmp_path: Path) -> None:
    """The odd forms safe_open reads: tonumpy reads them, to the same tensors and metadata."""
    for name, path in _write_cases(tmp_path, ACCEPTED_BY_BOTH).items():
        with safe_open(path, "pt") as f:
            want = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
            metadata = f.metadata() or {}
        contents = tio.read(path)
        assert contents.metadata == metadata, name
        assert set(contents.tree) == set(want), name
        for key, value in want.items():
            _check_leaf(contents.tree[key], value, f"{name}: {key!r}")


def test_deliberate_exceptions_are_refused_and_say_why(
    named: dict[str, tuple[Path, list[Any]]],
) -> None:
    """Packed 4-bit floats and empty shapes NumPy cannot represent: safe_open reads them,
    tonumpy refuses them with one line naming the file and the reason (docs/cli.md)."""
    for name, (_, _, words) in TONUMPY_STRICTER.items():
        path, results = named[name]
        assert _reference_accepts(path), name
        for result in results:
            assert result["rc"] == 2, (name, result)
            lines = result["stderr"].splitlines()
            assert len(lines) == 1, (name, result["stderr"])
            assert str(path) in lines[0], lines[0]
            assert words in lines[0], (name, lines[0])


def test_pickle_sizes_torch_trusts_are_refused(named: dict[str, tuple[Path, list[Any]]]) -> None:
    """A negative stride, a storage record named with two sizes: torch.load reads them (it
    keeps the first size), tonumpy refuses them in one line before torch runs (docs/cli.md)."""
    for name, (_, words) in PICKLE_STRICTER.items():
        path, results = named[name]
        torch.load(path, weights_only=True)
        for result in results:
            assert result["rc"] == 2, (name, result)
            lines = result["stderr"].splitlines()
            assert len(lines) == 1, (name, result["stderr"])
            assert str(path) in lines[0], lines[0]
            assert words in lines[0], (name, lines[0])
