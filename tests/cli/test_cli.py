"""The ``tonumpy`` command line: show, convert, errors, colour, progress, safety."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import tonumpy
from tonumpy import cli
from tonumpy import io as tio

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "model_outputs.pt"


class Terminal(io.StringIO):
    """A text stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def run(
    *argv: str, stdout: io.StringIO | None = None, stderr: io.StringIO | None = None
) -> tuple[int, str, str]:
    out = stdout if stdout is not None else io.StringIO()
    err = stderr if stderr is not None else io.StringIO()
    code = cli.main(list(argv), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "ckpt.pt"
    torch.save(
        {
            "model": {"layer.weight": torch.ones(2, 3), "layer.bias": torch.zeros(2)},
            "logits": torch.tensor([1.0, float("nan"), float("inf"), -2.0]),
            "step": 7,
        },
        path,
    )
    return path


# -------------------------------------------------------------------------------- show


def test_show_example_file() -> None:
    """The shipped example: every leaf with type, shape, dtype, device, bytes; totals."""
    code, out, err = run("show", str(EXAMPLE))
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith(f"{EXAMPLE}: torch")
    assert lines[1].split() == ["key", "type", "shape", "dtype", "device", "bytes"]
    logits = next(line for line in lines if line.strip().startswith("logits"))
    assert logits.split() == ["logits", "Tensor", "(2,", "3)", "bfloat16", "cpu", "12", "B", "grad"]
    assert any("TinyModelOutput" in line for line in lines)
    assert any("attentions" in line and "None" in line for line in lines)
    assert lines[-1].startswith("7 arrays, 147 elements")
    assert "\033[" not in out  # not a terminal: no colour


def test_show_is_coloured_only_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """show colours dtypes on a terminal only, and never when NO_COLOR is set."""
    monkeypatch.delenv("NO_COLOR", raising=False)
    code, out, _ = run("show", str(EXAMPLE), stdout=Terminal())
    assert code == 0
    assert "\033[36mbfloat16" in out
    monkeypatch.setenv("NO_COLOR", "1")
    _, out, _ = run("show", str(EXAMPLE), stdout=Terminal())
    assert "\033[" not in out


def test_show_stats_counts_nan_and_inf(checkpoint: Path) -> None:
    """show --stats gives min/max/mean over finite values and counts NaN and Inf apart."""
    code, out, _ = run("show", str(checkpoint), "--stats")
    assert code == 0
    header = out.splitlines()[1].split()
    assert header[-5:] == ["min", "max", "mean", "nan", "inf"]
    logits = next(line for line in out.splitlines() if line.strip().startswith("logits"))
    # finite values only for min/max/mean: 1 and -2
    assert logits.split()[-5:] == ["-2", "1", "-0.5", "1", "1"]


def test_show_depth_summarises_deeper_levels(checkpoint: Path) -> None:
    """show --depth N folds deeper levels into one row per name; the totals still count all."""
    code, out, _ = run("show", str(checkpoint), "--depth", "1")
    assert code == 0
    assert "layer.weight" not in out
    assert "2 arrays" in out  # what is hidden under "model"
    assert out.splitlines()[-1].startswith("3 arrays")  # totals still count everything
    code, out, _ = run("show", str(checkpoint), "--depth", "0")
    assert code == 0
    rows = [line.split() for line in out.splitlines()[2:-1]]
    assert rows == [["(root)", "dict", "3", "keys", "48", "B"], ["...", "3", "arrays"]]


def test_show_converted_npz_records_what_leaves_were(tmp_path: Path) -> None:
    """show of a converted .npz says what each widened leaf was ("was bfloat16")."""
    dst = tmp_path / "out.npz"
    assert run("convert", str(EXAMPLE), str(dst))[0] == 0
    code, out, _ = run("show", str(dst))
    assert code == 0
    assert "tonumpy npz" in out.splitlines()[0]
    logits = next(line for line in out.splitlines() if line.strip().startswith("logits"))
    assert "float32" in logits
    assert "was bfloat16" in logits
    assert "grad" in logits


def test_show_plain_npy_directory_and_legacy_torch_file(tmp_path: Path) -> None:
    """show reads a plain folder of .npy files (in name order) and a legacy torch.save file."""
    folder = tmp_path / "plain"
    folder.mkdir()
    np.save(folder / "b.npy", np.zeros((2, 2), np.float16))
    np.save(folder / "a.npy", np.arange(3))
    code, out, _ = run("show", str(folder))
    assert code == 0
    assert "npy directory" in out.splitlines()[0]
    assert [line.split()[0] for line in out.splitlines()[3:5]] == ["a", "b"]
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(3)}, legacy, _use_new_zipfile_serialization=False)
    code, out, _ = run("show", str(legacy))
    assert code == 0
    assert out.splitlines()[-1].startswith("1 array, 3 elements, 12 B")


