"""Writing: nothing left behind on SIGTERM/SIGHUP/Ctrl-C or a full disk, modes as ``cp`` gives
them, and no destination that would destroy the source."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

import tonumpy
from tonumpy import cli
from tonumpy import io as tio


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "src.pt"
    torch.save({f"layer{i}": torch.full((64, 64), float(i)) for i in range(4)}, path)
    return path


# -------------------------------------------------------------------- signals mid-write

# The child converts with the real command line; after the first leaf is written (the
# temporary exists and holds data), it says so and waits: the test then sends the signal.
PAUSING = textwrap.dedent(
    """
    import pathlib, sys, time
    import tonumpy.cli as cli
    ready = pathlib.Path(sys.argv[1])
    real = cli._Bar.__call__
    def pause(self, done, total):
        real(self, done, total)
        if not ready.exists():
            ready.write_text("writing")
            time.sleep(60)
    cli._Bar.__call__ = pause
    sys.exit(cli.main(sys.argv[2:]))
    """
)


@pytest.mark.parametrize("dst", ["out.npz", "outdir", "out.safetensors"])
@pytest.mark.parametrize(
    ("signum", "status"), [(signal.SIGTERM, 143), (signal.SIGHUP, 129), (signal.SIGINT, 130)]
)
def test_signal_mid_write_leaves_nothing(
    tmp_path: Path, source: Path, dst: str, signum: int, status: int
) -> None:
    """A real child killed mid-write: its status says so, and no DST or temporary remains."""
    ready = tmp_path / "ready"
    out = tmp_path / "out"
    out.mkdir()
    child = subprocess.Popen(
        [sys.executable, "-c", PAUSING, str(ready), "convert", str(source), str(out / dst)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not ready.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ready.exists(), child.communicate()
        assert leftovers(out), "no temporary while writing"  # it is mid-write
        child.send_signal(signum)
        _, err = child.communicate(timeout=60)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == status, err
    assert err.count("\n") == 1, err
    assert "Traceback" not in err
    assert not (out / dst).exists()
    assert leftovers(out) == []


def test_signal_handlers_are_restored(source: Path, tmp_path: Path) -> None:
    """main() installs its handlers for its own run only (it is callable as a library)."""
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
    assert cli.main(["convert", str(source), str(tmp_path / "o.npz")]) == 0
    assert {s: signal.getsignal(s) for s in before} == before


# --------------------------------------------------------------------------- disk full

LIMITED = textwrap.dedent(
    """
    import resource, sys
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))  # 1 MiB per file
    import tonumpy.cli
    sys.exit(tonumpy.cli.main(sys.argv[1:]))
    """
)


@pytest.mark.parametrize("dst", ["out.npz", "outdir", "out.safetensors", "out.npy"])
def test_full_disk_names_the_destination(tmp_path: Path, dst: str) -> None:
    """A write past a file size limit: one line naming DST, no errno, no byte counts."""
    src = tmp_path / "big.pt"
    tree = (
        {"a": torch.ones(1 << 19)}
        if dst == "out.npy"
        else {"a": torch.ones(1 << 19), "b": torch.ones(1 << 19)}
    )
    torch.save(tree["a"] if dst == "out.npy" else tree, src)
    out = tmp_path / "out"
    out.mkdir()
    result = subprocess.run(
        [sys.executable, "-c", LIMITED, "convert", str(src), str(out / dst)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"tonumpy: error: {out / dst}: cannot write it:")
    assert "Errno" not in lines[0]
    assert "written" not in lines[0]
    assert ".tmp" not in lines[0]
    assert leftovers(out) == []
    assert not (out / dst).exists()


# --------------------------------------------------------------------------- modes


@pytest.fixture
def umask() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.usefixtures("umask")
def test_new_outputs_get_the_umask_mode(tmp_path: Path, source: Path) -> None:
    """As cp and np.savez: 0644 files and 0755 directories under umask 022, 0600 under 077."""
    tonumpy.save(tmp_path / "a.npz", {"x": np.ones(2)})
    tio.convert(source, tmp_path / "dir")
    tio.convert(source, tmp_path / "b.safetensors")
    np.savez(tmp_path / "numpy.npz", x=np.ones(2))
    assert mode(tmp_path / "a.npz") == mode(tmp_path / "numpy.npz") == 0o644
    assert mode(tmp_path / "b.safetensors") == 0o644
    assert mode(tmp_path / "dir") == 0o755
    assert {mode(p) for p in (tmp_path / "dir").iterdir()} == {0o644}
    os.umask(0o077)
    tonumpy.save(tmp_path / "private.npz", {"x": np.ones(2)})
    assert mode(tmp_path / "private.npz") == 0o600


@pytest.mark.usefixtures("umask")
def test_replaced_outputs_keep_their_mode(tmp_path: Path, source: Path) -> None:
    """--force on a shared 0664 file or a 0750 directory keeps those modes."""
    shared = tmp_path / "shared.npz"
    shared.write_bytes(b"old")
    shared.chmod(0o664)
    assert cli.main(["convert", str(source), str(shared), "--force"]) == 0
    assert mode(shared) == 0o664
    assert list(tonumpy.load(shared)) == ["layer0", "layer1", "layer2", "layer3"]
    folder = tmp_path / "export"
    tio.convert(source, folder)
    folder.chmod(0o750)
    tio.convert(source, folder, overwrite=True)
    assert mode(folder) == 0o750
    assert leftovers(tmp_path) == []


# ------------------------------------------------------------ destinations that destroy


def test_destination_containing_the_source_is_refused(tmp_path: Path) -> None:
    """`convert exp/a.npy exp --force` would delete its own source: refused, source intact."""
    export = tmp_path / "exp"
    export.mkdir()
    np.save(export / "a.npy", np.arange(3))
    code = cli.main(["convert", str(export / "a.npy"), str(export), "--force"])
    assert code == 2
    np.testing.assert_array_equal(np.load(export / "a.npy"), np.arange(3))
    with pytest.raises(tio.FileFormatError, match="contains the source"):
        tio.convert(export / "a.npy", export, overwrite=True)
    with pytest.raises(tio.FileFormatError, match="inside the source"):
        tio.convert(export, export / "inner.npz")
    with pytest.raises(tio.FileFormatError, match="is the source"):
        tio.convert(export / "a.npy", export / "." / "a.npy", overwrite=True)
    assert sorted(p.name for p in export.iterdir()) == ["a.npy"]
