"""Parquet files: save/load/convert/show, the row-group writer, other readers, hostile files."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import tonumpy
import tonumpy.cli
from _helpers.hostile import run_corpus
from tonumpy._rowfiles._parquet import META_KEY, RowGroupWriter

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def _tree() -> dict[str, Any]:
    torch.manual_seed(0)
    return {
        "logits": torch.randn(6, 3, 2),
        "labels": torch.arange(6),
        "flags": torch.tensor([True, False, True, True, False, True]),
        "hidden": (torch.randn(6, 4).bfloat16(), torch.randn(6, 4).half()),
        "loss": torch.tensor(0.25),
        "per_batch": torch.ones(2),
        "name": "run1",
        "nothing": None,
    }


def _same(a: Any, b: Any) -> None:
    la, sa = tonumpy._tree.flatten(a)
    lb, sb = tonumpy._tree.flatten(b)
    assert sa == sb
    for x, y in zip(la, lb, strict=True):
        if isinstance(x, np.ndarray):
            assert x.dtype == y.dtype
            assert x.shape == y.shape
            np.testing.assert_array_equal(x, y)
        else:
            assert x == y


def test_save_load_rebuilds_the_tree_exactly(tmp_path: Path) -> None:
    """Rows, per-batch values, plain values, None, tuples and dtypes come back as saved."""
    path = tmp_path / "x.parquet"
    tonumpy.save(path, _tree())
    _same(tonumpy.load(path), tonumpy.to_numpy(_tree()))


def test_bfloat16_is_stored_as_float32_values_and_restored(tmp_path: Path) -> None:
    """ml_dtypes=True keeps bfloat16 (stored as its float32 values), load gives it back."""
    path = tmp_path / "x.parquet"
    tonumpy.save(path, _tree(), ml_dtypes=True)
    assert pq.read_table(path).schema.field("hidden.0").type.value_type == pa.float32()
    back = tonumpy.load(path, ml_dtypes=True)
    ref = tonumpy.to_numpy(_tree(), ml_dtypes=True)
    assert back["hidden"][0].dtype == ref["hidden"][0].dtype
    np.testing.assert_array_equal(
        back["hidden"][0].view(np.uint16), ref["hidden"][0].view(np.uint16)
    )
    np.testing.assert_array_equal(
        tonumpy.load(path)["hidden"][0], tonumpy.to_numpy(_tree())["hidden"][0]
    )


def test_float8_reads_as_its_float32_values_everywhere(tmp_path: Path) -> None:
    """float8: other readers see its float32 values; load(ml_dtypes=True) gives its bits back."""
    import polars as pl

    x = torch.tensor([[0.5, -2.0], [448.0, 0.015625]]).to(torch.float8_e4m3fn)
    path = tmp_path / "f8.parquet"
    tonumpy.save(path, {"x": x}, ml_dtypes=True)
    want = x.float().numpy()
    np.testing.assert_array_equal(np.array(pl.read_parquet(path)["x"].to_list()), want)
    np.testing.assert_array_equal(tonumpy.load(path)["x"], want)
    exact = tonumpy.load(path, ml_dtypes=True)["x"]
    assert exact.dtype.name == "float8_e4m3fn"
    np.testing.assert_array_equal(exact.view(np.uint8), x.view(torch.uint8).numpy())


def test_other_readers_read_the_same_values(tmp_path: Path) -> None:
    """pyarrow, pandas, polars, DuckDB and datasets read every column with tonumpy's values."""
    import datasets
    import duckdb
    import pandas as pd
    import polars as pl

    path = tmp_path / "x.parquet"
    tonumpy.save(path, _tree())
    back = tonumpy.load(path)
    expected = {
        "logits": back["logits"],
        "labels": back["labels"],
        "flags": back["flags"],
        "hidden.0": back["hidden"][0],
        "hidden.1": back["hidden"][1].astype(np.float32),  # float16 is stored as float32
    }
    table = pq.read_table(path)
    frame = pd.read_parquet(path)
    polars = pl.read_parquet(path)
    duck = duckdb.read_parquet(str(path)).fetchnumpy()
    ds = datasets.Dataset.from_parquet(str(path), cache_dir=str(tmp_path / "cache"))
    ds.set_format("numpy")
    rows = ds[:]
    for name, want in expected.items():
        got = [
            np.array(table.column(name).to_pylist()),
            np.array(
                [np.array(list(r)).tolist() if hasattr(r, "__len__") else r for r in frame[name]]
            ),
            np.array(polars[name].to_list()),
            np.array(
                [np.array(list(r)).tolist() if hasattr(r, "__len__") else r for r in duck[name]]
            ),
            np.asarray(rows[name]),
        ]
        for reader, value in zip(
            ["pyarrow", "pandas", "polars", "duckdb", "datasets"], got, strict=True
        ):
            np.testing.assert_array_equal(
                value.astype(want.dtype), want, err_msg=f"{reader} {name}"
            )