def test_show_npy_directory_and_safetensors(tmp_path: Path, checkpoint: Path) -> None:
    """show reads what convert wrote as a .npy directory and as .safetensors."""
    assert run("convert", str(checkpoint), str(tmp_path / "dir"))[0] == 0
    code, out, _ = run("show", str(tmp_path / "dir"))
    assert code == 0
    assert "layer.weight" in out
    pytest.importorskip("safetensors")
    assert run("convert", str(checkpoint), str(tmp_path / "x.safetensors"))[0] == 0
    code, out, _ = run("show", str(tmp_path / "x.safetensors"))
    assert code == 0
    assert "safetensors" in out.splitlines()[0]


class CountingArray(np.ndarray):
    """An array that counts how often its size is asked for (once per leaf is enough)."""

    asked = 0

    @property
    def nbytes(self) -> int:  # type: ignore[override]
        CountingArray.asked += 1
        return int(np.ndarray.nbytes.__get__(self))


def test_show_sizes_each_leaf_once_however_deep_the_tree() -> None:
    """A container's totals come from one pass over the leaves, not a walk per container."""
    leaf = np.arange(3.0).view(CountingArray)
    tree: object = leaf
    for _ in range(500):
        tree = {"k": tree}
    CountingArray.asked = 0
    rows, totals = cli._rows(tio.Contents(tree, "npz"), None, False)
    assert CountingArray.asked <= 2  # the size, and the leaf's own row: not once per level
    assert len(rows) == 501
    assert rows[0][1][:3] == ["(root)", "dict", "1 key"]
    assert rows[-1][1][0] == "  " * 500 + "k"
    assert rows[-2][1][-1] == "24 B"  # every container above the leaf holds its bytes
    assert totals == {"arrays": 1, "elements": 3, "bytes": 24, "values": 0}


def test_show_deep_and_wide_files(tmp_path: Path) -> None:
    """A 200-deep tree and 20,000 leaves: every row, the totals, --depth summaries."""
    deep: object = torch.ones(2)
    for _ in range(200):
        deep = [deep, None]
    tonumpy.save(tmp_path / "deep.npz", deep)
    code, out, err = run("show", str(tmp_path / "deep.npz"))
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 1 + 1 + 200 * 2 + 1 + 1  # title, header, rows, totals
    leaf = lines[2 + 200]  # the root, 199 lists, then the leaf 200 levels down
    assert leaf.startswith("  " * 200 + "0 ")
    assert leaf.split()[:2] == ["0", "ndarray"]
    assert lines[-2].split()[:3] == ["1", "None", "="]  # the root's own None, last
    assert lines[-1] == "1 array, 2 elements, 8 B; 200 other values"
    wide = {f"k{i}": np.full(1, i % 100, dtype=np.int8) for i in range(20_000)}
    tonumpy.save(tmp_path / "wide.npz", {"a": wide, "b": [1, 2]})
    code, out, err = run("show", str(tmp_path / "wide.npz"), "--depth", "1")
    assert code == 0, err
    rows = [line.split() for line in out.splitlines()[2:]]
    assert rows[:3] == [
        ["(root)", "dict", "2", "keys", "19.5", "KiB"],
        ["a", "dict", "20,000", "keys", "19.5", "KiB"],
        ["...", "20,000", "arrays"],
    ]
    assert rows[-1] == [
        "20,000",
        "arrays,",
        "20,000",
        "elements,",
        "19.5",
        "KiB;",
        "2",
        "other",
        "values",
    ]


