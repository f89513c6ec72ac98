"""Errors a user can act on (exit 2, one line, the user's own paths), sizes shown as they are,
statistics in bounded memory."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import tonumpy
from _helpers import hostile as _hostile
from tonumpy import cli
from tonumpy import io as tio


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(list(argv), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def command(*argv: str) -> subprocess.CompletedProcess[str]:
    """``python -m tonumpy ARGV`` in a new process (its own stderr, warnings included)."""
    return subprocess.run(
        [sys.executable, "-m", "tonumpy", *argv], capture_output=True, text=True, check=False
    )


def one_error(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("tonumpy: error: ")
    return lines[0]


def test_complex128_to_safetensors_says_which_formats_keep_it(tmp_path: Path) -> None:
    """complex128 to .safetensors is refused naming the leaf, the dtype and .npz as the way."""
    src = tmp_path / "c.pt"
    torch.save({"spectrum": torch.ones(2, dtype=torch.complex128), "w": torch.ones(2)}, src)
    code, _, err = run("convert", str(src), str(tmp_path / "c.safetensors"))
    line = one_error(err)
    assert code == 2
    assert "spectrum" in line
    assert "complex128" in line
    assert ".npz" in line
    assert "unexpected" not in line
    assert not (tmp_path / "c.safetensors").exists()
    assert run("convert", str(src), str(tmp_path / "c.npz"))[0] == 0  # which does keep it
    assert tonumpy.load(tmp_path / "c.npz")["spectrum"].dtype == np.complex128


@pytest.mark.parametrize("name", ["random.npz", "random.npy"])
def test_random_bytes_get_no_pickle_advice(tmp_path: Path, name: str) -> None:
    """A file of random bytes is reported as not a known format, with no advice about pickles."""
    path = tmp_path / name
    path.write_bytes(np.random.default_rng(0).bytes(1000))
    code, _, err = run("show", str(path))
    line = one_error(err)
    assert code == 2
    assert "pickle" not in line
    assert f"{path}: not a .np" in line


def test_huge_declared_npy_shape_prints_no_numpy_warnings(tmp_path: Path) -> None:
    """A .npy declaring an absurd shape gives one error line and no NumPy warning on stderr."""
    path = tmp_path / "huge.npy"
    path.write_bytes(_hostile._npy_header((10**12, 10**12)) + bytes(8))
    result = subprocess.run(
        [sys.executable, "-m", "tonumpy", "show", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    line = one_error(result.stderr)
    assert "declares" in line
    assert "Warning" not in result.stderr


def test_bad_structure_in_safetensors_names_the_file(tmp_path: Path) -> None:
    """A .safetensors with malformed tonumpy structure metadata is refused naming the file."""
    path = tmp_path / "bad.safetensors"
    header = {
        "__metadata__": {"__tonumpy__": "{not json"},
        "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
    }
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + bytes(4))
    code, _, err = run("show", str(path))
    assert code == 2
    assert one_error(err).startswith(f"tonumpy: error: {path}: the structure is not valid JSON")


def test_meta_tensor_advice_fits_a_file(tmp_path: Path) -> None:
    """A meta tensor in a file is reported at its key path with file advice, not to_empty()."""
    src = tmp_path / "empty_model.pt"
    torch.save({"weight": torch.empty(4, 4, device="meta")}, src)
    code, _, err = run("convert", str(src), str(tmp_path / "out.npz"))
    line = one_error(err)
    assert code == 2
    assert "to_empty" not in line
    assert f"{src}: tree['weight'] is a meta tensor" in line
    with pytest.raises(tio.FileFormatError, match="no values"):
        tonumpy.load(src)
    code, out, _ = run("show", str(src))  # showing it is fine: it has a shape and a dtype
    assert code == 0
    assert "meta: no data" in out


@pytest.mark.parametrize(
    ("dst", "message"),
    [
        ("out.npz.", "did you mean"),
        (".npz", "only a suffix"),
        ("-", "standard output"),
    ],
)
def test_odd_destination_names_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dst: str, message: str
) -> None:
    """Never silently a directory named `out.npz.`, `.npz` or `-`."""
    src = tmp_path / "src.pt"
    torch.save({"a": torch.ones(1)}, src)
    monkeypatch.chdir(tmp_path)
    code, _, err = run("convert", str(src), dst)
    assert code == 2
    assert message in one_error(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.pt"]


STARTUP = textwrap.dedent(
    """
    import sys
    sys.argv[0] = "/usr/local/bin/tonumpy"  # what the console script runs as
    class Interrupt:  # Ctrl-C while torch is being imported
        def find_spec(self, name, path=None, target=None):
            if name == "torch":
                raise KeyboardInterrupt
    sys.meta_path.insert(0, Interrupt())
    from tonumpy.cli import main
    sys.exit(main())
    """
)


def test_ctrl_c_during_start_up_is_one_line() -> None:
    """Ctrl-C while the command imports torch prints one line, no traceback, status interrupted."""
    result = subprocess.run(
        [sys.executable, "-c", STARTUP, "show", "x.pt"], capture_output=True, text=True, check=False
    )
    assert result.stderr == "tonumpy: interrupted\n"
    assert result.returncode in (130, -2)  # Python re-raises SIGINT on itself


def test_ctrl_c_hook_is_only_for_the_command() -> None:
    """A program that imports tonumpy keeps its own traceback for KeyboardInterrupt."""
    code = "import sys, tonumpy; print(sys.excepthook is sys.__excepthook__)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.stdout.strip() == "True"


def test_library_warnings_never_reach_the_terminal(tmp_path: Path) -> None:
    """torch's deprecation and beta notices (quantized tensors, legacy storages, CSR)."""
    src = tmp_path / "odd.pt"
    with warnings.catch_warnings():  # torch warns (once per process) as these are made
        warnings.simplefilter("ignore")
        tree = {
            "q": torch.quantize_per_tensor(torch.ones(4), 0.5, 0, torch.qint8),
            "csr": torch.eye(3).to_sparse_csr(),
        }
    torch.save(tree, src)
    for argv in (["show", "--stats", str(src)], ["convert", str(src), str(tmp_path / "o.npz")]):
        result = command(*argv)
        assert result.returncode == 0, result.stderr
        assert "Warning" not in result.stderr
        assert result.stderr == ""