def test_row_group_writer_ragged_rows_without_padding(tmp_path: Path) -> None:
    """Ragged columns: variable-length lists of each row's own shape; load pads with pad_value."""
    path = tmp_path / "r.parquet"
    batches = [{"h": torch.randn(2, 3, 2)}, {"h": torch.randn(1, 5, 2)}]
    with RowGroupWriter(path, ragged=["h"], pad_value=0.0) as writer:
        for b in batches:
            writer.write(tonumpy.to_columns(b))
        writer.close(json.loads(tonumpy.column_structure(batches[0])))
    meta = pq.ParquetFile(path).metadata
    assert meta.num_row_groups == 2
    lengths = [len(r) for r in pq.read_table(path).column("h").to_pylist()]
    assert lengths == [3, 3, 5]  # no padding in the file
    acc = tonumpy.Accumulator(pad_value=0.0)
    for b in batches:
        acc.append(b)
    np.testing.assert_array_equal(tonumpy.load(path)["h"], acc.result()["h"])


def test_other_readers_read_ragged_rows_as_lists(tmp_path: Path) -> None:
    """Variable-length lists: every reader sees each row with its own length, no padding."""
    import datasets
    import duckdb
    import pandas as pd
    import polars as pl

    path = tmp_path / "r.parquet"
    rows = [
        np.arange(3, dtype=np.int64),
        np.arange(1, dtype=np.int64),
        np.arange(2, dtype=np.int64),
    ]
    with RowGroupWriter(path, ragged=["ids"]) as writer:
        writer.write({"ids": rows[:2]})
        writer.write({"ids": rows[2:]})
    want = [r.tolist() for r in rows]
    assert [list(r) for r in pd.read_parquet(path)["ids"]] == want
    assert pl.read_parquet(path)["ids"].to_list() == want
    assert [list(r[0]) for r in duckdb.read_parquet(str(path)).fetchall()] == want
    ds = datasets.Dataset.from_parquet(str(path), cache_dir=str(tmp_path / "cache"))
    assert ds["ids"][:] == want
    assert [r.tolist() for r in tonumpy.load(path)["ids"]] == want


def test_per_row_outputs_round_trip_through_parquet(tmp_path: Path) -> None:
    """Detection-style outputs (a list of per-image dicts) written a batch at a time load back."""
    path = tmp_path / "det.parquet"
    batches = [
        [{"boxes": torch.full((n, 4), float(n)), "labels": torch.arange(n)} for n in sizes]
        for sizes in ((2, 0), (1,))
    ]
    options: dict[str, Any] = {"per_row": (), "ragged": "object"}
    with RowGroupWriter(path, ragged=True) as writer:
        for batch in batches:
            writer.write(tonumpy.to_columns(batch, **options))
        writer.close(json.loads(tonumpy.column_structure(batches[0], **options)))
    back = tonumpy.load(path)
    assert [len(image["labels"]) for image in back] == [2, 0, 1]
    np.testing.assert_array_equal(back[2]["boxes"], np.ones((1, 4), np.float32))