# ----------------------------------------------------------------------------- convert


def test_readme_first_command(tmp_path: Path) -> None:
    """`tonumpy convert examples/model_outputs.pt model_outputs.npz && tonumpy show ...`."""
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    tool = shutil.which("tonumpy") or ""
    command = [tool] if tool else [sys.executable, "-m", "tonumpy"]
    env = {**os.environ, "NO_COLOR": "1"}
    first = subprocess.run(
        [*command, "convert", "examples/model_outputs.pt", "model_outputs.npz"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("wrote model_outputs.npz (")
    assert "7 arrays from examples/model_outputs.pt (torch)" in first.stdout
    shown = subprocess.run(
        [*command, "show", "model_outputs.npz"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert shown.returncode == 0, shown.stderr
    assert "model_output" in shown.stdout
    again = subprocess.run(  # a re-run refuses to overwrite, in one line
        [*command, "convert", "examples/model_outputs.pt", "model_outputs.npz"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert again.returncode == 2
    assert again.stderr.count("\n") == 1
    assert "--force" in again.stderr
    forced = subprocess.run(
        [*command, "convert", "examples/model_outputs.pt", "model_outputs.npz", "--force"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert forced.returncode == 0, forced.stderr
    loaded = tonumpy.load(tmp_path / "model_outputs.npz")
    assert list(loaded) == ["model_output", "labels", "predictions", "input_ids", "epoch", "split"]
    assert loaded["model_output"]["logits"].dtype == np.float32


def test_readme_python_example_is_the_first_commands_conversion(tmp_path: Path) -> None:
    """examples/model_outputs.py converts examples/model_outputs.pt, with public API only."""
    script = ROOT / "examples" / "model_outputs.py"
    source = script.read_text()
    assert "tonumpy._" not in source  # no private module
    assert "model_outputs.pt" in source
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    after = result.stdout.split("converted (tonumpy.load")[1].splitlines()[1:-1]
    assert run("convert", str(EXAMPLE), str(tmp_path / "cli.npz"))[0] == 0
    written = tonumpy.load(tmp_path / "cli.npz")  # what the README's first command wrote
    expected = []
    for path, leaf in zip(*_sorted_leaves(written), strict=True):
        kind = f"ndarray {leaf.shape} {leaf.dtype}" if isinstance(leaf, np.ndarray) else repr(leaf)
        expected.append(f"{path} {kind}")
    assert [" ".join(line.split()) for line in after] == [" ".join(e.split()) for e in expected]


def _sorted_leaves(tree: object, path: str = "") -> tuple[list[str], list[object]]:
    """Dotted key paths and leaves, dict keys sorted; None left out (it is no leaf to list)."""
    if isinstance(tree, dict):
        items = sorted(tree.items())
    elif isinstance(tree, list | tuple):
        items = list(enumerate(tree))
    else:
        return ([path], [tree]) if tree is not None else ([], [])
    paths: list[str] = []
    leaves: list[object] = []
    for key, value in items:
        more = _sorted_leaves(value, f"{path}.{key}" if path else str(key))
        paths += more[0]
        leaves += more[1]
    return paths, leaves


def test_python_dash_m(tmp_path: Path) -> None:
    """python -m tonumpy runs the command (--version prints the package version)."""
    result = subprocess.run(
        [sys.executable, "-m", "tonumpy", "--version"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0
    assert result.stdout.strip() == f"tonumpy {tonumpy.__version__}"


def test_convert_ml_dtypes_keeps_bits(tmp_path: Path) -> None:
    """convert --ml-dtypes keeps bfloat16 bits; without it the leaf is widened, with a note."""
    dst = tmp_path / "exact.npz"
    code, _, err = run("convert", str(EXAMPLE), str(dst), "--ml-dtypes")
    assert code == 0
    assert "widened" not in err
    exact = tonumpy.load(dst, ml_dtypes=True)["model_output"]["logits"]
    original = tio.read(EXAMPLE).tree["model_output"]["logits"]
    np.testing.assert_array_equal(exact.view(np.int16), original.view(torch.int16).numpy())
    code, _, err = run("convert", str(EXAMPLE), str(tmp_path / "wide.npz"))
    assert "bfloat16 widened to float32" in err


def test_convert_a_dtype_torch_cannot_create_is_no_crash(tmp_path: Path) -> None:
    """A float4_x2 leaf (torch.zeros refuses the dtype) is converted and noted, not a crash."""
    if not hasattr(torch, "float4_e2m1fn_x2"):
        pytest.skip("this torch has no float4_e2m1fn_x2")
    packed = torch.arange(6, dtype=torch.uint8).reshape(2, 3).view(torch.float4_e2m1fn_x2)
    src = tmp_path / "f4.pt"
    torch.save({"packed": packed, "x": torch.ones(2)}, src)
    dst = tmp_path / "f4.npz"
    code, out, err = run("convert", str(src), str(dst))
    assert code == 0, err
    assert "2 arrays" in out
    assert "widened" not in err
    np.testing.assert_array_equal(tonumpy.load(dst)["x"], np.ones(2, np.float32))


def test_existing_destination_needs_force(tmp_path: Path, checkpoint: Path) -> None:
    """convert refuses to replace an existing file unless --force, in one line naming the flag."""
    dst = tmp_path / "out.npz"
    dst.write_bytes(b"precious")
    code, out, err = run("convert", str(checkpoint), str(dst))
    assert code == 2
    assert out == ""
    assert err.startswith("tonumpy: error: ")
    assert err.count("\n") == 1
    assert "pass --force to replace it" in err  # the command names its flag ...
    assert "overwrite=True" not in err  # ... not the parameter the library names
    assert dst.read_bytes() == b"precious"
    assert run("convert", str(checkpoint), str(dst), "--force")[0] == 0
    assert "model" in tonumpy.load(dst)


def test_flags_come_from_the_error_not_from_its_text(tmp_path: Path, checkpoint: Path) -> None:
    """A name that reads 'overwrite=True' is printed as it is; only the option becomes --force."""
    dst = tmp_path / "overwrite=True"
    dst.write_bytes(b"precious")
    code, _, err = run("convert", str(checkpoint), str(dst))
    assert code == 2
    assert err == f"tonumpy: error: {dst} exists; pass --force to replace it\n"


def test_a_class_container_to_pt_names_the_plain_containers_flag(tmp_path: Path) -> None:
    """A class .pt output cannot rebuild is refused naming --plain-containers, not the option."""
    src = tmp_path / "tree.npz"
    tonumpy.save(src, {"out": torch.return_types.max((torch.ones(2), torch.zeros(2)))})
    code, _, err = run("convert", str(src), str(tmp_path / "out.pt"))
    assert code == 2
    assert "pass --plain-containers to write it as a dict" in err
    assert "plain_containers=True" not in err
    assert run("convert", str(src), str(tmp_path / "out.pt"), "--plain-containers")[0] == 0


def test_the_command_rewrites_no_library_message() -> None:
    """The command imports no regular expressions to rewrite library messages with."""
    source = Path(cli.__file__).read_text(encoding="utf-8")
    assert "import re\n" not in source
    assert ".sub(" not in source


def test_a_directory_with_other_files_is_not_replaced_even_with_force(
    tmp_path: Path, checkpoint: Path
) -> None:
    """The library's 'even with overwrite=True' reads 'even with --force' on the command line."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("mine")
    code, _, err = run("convert", str(checkpoint), str(home), "--force")
    assert code == 2
    assert "not replacing it even with --force" in err
    assert "overwrite" not in err
    with pytest.raises(FileExistsError, match="even with overwrite=True") as info:
        tio.convert(checkpoint, home, overwrite=True)
    assert "--" not in str(info.value)
    assert (home / "notes.txt").read_text() == "mine"


def test_failed_conversion_leaves_no_destination(tmp_path: Path, checkpoint: Path) -> None:
    """A truncated source: exit 2, one line, no DST and no temporary file."""
    broken = tmp_path / "broken.pt"
    broken.write_bytes(checkpoint.read_bytes()[:200])
    for dst in ("out.npz", "outdir", "out.safetensors"):
        code, _, err = run("convert", str(broken), str(tmp_path / dst))
        assert code == 2
        assert err.count("\n") == 1
        assert "Traceback" not in err
        assert not (tmp_path / dst).exists()
    assert leftovers(tmp_path) == []


# ------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["show", "missing.pt"], "no such file"),
        (["convert", "missing.pt", "out.npz"], "no such file"),
        (["convert", "x.pt", "out.pickle"], "cannot write '.pickle' files"),
        (["show", "notes.txt"], "not a file tonumpy reads"),
        (["show"], "required"),
        (["show", "x.pt", "--depth", "-1"], "negative"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_errors_are_one_line_with_status_2(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    message: str,
) -> None:
    """Every error (bad file, bad arguments) is one line on stderr with exit status 2."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("hello")
    code, out, err = run(*argv)
    err += capsys.readouterr().err  # argparse's own usage errors go to sys.stderr
    assert code == 2
    assert out == ""
    assert message in err
    assert err.count("\n") == 1
    assert "Traceback" not in err


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    """--debug, before or after the command, adds the traceback to the error."""
    code, _, err = run("--debug", "show", str(tmp_path / "missing.pt"))
    assert code == 2
    assert "Traceback" in err
    code, _, err = run("show", str(tmp_path / "missing.pt"), "--debug")  # after the command too
    assert "Traceback" in err


def test_malicious_pickle_is_refused_by_the_cli(tmp_path: Path) -> None:
    """The file would create a marker when unpickled: refused, exit 2, no marker, no DST."""
    marker = tmp_path / "MARKER"
    src = tmp_path / "evil.pt"
    script = (
        "import os, sys, torch\n"
        "class Evil:\n"
        "    def __reduce__(self):\n"
        "        return (os.system, ('touch ' + sys.argv[2],))\n"
        "torch.save({'w': torch.ones(2), 'x': Evil()}, sys.argv[1])\n"
    )
    subprocess.run([sys.executable, "-c", script, str(src), str(marker)], check=True)
    assert not marker.exists()
    for argv in (["show", str(src)], ["convert", str(src), str(tmp_path / "out.npz")]):
        code, _, err = run(*argv)
        assert code == 2
        assert "refused" in err
        assert "system" in err  # os.system, written posix.system by pickle
        assert err.count("\n") == 1
        assert not marker.exists()
    assert not (tmp_path / "out.npz").exists()


def test_unsafe_load_warns(tmp_path: Path) -> None:
    """A pickle the weights-only loader cannot read is refused naming --unsafe-load."""
    src = tmp_path / "p4.pt"
    torch.save({"a": np.ones(2)}, src, pickle_protocol=4)  # beyond the weights-only loader
    code, _, err = run("convert", str(src), str(tmp_path / "a.npz"))
    assert code == 2
    assert "--unsafe-load reads it anyway" in err
    assert "unsafe_load=True" not in err
    code, _, err = run("convert", str(src), str(tmp_path / "a.npz"), "--unsafe-load")
    assert code == 0
    assert "warning: --unsafe-load" in err
    np.testing.assert_array_equal(tonumpy.load(tmp_path / "a.npz")["a"], np.ones(2))


def test_show_and_convert_agree_on_unpickled_objects(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With --unsafe-load a dataclass comes back as itself: show lists what convert writes."""
    (tmp_path / "records_mod.py").write_text(
        "import dataclasses\n@dataclasses.dataclass\nclass Record:\n    weights: object\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    script = (
        "import sys, torch; sys.path.insert(0, sys.argv[1]); import records_mod as m;"
        "torch.save({'r': m.Record(torch.ones(3)), 'w': torch.zeros(2)}, sys.argv[2])"
    )
    src = tmp_path / "rec.pt"
    subprocess.run([sys.executable, "-c", script, str(tmp_path), str(src)], check=True)
    code, out, err = run("show", str(src), "--unsafe-load")
    assert code == 0, err
    rows = [line.split() for line in out.splitlines()]
    assert ["r", "Record", "1", "key", "12", "B"] in rows
    assert ["weights", "Tensor", "(3,)", "float32", "cpu", "12", "B"] in rows
    assert rows[-1][:2] == ["2", "arrays,"]
    code, out, err = run("convert", str(src), str(tmp_path / "out.npz"), "--unsafe-load")
    assert code == 0, err
    assert "2 arrays from" in out
    np.testing.assert_array_equal(tonumpy.load(tmp_path / "out.npz")["r"]["weights"], np.ones(3))


# ---------------------------------------------------------------------------- progress


def test_progress_bar_only_on_a_terminal_and_for_large_inputs(
    tmp_path: Path, checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """convert draws a progress bar on a terminal only, for inputs above the size threshold."""
    code, _, err = run("convert", str(checkpoint), str(tmp_path / "a.npz"), stderr=Terminal())
    assert code == 0
    assert "converting" not in err  # small input: no bar
    monkeypatch.setattr(cli, "PROGRESS_MIN_BYTES", 0)
    code, _, err = run("convert", str(checkpoint), str(tmp_path / "b.npz"), stderr=Terminal())
    assert code == 0
    assert "converting [" in err
    assert "100%" in err
    assert err.rstrip("\n").endswith("\r\033[K")  # the bar is cleared at the end
    code, _, err = run("convert", str(checkpoint), str(tmp_path / "c.npz"))
    assert "converting" not in err  # piped: never


def test_bar_draws_percentages() -> None:
    """The progress bar shows the fraction done as a percentage and clears its line when closed."""
    stream = Terminal()
    bar = cli._Bar(stream, "converting")
    bar(cli.PROGRESS_MIN_BYTES // 2, cli.PROGRESS_MIN_BYTES)
    assert " 50%" in stream.getvalue()
    bar.close()
    assert stream.getvalue().endswith("\r\033[K")


# ----------------------------------------------------------- checkpoints, help, not torch


def test_help_names_hugging_face_checkpoint_directories(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The help of show/convert names checkpoint folders, .pt/.pth and --plain-containers."""
    for command in ("show", "convert"):
        assert run(command, "--help")[0] == 0
        text = " ".join(capsys.readouterr().out.split())
        assert "Hugging Face checkpoint directory" in text, command
    assert run("convert", "--help")[0] == 0
    text = " ".join(capsys.readouterr().out.split())
    assert ".pt/.pth" in text
    assert "--plain-containers" in text


def test_depth_groups_dotted_names_by_segment(tmp_path: Path) -> None:
    """A state dict's flat names: --depth counts their segments, as it counts nested keys."""
    state = {
        "encoder.layer.0.weight": torch.ones(2, 2),
        "encoder.layer.0.bias": torch.ones(2),
        "encoder.layer.1.weight": torch.ones(2, 2),
        "head.weight": torch.ones(3),
        "scale": torch.ones(1),
    }
    torch.save(state, tmp_path / "state.pt")
    code, out, _ = run("show", str(tmp_path / "state.pt"), "--depth", "1")
    assert code == 0
    rows = [line.split() for line in out.splitlines()[2:-1]]
    assert rows == [
        ["(root)", "dict", "3", "keys", "56", "B"],
        ["encoder.", "names", "1", "key", "40", "B"],
        ["...", "3", "arrays"],
        ["head.", "names", "1", "key", "12", "B"],
        ["...", "1", "array"],
        ["scale", "Tensor", "(1,)", "float32", "cpu", "4", "B"],
    ]
    assert out.splitlines()[-1].startswith("5 arrays")
    code, out, _ = run("show", str(tmp_path / "state.pt"), "--depth", "3")
    names = [line.split()[0] for line in out.splitlines()[2:-1]]
    assert names == [
        "(root)",
        "encoder.",
        "layer.",
        "0.",
        "...",
        "1.",
        "...",
        "head.",
        "weight",
        "scale",
    ]
    # without --depth every name is listed whole, as stored
    code, out, _ = run("show", str(tmp_path / "state.pt"))
    assert [line.split()[0] for line in out.splitlines()[2:-1]] == ["(root)", *state]


def test_depth_keeps_odd_dotted_names_whole(tmp_path: Path) -> None:
    """Empty segments, names that clash with a group, and very long names stay as stored."""
    deep = ".".join(["a"] * 5000)  # a hostile key: never 5,000 levels
    torch.save({deep: torch.ones(1), "x.": torch.ones(1), "x.y": torch.ones(1)}, tmp_path / "s.pt")
    torch.save({"p..q": torch.ones(1), "r.s": torch.ones(1)}, tmp_path / "t.pt")
    code, out, err = run("show", str(tmp_path / "s.pt"), "--depth", "1")
    assert code == 0, err
    rows = [line.split()[0] for line in out.splitlines()[2:-1]]
    assert rows == ["(root)", deep, "x.", "x.y"]  # "x." and the group "x." would clash
    code, out, _ = run("show", str(tmp_path / "t.pt"), "--depth", "1")
    assert [line.split()[0] for line in out.splitlines()[2:-1]] == ["(root)", "p..q", "r.", "..."]


def test_depth_on_a_checkpoint_directory(tmp_path: Path) -> None:
    """show --depth groups the tensors of a Hugging Face checkpoint directory by name segment."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
    folder = tmp_path / "ckpt"
    folder.mkdir()
    safetensors_torch = pytest.importorskip("safetensors.torch")
    safetensors_torch.save_file(model.state_dict(), folder / "model.safetensors")
    code, out, _ = run("show", str(folder), "--depth", "1")
    assert code == 0
    rows = [line.split() for line in out.splitlines()[2:-1]]
    assert rows[1:] == [
        ["0.", "names", "2", "keys", "36", "B"],
        ["...", "2", "arrays"],
        ["2.", "names", "2", "keys", "16", "B"],
        ["...", "2", "arrays"],
    ]


def test_a_pt_file_that_is_not_a_torch_save_file(tmp_path: Path) -> None:
    """Neither a zip archive nor a pickle: said so, in one line, not an opcode number."""
    (tmp_path / "notes.pt").write_text("not a tensor file\n")
    (tmp_path / "empty.pt").write_bytes(b"")
    code, _, err = run("show", str(tmp_path / "notes.pt"))
    assert code == 2
    assert err == (
        f"tonumpy: error: {tmp_path / 'notes.pt'}: not a torch.save file (neither a zip "
        "archive nor a pickle: it starts with b'not a te')\n"
    )
    code, _, err = run("convert", str(tmp_path / "empty.pt"), str(tmp_path / "out.npz"))
    assert code == 2
    assert (
        err == f"tonumpy: error: {tmp_path / 'empty.pt'}: not a torch.save file (an empty file)\n"
    )
    with pytest.raises(tonumpy.FileFormatError, match=r"not a torch\.save file"):
        tonumpy.load(tmp_path / "notes.pt")


def test_convert_npz_back_to_pt(tmp_path: Path) -> None:
    """`tonumpy convert x.npz out.pt`: what torch.load(weights_only=True) reads, exactly."""
    src = tmp_path / "x.npz"
    np.savez(src, w=np.arange(6, dtype=np.float32).reshape(2, 3), ids=np.arange(3))
    code, out, err = run("convert", str(src), str(tmp_path / "out.pt"))
    assert code == 0, err
    assert "2 arrays" in out
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    assert list(got) == ["w", "ids"]
    assert torch.equal(got["w"], torch.arange(6, dtype=torch.float32).reshape(2, 3))
    assert got["ids"].dtype == torch.int64
