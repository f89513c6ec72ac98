"""Hostile files: every case of the corpus is refused in its own process, fast, in bounded memory.

Each case runs ``tonumpy show``/``convert`` (or ``tonumpy.load``) in a child process limited to
the parent's address space plus 1 GiB (``RLIMIT_AS``) and killed after a minute: FIFOs and
devices, symbolic links out of directories, zip bombs, pickles that abuse the weights-only
allow-list, lying headers, CRC damage and terminal escapes must each end with exit status 2 and
one escaped line on stderr that says what was refused, without the child's memory growing.
"""

from __future__ import annotations

import ast
import io
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tonumpy.io
from _helpers import hostile as _hostile
from tonumpy._format import _npyheader

GROWTH_MIB = 200  # a refused case may grow its process by this much at most (imports, buffers)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], dict[str, str]]:
    """Every case built once and run once (one process, one fork per case)."""
    folder = tmp_path_factory.mktemp("hostile")
    cases = _hostile.build(folder / "files")
    results = _hostile.run_corpus([argv for argv, _ in cases.values()], folder / "run")
    by_name = dict(zip(cases, results, strict=True))
    return by_name, {name: expect for name, (_, expect) in cases.items()}


CASES = [
    "fifo.npz",
    "fifo.pt",
    "fifo-no-suffix",
    "fifo-convert",
    "dev-zero-link",
    "dev-zero",
    "export-fifo-json",
    "export-fifo-json-load",
    "export-device-json",
    "export-device-json-load",
    "npy-dir-link-out",
    "npy-dir-link-out-convert",
    "npy-dir-link-out-load",
    "export-link-out-load",
    "pickle-bytes",
    "pickle-list-range",
    "pickle-bytearray",
    "pickle-FloatTensor",
    "pickle-FloatTensor-Size",
    "pickle-UntypedStorage",
    "pickle-Tensor-newobj",
    "pickle-np-reconstruct",
    "pickle-np-ndarray",
    "pickle-qtensor",
    "pickle-storage-lies",
    "pickle-storage-twice",
    "pickle-stride-zero",
    "pickle-billion-laughs",
    "pickle-bytes-load",
    "pickle-range-convert",
    "legacy-storage-lies",
    "sparse-dense-bomb",
    "npz-overlapping-members",
    "npz-member-claims-2GiB",
    "npz-member-huge-shape",
    "npy-huge-shape",
    "npy-header-claims-4GiB",
    "npz-member-header-claims-4GiB",
    "safetensors-offsets-past-end",
    "safetensors-overlap",
    "safetensors-header-length",
    "pt-crc-convert",
    "pt-crc-stats",
    "pt-crc-load",
    "npz-crc-convert",
    "escape-in-error",
]


@pytest.mark.parametrize("name", CASES)
def test_hostile_file_is_refused_in_one_line(
    corpus: tuple[dict[str, Any], dict[str, str]], name: str
) -> None:
    """Exit 2, not killed, one escaped line that names the reason, memory not grown."""
    results, expected = corpus
    result = results[name]
    assert not result["killed"], f"{name}: still running after {_hostile.TIMEOUT} s"
    assert result["rc"] == 2, result
    lines = result["stderr"].splitlines()
    assert len(lines) == 1, result["stderr"]
    assert lines[0].startswith("tonumpy: error: ")
    assert re.search(expected[name], lines[0]), lines[0]
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f]", result["stderr"])
    assert "Traceback" not in result["stderr"]
    assert result["grew_mib"] < GROWTH_MIB, result
    assert ".tmp" not in lines[0]  # never an internal temporary's name


def test_corpus_covers_every_case(corpus: tuple[dict[str, Any], dict[str, str]]) -> None:
    """The hostile corpus ran every case listed, no more and no fewer."""
    results, _ = corpus
    assert sorted(results) == sorted(CASES)


# ------------------------------------------------------------------- bounded, not refused


def test_zip_bomb_is_shown_from_headers_and_converted_in_chunks(tmp_path: Path) -> None:
    """A 256 MiB deflated member (a ~260 KB file): show reads its header only, convert streams
    it, load allocates exactly what it declares; memory does not follow the member's size."""
    size = 256 << 20
    bomb = _hostile._deflated_zeros(tmp_path / "bomb.npz", "zeros.npy", size)
    assert bomb.stat().st_size < size // 500
    out = tmp_path / "out.npz"
    results = _hostile.run_corpus(
        [["show", str(bomb)], ["convert", str(bomb), str(out)], ["show", "--stats", str(bomb)]],
        tmp_path / "run",
    )
    show, convert, stats = results
    assert show["rc"] == 0, show
    assert f"({size},)" in show["stdout"]
    assert show["grew_mib"] < 64, show
    assert convert["rc"] == 0, convert
    assert convert["grew_mib"] < 96, convert
    assert stats["rc"] == 0, stats
    assert stats["grew_mib"] < 96, stats
    line = next(line for line in stats["stdout"].splitlines() if line.startswith("  zeros"))
    assert line.split()[-5:] == ["0", "0", "0", "0", "0"]
    loaded = np.load(out)["zeros"]
    assert loaded.shape == (size,)
    assert not loaded[:: 1 << 20].any()