def test_show_reads_the_metadata_only(tmp_path: Path) -> None:
    """show needs no column data (a damaged data page shows); load reads it and refuses."""
    path = tmp_path / "x.parquet"
    tonumpy.save(path, {"x": np.arange(1000, dtype=np.float64)})
    raw = bytearray(path.read_bytes())
    raw[4:12] = b"\xff" * 8  # the first page header, right after the magic
    path.write_bytes(bytes(raw))
    out = io.StringIO()
    assert tonumpy.cli.main(["show", str(path)], stdout=out, stderr=io.StringIO()) == 0
    assert "(1000,)" in out.getvalue()
    with pytest.raises(tonumpy.FileFormatError, match=r"x\.parquet"):
        tonumpy.load(path)


def test_row_group_writer_refuses_a_changed_row_shape_and_leaves_nothing(tmp_path: Path) -> None:
    """A fixed column whose rows change shape is an error naming ragged=; no file appears."""
    path = tmp_path / "f.parquet"
    writer = RowGroupWriter(path)
    writer.write({"h": np.ones((2, 3))})
    with pytest.raises(tonumpy.ConversionError, match=r"ragged=\['h'\]"):
        writer.write({"h": np.ones((2, 4))})
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


def test_convert_npy_directory_to_parquet_and_show(tmp_path: Path) -> None:
    """tonumpy convert preds/ preds.parquet; tonumpy show preds.parquet."""
    preds = tmp_path / "preds"
    acc = tonumpy.Accumulator(directory=preds)
    for i in range(3):
        acc.append({"logits": torch.full((2, 3), float(i)), "ids": torch.arange(2) + 2 * i})
    result = acc.result()
    out = tmp_path / "preds.parquet"
    assert tonumpy.cli.main(["convert", str(preds), str(out)]) == 0
    _same(tonumpy.load(out), tonumpy.load(preds))
    np.testing.assert_array_equal(tonumpy.load(out)["ids"], np.asarray(result["ids"]))
    assert pq.read_table(out).num_rows == 6
    printed = subprocess.run(
        [sys.executable, "-m", "tonumpy", "show", str(out)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "logits" in printed
    assert "ids" in printed


def test_plain_parquet_files_load_as_nested_dicts(tmp_path: Path) -> None:
    """A Parquet file tonumpy did not write: columns by key_path of their names."""
    path = tmp_path / "plain.parquet"
    pq.write_table(
        pa.table(
            {
                "out.a": [1, 2],
                "out.b": pa.array([[1.0, 2.0], [3.0, 4.0]], pa.list_(pa.float64(), 2)),
            }
        ),
        path,
    )
    tree = tonumpy.load(path)
    np.testing.assert_array_equal(tree["out"]["a"], [1, 2])
    assert tree["out"]["b"].shape == (2, 2)


def test_plain_dictionary_encoded_files_load_as_pyarrow_reads_them(tmp_path: Path) -> None:
    """The size check is for files tonumpy wrote: a plain file's dictionary columns load."""
    path = tmp_path / "dict.parquet"
    pq.write_table(pa.table({"x": np.zeros(200_000, np.int64)}), path, use_dictionary=True)
    np.testing.assert_array_equal(tonumpy.load(path)["x"], np.zeros(200_000, np.int64))


def test_a_tree_without_rows_is_refused(tmp_path: Path) -> None:
    """Nothing with a first dimension: no rows to write; the error says what to write instead."""
    with pytest.raises(tonumpy.ConversionError, match=r"\.npz"):
        tonumpy.save(tmp_path / "n.parquet", {"loss": torch.tensor(1.0), "step": 3})
    assert not (tmp_path / "n.parquet").exists()


def test_unsupported_dtypes_are_refused_naming_the_column(tmp_path: Path) -> None:
    """complex has no Parquet form every reader reads."""
    with pytest.raises(tonumpy.ConversionError, match=r"'?z'?.*complex"):
        tonumpy.save(tmp_path / "c.parquet", {"z": torch.ones(2, dtype=torch.complex64)})


def test_pyarrow_is_imported_only_when_used() -> None:
    """import tonumpy, and its file functions, do not import pyarrow."""
    code = "import sys, tonumpy, tonumpy.io, tonumpy.table; print('pyarrow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_missing_pyarrow_names_the_extra(tmp_path: Path) -> None:
    """Without pyarrow: .npz works; Parquet raises MissingDependencyError naming the extra."""
    code = (
        "import sys; sys.modules['pyarrow'] = None; sys.modules['pyarrow.parquet'] = None\n"
        "import numpy as np, tonumpy, tonumpy.io\n"
        f"tonumpy.save({str(tmp_path / 'a.npz')!r}, {{'x': np.ones(2)}})\n"
        "try:\n"
        f"    tonumpy.save({str(tmp_path / 'a.parquet')!r}, {{'x': np.ones(2)}})\n"
        "except ImportError as exc:\n"
        "    assert isinstance(exc, tonumpy.MissingDependencyError), type(exc)\n"
        "    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install pyarrow" in out.stdout
    assert "'parquet' extra" in out.stdout


def _with_meta(src: Path, dst: Path, change: Any) -> Path:
    pf = pq.ParquetFile(src)
    meta = json.loads(pf.metadata.metadata[META_KEY])
    change(meta)
    table = pq.read_table(src)
    pq.write_table(table.replace_schema_metadata({META_KEY: json.dumps(meta)}), dst)
    return dst


def test_hostile_parquet_files_are_refused_under_a_memory_limit(tmp_path: Path) -> None:
    """Metadata that disagrees with the columns, or asks for more than the file holds."""
    good = tmp_path / "good.parquet"
    tonumpy.save(good, {"x": np.ones((4, 3), np.float32), "loss": np.float32(1.0)})

    def rows(meta: dict[str, Any]) -> None:
        meta["rows"] = 10**12

    def shape(meta: dict[str, Any]) -> None:
        meta["columns"]["x"]["shape"] = [10**9]

    def values(meta: dict[str, Any]) -> None:
        meta["values"]["loss"]["shape"] = [10**10]

    def dtype(meta: dict[str, Any]) -> None:
        meta["columns"]["x"]["dtype"] = "int64"

    cases = [
        _with_meta(good, tmp_path / f"{f.__name__}.parquet", f)
        for f in (rows, shape, values, dtype)
    ]
    bomb = tmp_path / "bomb.parquet"  # 10**8 run-length encoded zeros, with tonumpy metadata
    column = pa.array(np.zeros(10**8, dtype=np.int64))
    meta = {
        "format": "tonumpy-parquet",
        "version": 1,
        "rows": 10**8,
        "columns": {"x": {"dtype": "int64", "shape": []}},
        "values": {},
        "structure": None,
    }
    pq.write_table(
        pa.table({"x": column}).replace_schema_metadata({META_KEY: json.dumps(meta)}),
        bomb,
        use_dictionary=True,
        compression="zstd",
    )
    del column
    cases.append(bomb)
    results = run_corpus([["load", str(p)] for p in cases], tmp_path / "run")
    for case, result in zip(cases, results, strict=True):
        assert result["rc"] == 2, (case.name, result)
        assert not result["killed"], case.name
        assert case.name in result["stderr"], result["stderr"]
        assert result["grew_mib"] < 300, (case.name, result["grew_mib"])


def test_save_without_overwrite_leaves_no_temporary_file(tmp_path: Path) -> None:
    """overwrite=False links the finished file into place; its temporary name is removed."""
    tonumpy.save(tmp_path / "x.parquet", {"a": np.arange(3)}, overwrite=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.parquet"]


def test_ragged_bfloat16_column_with_a_pad_value_loads(tmp_path: Path) -> None:
    """A ragged bfloat16 column is padded as float32 values, then given back as bfloat16."""
    rows = [torch.randn(n).bfloat16() for n in (3, 1)]
    with RowGroupWriter(tmp_path / "x.parquet", ragged=["a"], pad_value=0.0) as writer:
        writer.write({"a": [tonumpy.to_numpy(r, ml_dtypes=True) for r in rows]})
    back = tonumpy.load(tmp_path / "x.parquet", ml_dtypes=True)["a"]
    assert str(back.dtype) == "bfloat16"
    assert back.shape == (2, 3)
    np.testing.assert_array_equal(back[1, 1:].astype(np.float32), [0.0, 0.0])
    np.testing.assert_array_equal(back[0].astype(np.float32), rows[0].float().numpy())
