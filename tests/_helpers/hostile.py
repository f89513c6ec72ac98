"""Hostile files, built in a folder, and a runner that feeds each to the CLI in its own process.

:func:`build` writes the corpus: FIFOs and devices where files are expected, symbolic links out
of directories, zip bombs, pickles that abuse the weights-only allow-list, lying headers, CRC
damage, terminal escapes. :func:`run_corpus` starts ONE Python process that imports tonumpy (and
torch) once, then forks a child per case: the child sets ``RLIMIT_AS`` to what the parent uses
plus :data:`HEADROOM` and runs ``tonumpy.cli.main``; the parent kills it after a timeout and
reports its exit status, output, time and peak resident memory (``wait4``'s ``ru_maxrss``) above
the parent's own. A regression therefore fails a test instead of taking the machine down.
"""

from __future__ import annotations

import io
import json
import os
import pickletools
import struct
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

HEADROOM = 1 << 30  # bytes of address space a case may add to the parent's
TIMEOUT = 60.0  # seconds before a case is killed (hangs; every case takes well under one)

RUNNER = r"""
import json, os, resource, sys, time
import tonumpy, tonumpy.cli
cases, headroom = json.loads(sys.argv[1]), int(sys.argv[2])
timeout, folder = float(sys.argv[3]), sys.argv[4]

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

def child(argv):
    limit = status("VmSize") + headroom
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    out = open(os.path.join(folder, "out.txt"), "w")
    err = open(os.path.join(folder, "err.txt"), "w")
    os.dup2(err.fileno(), 2)
    if argv[0] == "load":  # the library: one line on failure, as the CLI prints it
        try:
            tonumpy.load(argv[1])
            return 0
        except (tonumpy.TonumpyError, OSError) as exc:
            err.write(f"tonumpy: error: {exc}\n")
            return 2
    try:
        return tonumpy.cli.main(argv, stdout=out, stderr=err)
    finally:
        out.close()
        err.close()

results = []
for argv in cases:
    base = status("VmRSS")
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            code = child(argv)
        finally:
            os._exit(code)
    killed = False
    while True:
        done, code, usage = os.wait4(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() - start > timeout:
            os.kill(pid, 9)
            _, code, usage = os.wait4(pid, 0)
            killed = True
            break
        time.sleep(0.005)
    read = lambda name: open(os.path.join(folder, name), errors="replace").read()
    results.append({
        "argv": argv, "rc": os.waitstatus_to_exitcode(code), "killed": killed,
        "seconds": round(time.monotonic() - start, 2),
        "grew_mib": round((usage.ru_maxrss * 1024 - base) / 2**20, 1),
        "stdout": read("out.txt")[:4000], "stderr": read("err.txt")[:4000],
    })
print(json.dumps(results))
"""


