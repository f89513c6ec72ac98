"""Options are checked before any work: exact values, errors naming the parameter (12.9, 12.13)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import tonumpy
from tonumpy import OptionError

meta = {"x": torch.empty(2, device="meta")}  # any conversion of it would fail differently
ragged = [{"x": torch.ones(1, 1)}, {"x": torch.ones(1, 2)}]

COPY_TAKERS: dict[str, Callable[[Any], Any]] = {
    "to_numpy": lambda copy: tonumpy.to_numpy(meta, copy=copy),
    "to_numpy_async": lambda copy: tonumpy.to_numpy_async(meta, copy=copy),
    "to_torch": lambda copy: tonumpy.to_torch({"x": np.ones(2)}, copy=copy),
    "numpy_args": lambda copy: tonumpy.numpy_args(copy=copy),
}


@pytest.mark.parametrize("copy", [0, 1, 0.0, "never", "no", "", np.True_, np.False_, [], "None"])
@pytest.mark.parametrize("function", list(COPY_TAKERS))
def test_copy_takes_exactly_none_true_false(function: str, copy: Any) -> None:
    """copy= takes exactly None, True or False: anything else is an OptionError (a TypeError)."""
    with pytest.raises(OptionError, match=rf"{function}\(copy=.*None.*True.*False") as info:
        COPY_TAKERS[function](copy)
    assert isinstance(info.value, TypeError)
    assert isinstance(info.value, tonumpy.TonumpyError)


@pytest.mark.parametrize("copy", [None, True, False])
def test_valid_copy_values_still_work(copy: Any) -> None:
    """copy=None/True/False are accepted by to_numpy, to_numpy_async, numpy_args and to_torch."""
    t = torch.arange(3)
    assert tonumpy.to_numpy(t, copy=copy).tolist() == [0, 1, 2]
    assert tonumpy.to_numpy_async([t], copy=copy).result()[0].tolist() == [0, 1, 2]
    assert tonumpy.numpy_args(copy=copy)(lambda v: v)(t).tolist() == [0, 1, 2]
    assert tonumpy.to_torch(np.arange(3), copy=copy).tolist() == [0, 1, 2]


def test_copy_zero_no_longer_shares_memory_silently() -> None:
    """The repro: copy=0 acted like None (a view), copy="never" like True (a copy)."""
    t = torch.zeros(3)
    for copy in (0, "never"):
        with pytest.raises(OptionError):
            tonumpy.to_numpy(t, copy=copy)


FLAG_TAKERS: dict[str, Callable[[str, Any], Any]] = {
    "to_numpy": lambda name, v: tonumpy.to_numpy(meta, **{name: v}),
    "to_numpy_async": lambda name, v: tonumpy.to_numpy_async(meta, **{name: v}),
    "numpy_args": lambda name, v: tonumpy.numpy_args(**{name: v}),
    "Accumulator": lambda name, v: tonumpy.Accumulator(**{name: v}),
    "capture": lambda name, v: tonumpy.capture(torch.nn.Linear(1, 1), **{name: v}).__enter__(),
}


@pytest.mark.parametrize("value", [1, 0, "yes", None, np.True_, 1.0])
@pytest.mark.parametrize(
    ("function", "name"),
    [
        *((f, n) for f in FLAG_TAKERS for n in ("ml_dtypes", "scalars")),
        ("capture", "inputs"),
        ("capture", "outputs"),
    ],
)
def test_boolean_options_take_exactly_true_or_false(function: str, name: str, value: Any) -> None:
    """Boolean options refuse values other than True and False, naming function and option."""
    with pytest.raises(OptionError, match=rf"{function}\({name}=.*takes True or False"):
        FLAG_TAKERS[function](name, value)


@pytest.mark.parametrize("value", [1, "yes", None])
def test_concat_and_gather_ml_dtypes(value: Any) -> None:
    """concat and gather refuse a non-boolean ml_dtypes=; gather takes None as its default."""
    with pytest.raises(OptionError, match=r"concat\(ml_dtypes="):
        tonumpy.concat(ragged, ml_dtypes=value)
    if value is None:
        assert tonumpy.gather(ragged[0], ml_dtypes=value) is not None
        return
    with pytest.raises(OptionError, match=r"gather\(ml_dtypes="):
        tonumpy.gather(ragged[0], ml_dtypes=value)


# ---------------------------------------------------------------------------------- axis

AXIS_TAKERS: dict[str, Callable[[Any], Any]] = {
    "concat": lambda axis: tonumpy.concat(ragged, axis=axis),
    "Accumulator": lambda axis: tonumpy.Accumulator(axis=axis),
    "gather": lambda axis: tonumpy.gather(ragged[0], axis=axis),
    "Activations.concat": lambda axis: _activations().concat("", axis=axis),
}


def _activations() -> tonumpy.Activations:
    model = torch.nn.Linear(2, 2)
    with tonumpy.capture(model) as acts:
        model(torch.ones(1, 2))
    return acts


@pytest.mark.parametrize("axis", [1.5, "0", True, False, None, 1.0, np.bool_(True)])
@pytest.mark.parametrize("function", list(AXIS_TAKERS))
def test_axis_must_be_an_int(function: str, axis: Any) -> None:
    """axis= must be an int (else an OptionError, a TypeError); gather takes None as its default."""
    if function == "gather" and axis is None:
        assert AXIS_TAKERS[function](axis) is not None
        return
    with pytest.raises(OptionError, match=rf"{function}\(axis=.*takes an int") as info:
        AXIS_TAKERS[function](axis)
    assert isinstance(info.value, TypeError)


def test_numpy_integer_axes_are_ints() -> None:
    """NumPy integer scalars are accepted as axis= by concat and Accumulator."""
    batches = [np.ones((2, 1)), np.ones((2, 3))]
    assert tonumpy.concat(batches, axis=np.int64(1)).shape == (2, 4)
    assert tonumpy.concat(batches, axis=np.int32(-1)).shape == (2, 4)
    acc = tonumpy.Accumulator(axis=np.int64(1))
    for b in batches:
        acc.append(b)
    assert acc.result().shape == (2, 4)


def test_axis_true_is_no_longer_axis_1() -> None:
    """The repro: axis=True concatenated along axis 1."""
    with pytest.raises(OptionError):
        tonumpy.concat([np.ones((2, 1)), np.ones((2, 3))], axis=True)


# ---------------------------------------------------------------------------------- num_items


@pytest.fixture
def filled() -> tonumpy.Accumulator:
    acc = tonumpy.Accumulator()
    acc.append(torch.ones(3, 2))
    return acc


@pytest.mark.parametrize("num_items", [2.5, "2", True, -1, 2.0, np.float64(1)])
def test_num_items(filled: tonumpy.Accumulator, num_items: Any) -> None:
    """num_items= refuses what is not None or a row count, in result() and gather."""
    with pytest.raises(OptionError, match=r"result\(num_items=.*None or a number of rows"):
        filled.result(num_items=num_items)
    with pytest.raises(OptionError, match=r"gather\(num_items="):
        tonumpy.gather(torch.ones(3, 2), num_items=num_items)


def test_numpy_integer_num_items(filled: tonumpy.Accumulator) -> None:
    """NumPy integer num_items= are row counts; a count above the rows held is refused."""
    assert filled.result(num_items=np.int64(2)).shape == (2, 2)
    assert tonumpy.gather(torch.ones(3, 2), num_items=np.uint8(1)).shape == (1, 2)
    with pytest.raises(tonumpy.ConversionError, match="holds 3 rows"):
        filled.result(num_items=4)


# ---------------------------------------------------------------------------------- pad_value


@pytest.mark.parametrize(
    "pad_value",
    [
        lambda dtype: 0,
        lambda path, dtype, extra: 0,
        lambda *, path, dtype: 0,
        str.upper,
    ],
    ids=["one parameter", "three parameters", "keyword-only", "str.upper"],
)
def test_a_pad_value_callable_must_take_path_and_dtype(pad_value: Any) -> None:
    """A callable pad_value that cannot take (path, dtype) is refused when the option is given."""
    match = r"\(pad_value=\.\.\.\): a callable pad_value is called as pad_value\(path, dtype\)"
    with pytest.raises(OptionError, match=match):
        tonumpy.concat(ragged, pad_value=pad_value)
    with pytest.raises(OptionError, match=match):
        tonumpy.Accumulator(pad_value=pad_value)  # when made, not at the first ragged batch
    with pytest.raises(OptionError, match=match):
        tonumpy.gather(ragged[0], pad_value=pad_value)


@pytest.mark.parametrize(
    "pad_value",
    [
        lambda path, dtype: -1,
        lambda *args: -1,
        lambda path, dtype=None, extra=None: -1,
        type("Pad", (), {"__call__": lambda self, path, dtype: -1})(),
    ],
    ids=["two parameters", "*args", "defaults", "callable object"],
)
def test_callables_that_take_path_and_dtype_are_accepted(pad_value: Any) -> None:
    """Callables taking (path, dtype), however declared, are used as pad_value."""
    out = tonumpy.concat(ragged, pad_value=pad_value)["x"]
    assert out.tolist() == [[1.0, -1.0], [1.0, 1.0]]


def test_values_that_happen_to_be_callable_are_values() -> None:
    """A value that is callable (a 0-d tensor) is used as the pad value, not called."""
    out = tonumpy.concat(ragged, pad_value=torch.tensor(-2.0))["x"]
    assert out[0, 1] == -2.0
    out = tonumpy.concat(ragged, pad_value=np.float32(-3.0))["x"]
    assert out[0, 1] == -3.0


# ---------------------------------------------------------------------------------- directory


def test_directory_that_is_a_file(tmp_path: Path) -> None:
    """Accumulator(directory=) naming a file is refused, and the file is left as it was."""
    file = tmp_path / "preds"
    file.write_text("not a directory")
    with pytest.raises(OptionError, match=r"Accumulator\(directory=.*is a file, not a directory"):
        tonumpy.Accumulator(directory=file)
    assert file.read_text() == "not a directory"


def test_directory_below_a_file(tmp_path: Path) -> None:
    """Accumulator(directory=) below a file is refused, naming the file in the way."""
    file = tmp_path / "preds"
    file.write_text("x")
    with pytest.raises(OptionError, match=r"lies below .*preds.*which is a file"):
        tonumpy.Accumulator(directory=file / "epoch3" / "deeper")


def test_directory_that_became_a_file_before_the_first_append(tmp_path: Path) -> None:
    """A directory= path that became a file before the first append is refused at that append."""
    acc = tonumpy.Accumulator(directory=tmp_path / "preds")
    (tmp_path / "preds").write_text("x")
    with pytest.raises(OptionError, match="is a file"):
        acc.append(torch.ones(2, 2))


def test_directory_of_another_type() -> None:
    """directory= of a type that is not a path is an OptionError."""
    with pytest.raises(OptionError, match=r"directory= takes a path"):
        tonumpy.Accumulator(directory=3)  # type: ignore[arg-type]


def test_directory_needs_axis_0(tmp_path: Path) -> None:
    """directory= with an axis other than 0 is refused (rows grow along axis 0 only)."""
    with pytest.raises(OptionError, match="needs axis=0"):
        tonumpy.Accumulator(directory=tmp_path, axis=1)


def test_long_keys_get_short_unique_file_names(tmp_path: Path) -> None:
    """Keys longer than a file name may be: cut, with a digest; still distinct and readable."""
    long_a, long_b = "k" * 300 + "a", "k" * 300 + "b"
    tree = {long_a: torch.ones(2, 1), long_b: torch.zeros(2, 1), "deep": {"x" * 250: torch.ones(2)}}
    acc = tonumpy.Accumulator(directory=tmp_path)
    acc.append(tree)
    acc.append(tree)
    files = sorted(p.name for p in tmp_path.glob("*.npy") if not p.name.startswith("__"))
    assert len(files) == 3  # the leaves' files (besides the directory's __progress__.npy log)
    assert all(len(name.encode()) <= 255 for name in files)
    loaded = tonumpy.load(tmp_path)  # the structure maps each key path to its file
    assert loaded[long_a].tolist() == [[1.0]] * 4
    assert loaded[long_b].tolist() == [[0.0]] * 4
    out = acc.result()
    assert out[long_a].shape == out[long_b].shape == (4, 1)


def test_file_names_differing_only_in_case_are_distinct(tmp_path: Path) -> None:
    """Unique on case-insensitive file systems too (macOS, Windows)."""
    acc = tonumpy.Accumulator(directory=tmp_path)
    acc.append({"Logits": torch.ones(1), "logits": torch.zeros(1)})
    names = sorted(p.name.casefold() for p in tmp_path.glob("*.npy") if p.name[0] != "_")
    assert len(set(names)) == 2  # the leaves' files (besides the directory's log)
    out = acc.result()
    assert out["Logits"].tolist() == [1.0]
    assert out["logits"].tolist() == [0.0]


# ---------------------------------------------------------------------------------- conversions


def test_conversion_problems_keep_their_errors() -> None:
    """Options are fine here: the leaf is the problem, named by its path."""
    with pytest.raises(tonumpy.UnsupportedLeafError, match=r"tree\['x'\]"):
        tonumpy.to_numpy(meta, copy=None)
    with pytest.raises(tonumpy.ConversionError, match=r"tree\['x'\]"):
        tonumpy.concat(ragged, axis=0)