def test_escapes_in_keys_are_printed_escaped(tmp_path: Path) -> None:
    """Keys, class names and values from a file never reach the terminal raw."""
    path = tmp_path / "keys.pt"
    torch.save({_hostile.ESCAPE: torch.ones(1), "text": f"say {_hostile.ESCAPE}"}, path)
    np.savez(tmp_path / "keys.npz", **{_hostile.ESCAPE: np.ones(1)})
    results = _hostile.run_corpus(
        [["show", str(path)], ["show", str(tmp_path / "keys.npz")]], tmp_path / "run"
    )
    for result in results:
        assert result["rc"] == 0, result
        assert "\x1b" not in result["stdout"]
        assert "\x07" not in result["stdout"]
        assert "\\x1b[2J\\x1b]0;owned\\x07" in result["stdout"]


def test_show_never_builds_a_whole_repr(tmp_path: Path) -> None:
    """A 64 MiB bytes value and a 200,000-item set are shown by their first few items.

    Memory is compared with loading the same file: the repr of the bytes alone would add
    256 MiB of text.
    """
    path = tmp_path / "values.pt"
    torch.save({"blob": bytes(64 << 20), "many": set(range(200_000))}, path)
    show, load = _hostile.run_corpus([["show", str(path)], ["load", str(path)]], tmp_path / "run")
    assert show["rc"] == 0, show
    assert load["rc"] == 0, load
    blob = next(line for line in show["stdout"].splitlines() if "blob" in line)
    many = next(line for line in show["stdout"].splitlines() if "many" in line)
    assert blob.endswith("...")
    assert many.endswith("...")
    assert len(blob) < 120
    assert show["grew_mib"] < load["grew_mib"] + 64, (show, load)


def test_expanded_views_within_the_limit_still_load(tmp_path: Path) -> None:
    """A stride-0 view (expand) a little larger than the file is data, not a bomb."""
    path = tmp_path / "expanded.pt"
    torch.save({"bias": torch.arange(4.0).expand(1000, 4)}, path)
    out = tmp_path / "out.npz"
    results = _hostile.run_corpus([["convert", str(path), str(out)]], tmp_path / "run")
    assert results[0]["rc"] == 0, results[0]
    np.testing.assert_array_equal(np.load(out)["bias"], np.tile(np.arange(4.0), (1000, 1)))
    assert math.prod(np.load(out)["bias"].shape) == 4000


def test_torch_files_read_from_several_threads(tmp_path: Path) -> None:
    """Safe loads in parallel: each sees its own allow-list and stand-ins, never another's."""
    import collections
    import concurrent.futures
    import datetime

    paths = []
    for i in range(16):
        path = tmp_path / f"ckpt{i}.pt"
        queue = collections.deque([i, i + 1])
        tree = {"q": queue, "when": datetime.date(2026, 1, 1 + i), "w": torch.full((2,), float(i))}
        torch.save(tree, path)
        paths.append(path)

    def read(index: int) -> tuple[int, Any]:
        return index, tonumpy.io.read(paths[index])

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(read, [i % 16 for i in range(96)]))
    for index, contents in results:
        assert contents.tree["q"] == [index, index + 1]
        assert contents.classes[("q",)] == "collections.deque"
        assert contents.classes[("when",)] == "datetime.date"
        assert contents.tree["w"].tolist() == [float(index)] * 2


_COUNTS = st.integers(0, 10**22).map(str) | st.sampled_from(
    ["03", "-1", "1.5", "True", " 2", "9" * 5000]
)
_SHAPES = st.lists(_COUNTS, max_size=4).flatmap(
    lambda dims: st.sampled_from(
        ["(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")", "(" + ", ".join(dims) + ")"]
        + (["(" + ", ".join(dims) + ",)"] if dims else [])
    )
)


@given(
    descr=st.sampled_from(["<f4", "|u1", ">i8", "<U10", "|O", "|V2", "<M8[D]", "f", "<f4'"]),
    fortran=st.sampled_from(["True", "False", "1", "None"]),
    shape=_SHAPES,
    tail=st.sampled_from([", }", "}", ",}", " }", ", } ", ", }" + " " * 300 + "\n", ", }\t\n"]),
)
@settings(max_examples=300, deadline=None)
def test_npy_headers_read_fast_as_literal_eval_reads_them(
    descr: str, fortran: str, shape: str, tail: str
) -> None:
    """Any .npy header text gives what literal_eval and the checks give (NumPy's parser, with
    dimensions of 0 or more): the same header, or a refusal."""
    text = f"{{'descr': '{descr}', 'fortran_order': {fortran}, 'shape': {shape}{tail}"
    raw = text.encode("latin1")
    blob = b"\x93NUMPY\x01\x00" + len(raw).to_bytes(2, "little") + raw
    try:
        fields = ast.literal_eval(text)
        shape_ok = isinstance(fields["shape"], tuple) and all(
            type(n) is int and n >= 0 for n in fields["shape"]
        )
        expected: Any = (fields["shape"], np.dtype(fields["descr"]), fields["fortran_order"])
        if not shape_ok or not isinstance(fields["fortran_order"], bool):
            expected = None
    except Exception:  # noqa: BLE001 - any text literal_eval or NumPy refuses
        expected = None
    try:
        header = _npyheader.read_header(io.BytesIO(blob), "h.npy")
    except tonumpy.FileFormatError:
        got: Any = None
    else:
        got = (header.shape, header.dtype, header.fortran)
    if expected is not None and expected[1].hasobject:
        expected = None  # an object dtype: refused after parsing
    assert got == expected