def run_corpus(cases: list[list[str]], folder: Path, *, env: dict[str, str] | None = None) -> Any:
    """Run each case (CLI arguments, or ``["load", path]``) in a forked, limited child."""
    folder.mkdir(exist_ok=True)
    result = subprocess.run(
        [sys.executable, "-c", RUNNER, json.dumps(cases), str(HEADROOM), str(TIMEOUT), str(folder)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=TIMEOUT * (len(cases) + 2),
    )
    return json.loads(result.stdout)


# --------------------------------------------------------------------------- pickles


def _global(module: str, name: str) -> bytes:
    return f"c{module}\n{name}\n".encode()


def _long(n: int) -> bytes:
    raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def _text(s: str) -> bytes:
    raw = s.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def _ints(*values: int) -> bytes:
    return b"(" + b"".join(_long(v) for v in values) + b"t"


def _pt(path: Path, body: bytes) -> Path:
    """A zip torch.save file whose data.pkl is replaced by ``body`` (one 4-byte storage)."""
    buffer = io.BytesIO()
    torch.save({"a": torch.ones(1)}, buffer)
    buffer.seek(0)
    with zipfile.ZipFile(buffer) as zin, zipfile.ZipFile(path, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            zout.writestr(
                info, b"\x80\x02" + body + b"." if info.filename.endswith("data.pkl") else data
            )
    return path


def _storage(kind: str, key: str, numel: int) -> bytes:
    """A persistent id: storage ``key`` of ``numel`` items, as torch.save writes it."""
    return (
        b"("
        + _text("storage")
        + _global("torch", kind)
        + _text(key)
        + _text("cpu")
        + _long(numel)
        + b"tQ"
    )


def _tensor(storage: bytes, size: tuple[int, ...], stride: tuple[int, ...]) -> bytes:
    hooks = _global("collections", "OrderedDict") + b")R"
    return (
        _global("torch._utils", "_rebuild_tensor_v2")
        + b"("
        + storage
        + _long(0)
        + _ints(*size)
        + _ints(*stride)
        + b"\x89"
        + hooks
        + b"tR"
    )


def _qtensor(storage: bytes, numel: int, qparams: bytes) -> bytes:
    """A 1-d quantized tensor of ``numel`` items over ``storage``."""
    hooks = _global("collections", "OrderedDict") + b")R"
    return (
        _global("torch._utils", "_rebuild_qtensor")
        + b"("
        + storage
        + _long(0)
        + _ints(numel)
        + _ints(1)
        + qparams
        + b"\x89"
        + hooks
        + b"tR"
    )


def _billion_laughs(levels: int) -> bytes:
    body = b"]" + _text("x" * 64) + b"aq\x00"
    for level in range(1, levels + 1):
        previous = bytes([level - 1])
        body += b"]h" + previous + b"ah" + previous + b"aq" + bytes([level])
    return body


def _legacy_with_numel(path: Path, numel: int) -> Path:
    """A legacy-format torch.save file whose one storage declares ``numel`` items."""
    buffer = io.BytesIO()
    torch.save({"a": torch.ones(1)}, buffer, _use_new_zipfile_serialization=False)
    raw = buffer.getvalue()
    stream, starts = io.BytesIO(raw), []
    for _ in range(4):  # magic, protocol, system info, then the data pickle
        starts.append(stream.tell())
        for _op, _arg, _pos in pickletools.genops(stream):
            pass
    main = raw[starts[3] : stream.tell()]
    at = main.index(b"K\x01N", main.index(_text("cpu")))  # numel 1, then no view
    patched = main[:at] + b"J" + struct.pack("<i", numel) + main[at + 2 :]
    path.write_bytes(raw[: starts[3]] + patched + raw[stream.tell() :])
    return path


def _flip(path: Path, marker: bytes, offset: int) -> Path:
    raw = bytearray(path.read_bytes())
    raw[raw.index(marker) + offset] ^= 0xFF
    path.write_bytes(bytes(raw))
    return path


# ------------------------------------------------------------------------------ zips


def _deflated_zeros(path: Path, name: str, nbytes: int) -> Path:
    """A .npz whose one member is ``nbytes`` of zeros, deflated (about 1000:1)."""
    with (
        zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf,
        zf.open(name, "w", force_zip64=True) as member,
    ):
        header = np.lib.format.header_data_from_array_1_0(np.zeros(1, np.uint8))
        header["shape"] = (nbytes,)
        np.lib.format.write_array_header_1_0(member, header)
        chunk = bytes(16 << 20)
        for _ in range(nbytes // len(chunk)):
            member.write(chunk)
    return path


def _overlapping(path: Path, copies: int) -> Path:
    """A zip bomb of the overlapping kind: many central entries for one deflated member."""
    single = _deflated_zeros(path.with_suffix(".one"), "a.npy", 16 << 20).read_bytes()
    end = single.rindex(b"PK\x05\x06")
    central_at = struct.unpack("<I", single[end + 16 : end + 20])[0]
    entry = single[central_at:end]
    name_len = struct.unpack("<H", entry[28:30])[0]
    entries = b""
    for i in range(copies):
        name = f"m{i:04d}.npy".encode()
        entries += (
            entry[:28] + struct.pack("<H", len(name)) + entry[30:46] + name + entry[46 + name_len :]
        )
    record = bytearray(single[end:])
    struct.pack_into("<HHII", record, 8, copies, copies, len(entries), central_at)
    path.write_bytes(single[:central_at] + entries + bytes(record))
    return path


def _claims(path: Path, declared: int) -> Path:
    """A .npz whose member's central entry claims ``declared`` bytes (its data is tiny)."""
    np.savez_compressed(path, a=np.zeros(1000))
    raw = bytearray(path.read_bytes())
    end = raw.rindex(b"PK\x05\x06")
    central_at = struct.unpack("<I", raw[end + 16 : end + 20])[0]
    struct.pack_into("<I", raw, central_at + 24, declared)  # uncompressed size
    path.write_bytes(bytes(raw))
    return path


def _npz_member(path: Path, name: str, payload: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(name, payload)
    return path


def _npy_header(shape: tuple[int, ...], dtype: str = "<f8") -> bytes:
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        out, {"descr": dtype, "fortran_order": False, "shape": shape}
    )
    return out.getvalue()


def _safetensors(path: Path, header: dict[str, Any], data: bytes) -> Path:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


# ---------------------------------------------------------------------------- corpus


ESCAPE = "\x1b[2J\x1b]0;owned\x07"
Cases = dict[str, tuple[list[str], str]]


def build(folder: Path) -> Cases:
    """Write the corpus; case name -> (CLI arguments, regex the one error line must match)."""
    folder.mkdir(parents=True, exist_ok=True)
    cases: Cases = {}
    for part in (_not_regular, _links, _pickles, _lying, _damaged):
        part(folder, cases)
    return cases


def _not_regular(f: Path, cases: Cases) -> None:
    """FIFOs and devices where a file is expected, also as an export's structure file."""
    for suffix in (".npz", ".pt", ""):
        os.mkfifo(f / f"fifo{suffix}")
        cases[f"fifo{suffix or '-no-suffix'}"] = (["show", str(f / f"fifo{suffix}")], "FIFO")
    cases["fifo-convert"] = (["convert", str(f / "fifo.npz"), str(f / "o1.npz")], "FIFO")
    os.symlink("/dev/zero", f / "zero.pt")
    cases["dev-zero-link"] = (["show", str(f / "zero.pt")], "character device")
    cases["dev-zero"] = (["show", "/dev/zero"], "character device")
    for name in ("fifo-json", "device-json"):
        export = f / name
        export.mkdir()
        np.save(export / "w.npy", np.ones(2))
        if name == "fifo-json":
            os.mkfifo(export / "__tonumpy__.json")
        else:
            os.symlink("/dev/zero", export / "__tonumpy__.json")
        cases[f"export-{name}"] = (["show", str(export)], "FIFO|symbolic link")
        cases[f"export-{name}-load"] = (["load", str(export)], "FIFO|symbolic link")


def _links(f: Path, cases: Cases) -> None:
    """Symbolic links out of a folder of .npy files and out of an export."""
    secret = f / "elsewhere"
    secret.mkdir()
    np.save(secret / "secret.npy", np.arange(3))
    upload = f / "upload"
    upload.mkdir()
    np.save(upload / "ok.npy", np.ones(2))
    os.symlink(secret / "secret.npy", upload / "weights.npy")
    cases["npy-dir-link-out"] = (["show", str(upload)], "symbolic link")
    cases["npy-dir-link-out-convert"] = (
        ["convert", str(upload), str(f / "o2.npz")],
        "symbolic link",
    )
    cases["npy-dir-link-out-load"] = (["load", str(upload)], "symbolic link")
    torch.save({"w": torch.ones(2)}, f / "small.pt")
    export = f / "export-link"
    subprocess.run(  # an export written by tonumpy itself, then one leaf swapped for a link
        [sys.executable, "-m", "tonumpy", "convert", str(f / "small.pt"), str(export)],
        check=True,
        capture_output=True,
    )
    os.unlink(export / "w.npy")
    os.symlink(secret / "secret.npy", export / "w.npy")
    cases["export-link-out-load"] = (["load", str(export)], "symbolic link")


def _call(module: str, name: str, *args: bytes, newobj: bool = False) -> bytes:
    """A pickled call ``module.name(*args)`` (each argument already pickled)."""
    return _global(module, name) + b"(" + b"".join(args) + (b"t\x81" if newobj else b"tR")


def _pickles(f: Path, cases: Cases) -> None:
    """Allow-list abuse: calls that allocate from a size the file does not hold, and more."""
    big = _long(10**9)
    one_d = b"(" + big + b"t"
    hooks = _global("collections", "OrderedDict") + b")R"
    qparams = (
        b"("
        + _global("torch", "per_tensor_affine")
        + b"G"
        + struct.pack(">d", 0.1)
        + _long(0)
        + b"t"
    )
    abuse = {
        "bytes": _call("builtins", "bytes", big),
        "list-range": _call("builtins", "list", _call("builtins", "range", _long(2 * 10**8))),
        "bytearray": _call("builtins", "bytearray", big),
        "FloatTensor": _call("torch", "FloatTensor", big),
        "FloatTensor-Size": _call("torch", "FloatTensor", _call("torch", "Size", one_d)),
        "UntypedStorage": _call("torch.storage", "UntypedStorage", big),
        "Tensor-newobj": _call("torch", "Tensor", big, newobj=True),
        "np-reconstruct": _call(
            "numpy.core.multiarray", "_reconstruct", _global("numpy", "ndarray"), one_d, b"U\x01f"
        ),
        "np-ndarray": _call("numpy", "ndarray", one_d),
        "qtensor": _call(
            "torch._utils",
            "_rebuild_qtensor",
            _storage("QInt8Storage", "0", 4),
            _long(0),
            _ints(10**5, 10**5),
            _ints(0, 0),
            qparams,
            b"\x89",
            hooks,
        ),
        "storage-lies": _tensor(_storage("FloatStorage", "0", 10**9), (10**9,), (1,)),
        # record "0" named twice: its true 4 bytes, then 4 GiB (a quantized tensor is
        # allocated at its full size before its storage is attached)
        "storage-twice": b"("
        + _qtensor(_storage("QInt8Storage", "0", 4), 4, qparams)
        + _qtensor(_storage("QInt8Storage", "0", 2**32), 2**32, qparams)
        + b"t",
        "stride-zero": _tensor(_storage("FloatStorage", "0", 1), (10**6, 10**6), (0, 0)),
        "billion-laughs": _billion_laughs(40),
    }
    for name, body in abuse.items():
        path = _pt(f / f"{name}.pt", body)
        cases[f"pickle-{name}"] = (["show", str(path)], "refused")
    cases["pickle-bytes-load"] = (["load", str(f / "bytes.pt")], "refused")
    cases["pickle-range-convert"] = (
        ["convert", str(f / "list-range.pt"), str(f / "o3.npz")],
        "refused",
    )
    _legacy_with_numel(f / "legacy-lies.pt", 10**9)
    cases["legacy-storage-lies"] = (["show", str(f / "legacy-lies.pt")], "refused")
    sparse = torch.sparse_coo_tensor([[0], [0]], [1.0], (10**6, 10**6), check_invariants=True)
    torch.save({"adjacency": sparse}, f / "sparse.pt")
    cases["sparse-dense-bomb"] = (["convert", str(f / "sparse.pt"), str(f / "o4.npz")], "refused")


def _lying(f: Path, cases: Cases) -> None:
    """Zip bombs, and headers that declare more than the file holds."""
    _overlapping(f / "overlap.npz", 200)
    cases["npz-overlapping-members"] = (["show", str(f / "overlap.npz")], "members '.*' overlap")
    _claims(f / "claims.npz", 2**31)
    cases["npz-member-claims-2GiB"] = (["show", str(f / "claims.npz")], "zip bomb|corrupt")
    _npz_member(f / "member-shape.npz", "a.npy", _npy_header((10**6, 10**6)) + bytes(8))
    cases["npz-member-huge-shape"] = (
        ["convert", str(f / "member-shape.npz"), str(f / "o5.npz")],
        "declares",
    )
    (f / "huge.npy").write_bytes(_npy_header((10**12, 10**12)) + bytes(8))
    cases["npy-huge-shape"] = (["show", str(f / "huge.npy")], "declares")
    (f / "long-header.npy").write_bytes(b"\x93NUMPY\x02\x00" + struct.pack("<I", 2**32 - 1))
    cases["npy-header-claims-4GiB"] = (["show", str(f / "long-header.npy")], "header of")
    _npz_member(f / "member-header.npz", "a.npy", b"\x93NUMPY\x02\x00" + bytes([255] * 4))
    cases["npz-member-header-claims-4GiB"] = (["show", str(f / "member-header.npz")], "header of")
    past_end = {"w": {"dtype": "F32", "shape": [10**9], "data_offsets": [0, 4 * 10**9]}}
    _safetensors(f / "lies.safetensors", past_end, bytes(8))
    cases["safetensors-offsets-past-end"] = (
        ["show", str(f / "lies.safetensors")],
        "outside the file",
    )
    overlapping = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
    }
    _safetensors(f / "overlap.safetensors", overlapping, bytes(12))
    cases["safetensors-overlap"] = (
        ["show", str(f / "overlap.safetensors")],
        "tensors '.*' overlap",
    )
    (f / "header.safetensors").write_bytes(struct.pack("<Q", 2**62) + b"{}")
    cases["safetensors-header-length"] = (["show", str(f / "header.safetensors")], "header")


def _damaged(f: Path, cases: Cases) -> None:
    """CRC damage, and terminal escapes in an error."""
    torch.save({"a": torch.arange(1000.0)}, f / "crc.pt")
    _flip(f / "crc.pt", b"data/0", 100)
    cases["pt-crc-convert"] = (["convert", str(f / "crc.pt"), str(f / "o6.npz")], "CRC")
    cases["pt-crc-stats"] = (["show", "--stats", str(f / "crc.pt")], "CRC")
    cases["pt-crc-load"] = (["load", str(f / "crc.pt")], "CRC")
    np.savez(f / "crc.npz", a=np.arange(1000.0))
    _flip(f / "crc.npz", b"a.npy", 300)
    cases["npz-crc-convert"] = (["convert", str(f / "crc.npz"), str(f / "o7.npz")], "CRC")
    _npz_member(f / "escape.npz", f"{ESCAPE}.npy", b"not an array")
    cases["escape-in-error"] = (["show", str(f / "escape.npz")], r"\\x1b\[2J")