def test_sparse_leaves_show_their_real_size(tmp_path: Path) -> None:
    """show gives a sparse tensor's dense shape and its real stored size, not the dense bytes."""
    src = tmp_path / "sparse.pt"
    indices = torch.tensor([[0, 1, 2], [2, 0, 1]])
    torch.save(
        {"adj": torch.sparse_coo_tensor(indices, torch.ones(3), (100, 100), check_invariants=True)},
        src,
    )
    code, out, _ = run("show", str(src))
    assert code == 0
    row = next(line for line in out.splitlines() if line.strip().startswith("adj"))
    stored = indices.numel() * 8 + 3 * 4
    assert f" {stored} B" in row
    assert "sparse_coo, dense 39.1 KiB" in row
    assert out.splitlines()[-1].endswith(f"{stored} B")


def test_stats_of_bfloat16_are_chunked(tmp_path: Path) -> None:
    """128 MiB of bfloat16: a float32 copy would add 256 MiB; chunks add a few MiB."""
    path = tmp_path / "bf16.pt"
    torch.save({"w": torch.ones(1 << 26, dtype=torch.bfloat16)}, path)
    (stats,) = _hostile.run_corpus([["show", "--stats", str(path)]], tmp_path / "run")
    assert stats["rc"] == 0, stats
    row = next(line for line in stats["stdout"].splitlines() if line.strip().startswith("w"))
    assert row.split()[-5:] == ["1", "1", "1", "0", "0"]
    # the mapped file itself becomes resident as it is read (128 MiB): nothing else may grow
    assert stats["grew_mib"] < 128 + 64, stats
