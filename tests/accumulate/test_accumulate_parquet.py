"""``Accumulator(directory=..., format="parquet")``: a row group per batch, read back exactly.

The file loads (``tonumpy.load``) as the in-memory ``Accumulator.result()`` gives the same
batches, value for value; shards of several ranks read as one tree in dataset order; other
Parquet readers read the same values.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import tonumpy
from _helpers.trees import assert_same_tree
from tonumpy import Accumulator, ConversionError, FileFormatError, OptionError
from tonumpy.cli import main

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def _batches(n: int = 4, *, bf16: bool = False) -> list[tuple[dict[str, Any], torch.Tensor]]:
    """Batches of a model's outputs: sequences padded per batch, a loss, plain values."""
    torch.manual_seed(0)
    out = []
    start = 0
    for i in range(n):
        rows, length = (3, 2, 3, 1)[i % 4], (4, 6, 5, 3)[i % 4]
        hidden = torch.randn(rows, length, 5)
        out.append(
            (
                {
                    "logits": torch.randn(rows, 3),
                    "hidden": (hidden.bfloat16() if bf16 else hidden, torch.randn(rows, 2, 2)),
                    "labels": torch.randint(0, 9, (rows, length)),
                    "loss": torch.tensor(0.5 * i),
                    "step": i,
                    "cache": [torch.ones(rows, 7)],
                },
                torch.arange(start, start + rows),
            )
        )
        start += rows
    return out


_OPTIONS: dict[str, Any] = {
    "pad_value": {"labels": -100, (): -1.0},
    "reduce": {"logits": lambda t: t.softmax(-1)},
    "exclude": "cache",
}


def _both(directory: Path, batches: Any, **options: Any) -> tuple[Accumulator, Accumulator]:
    disk = Accumulator(directory=directory, format="parquet", **options)
    memory = Accumulator(**options)
    for batch, index in batches:
        disk.append(batch, index=index)
        memory.append(batch, index=index)
    return disk, memory


def test_load_gives_what_result_gives_in_memory(tmp_path: Path) -> None:
    """Ragged rows padded on load, reduce=, exclude=, per-batch and plain values: all equal."""
    disk, memory = _both(tmp_path / "preds", _batches(), **_OPTIONS)
    expected = memory.result()
    assert_same_tree(disk.result(), expected)
    assert_same_tree(tonumpy.load(tmp_path / "preds"), expected)
    assert expected["labels"].shape == (9, 6)
    assert expected["labels"][0, -1] == -100
    np.testing.assert_array_equal(disk.indices(), np.arange(9))
    assert sorted(p.name for p in (tmp_path / "preds").iterdir()) == [
        "__shard__.json",
        "predictions.parquet",
    ]
    meta = json.loads((tmp_path / "preds" / "__shard__.json").read_text())
    assert meta["storage"] == "parquet"
    assert meta["complete"] is True


def test_one_row_group_per_batch_fixed_and_variable_length_lists(tmp_path: Path) -> None:
    """Fixed row shapes are fixed-size lists; shapes that change become lists without padding."""
    disk, _ = _both(tmp_path / "preds", _batches(), **_OPTIONS)
    disk.close()
    file = pq.ParquetFile(tmp_path / "preds" / "predictions.parquet")
    assert file.metadata.num_row_groups == 4
    schema = file.schema_arrow
    assert schema.field("logits").type == pa.list_(pa.float32(), 3)
    assert schema.field("hidden.1").type == pa.list_(pa.list_(pa.float32(), 2), 2)
    assert schema.field("labels").type == pa.list_(pa.int64())  # ragged: no padding stored
    assert schema.field("hidden.0").type == pa.list_(pa.list_(pa.float32()))
    assert schema.field("__index__").type == pa.int64()
    labels = pq.read_table(tmp_path / "preds" / "predictions.parquet")
    lengths = [len(row) for row in labels.column("labels").to_pylist()]
    assert lengths == [4] * 3 + [6] * 2 + [5] * 3 + [3]


def test_bfloat16_bit_exact_with_ml_dtypes(tmp_path: Path) -> None:
    """bfloat16 rows (ml_dtypes=True) come back bit-exact from result() and load."""
    disk, memory = _both(tmp_path / "preds", _batches(bf16=True), ml_dtypes=True, **_OPTIONS)
    expected = memory.result()
    assert str(expected["hidden"][0].dtype) == "bfloat16"
    assert_same_tree(disk.result(), expected)
    assert_same_tree(tonumpy.load(tmp_path / "preds", ml_dtypes=True), expected)


def test_num_items_cuts_rows_not_per_batch_values(tmp_path: Path) -> None:
    """result(num_items=) as in memory."""
    disk, memory = _both(tmp_path / "preds", _batches(), **_OPTIONS)
    assert_same_tree(disk.result(num_items=5), memory.result(num_items=5))


def test_other_readers_read_the_same_values(tmp_path: Path) -> None:
    """pyarrow, pandas, polars, DuckDB and datasets read the accumulator's rows unpadded."""
    import datasets
    import duckdb
    import pandas as pd
    import polars as pl

    disk, memory = _both(tmp_path / "preds", _batches(), **_OPTIONS)
    disk.close()
    expected = memory.result()
    lengths = np.repeat([4, 6, 5, 3], [3, 2, 3, 1])
    path = tmp_path / "preds" / "predictions.parquet"
    readers = {
        "pyarrow": pq.read_table(path).to_pydict(),
        "pandas": pd.read_parquet(path).to_dict("list"),
        "polars": pl.read_parquet(path).to_dict(as_series=False),
        "duckdb": {k: list(v) for k, v in duckdb.read_parquet(str(path)).fetchnumpy().items()},
        "datasets": datasets.Dataset.from_parquet(
            str(path), cache_dir=str(tmp_path / "cache")
        ).to_dict(),
    }
    for reader, columns in readers.items():
        np.testing.assert_array_equal(columns["__index__"], np.arange(9), err_msg=reader)
        np.testing.assert_array_equal(
            np.array([np.asarray(r, np.float32) for r in columns["logits"]]),
            expected["logits"],
            err_msg=reader,
        )
        for i, labels in enumerate(columns["labels"]):
            got = np.asarray(list(labels))
            assert got.shape == (lengths[i],), reader
            np.testing.assert_array_equal(got, expected["labels"][i, : lengths[i]])
        for i, hidden in enumerate(columns["hidden.0"]):
            got = np.array([np.asarray(list(r), np.float32) for r in hidden])
            np.testing.assert_array_equal(got, expected["hidden"][0][i, : lengths[i]])


def _write_shards(parent: Path, world: int, *, close: bool = True, **options: Any) -> Any:
    """Each rank writes its own Parquet shard of the batches a DistributedSampler deals."""
    batches = _batches(8)
    memory = Accumulator(**options)
    for batch, index in batches:
        memory.append(batch, index=index)
    for rank in range(world):
        acc = Accumulator(directory=parent, shard=(rank, world), format="parquet", **options)
        for batch, index in batches[rank::world]:
            acc.append(batch, index=index)
        if close:
            acc.close(num_items=int(sum(len(i) for _, i in batches)))
    return memory


@pytest.mark.parametrize("world", [1, 3])
def test_parquet_shards_read_as_one_tree_in_dataset_order(tmp_path: Path, world: int) -> None:
    """tonumpy.load(parent) of Parquet shards: rows in dataset order, as for .npy shards."""
    options = {"pad_value": _OPTIONS["pad_value"], "exclude": "cache"}
    memory = _write_shards(tmp_path / "preds", world, **options)
    npy = tmp_path / "npy"
    for rank in range(world):
        acc = Accumulator(directory=npy, shard=(rank, world), **options)
        for batch, index in _batches(8)[rank::world]:
            acc.append(batch, index=index)
        acc.close(num_items=18)
    merged = tonumpy.load(tmp_path / "preds")
    assert_same_tree(merged, tonumpy.load(npy))
    expected = memory.result()
    for name in ("logits", "labels"):
        np.testing.assert_array_equal(merged[name], expected[name])
    np.testing.assert_array_equal(merged["hidden"][0], expected["hidden"][0])
    assert (tmp_path / "preds" / f"rank-00000-of-0000{world}" / "predictions.parquet").is_file()


def test_parquet_shards_show_and_convert(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """show lists a set of Parquet shards; convert writes the merged tree."""
    _write_shards(tmp_path / "preds", 2, pad_value=-1.0, exclude="cache")
    assert main(["show", str(tmp_path / "preds")]) == 0
    assert "tonumpy shards" in capsys.readouterr().out
    assert main(["convert", str(tmp_path / "preds"), str(tmp_path / "one.parquet")]) == 0
    assert_same_tree(tonumpy.load(tmp_path / "one.parquet"), tonumpy.load(tmp_path / "preds"))
    assert main(["show", str(tmp_path / "preds" / "rank-00001-of-00002")]) == 0
    assert "tonumpy parquet directory" in capsys.readouterr().out


def test_incomplete_and_missing_parquet_shards_are_named(tmp_path: Path) -> None:
    """A shard never closed (no footer: no rows readable) and a missing rank are refused."""
    _write_shards(tmp_path / "a", 2, close=False, pad_value=-1.0, exclude="cache")
    with pytest.raises(FileFormatError, match=r"rank-00000-of-00002 is incomplete"):
        tonumpy.load(tmp_path / "a")
    with pytest.raises(FileFormatError, match=r"is incomplete"):
        tonumpy.load(tmp_path / "a" / "rank-00001-of-00002")
    _write_shards(tmp_path / "b", 3, pad_value=-1.0, exclude="cache")
    (tmp_path / "b" / "rank-00002-of-00003").rename(tmp_path / "elsewhere")
    with pytest.raises(FileFormatError, match=r"rank 2 of 3 is missing"):
        tonumpy.load(tmp_path / "b")


def test_num_items_is_verified_for_parquet_shards(tmp_path: Path) -> None:
    """A gap in the indices of Parquet shards is reported as for .npy shards."""
    for rank, items in enumerate([[0, 2], [1]]):
        acc = Accumulator(directory=tmp_path, shard=(rank, 2), format="parquet")
        acc.append({"y": torch.tensor(items)}, index=items)
        acc.close(num_items=4)
    with pytest.raises(FileFormatError, match=r"missing.*3"):
        tonumpy.load(tmp_path)


def test_an_empty_rank_reads_as_no_rows(tmp_path: Path) -> None:
    """A rank that appended nothing closes an empty shard; the set reads without it."""
    acc = Accumulator(directory=tmp_path, shard=(0, 2), format="parquet")
    acc.append({"y": torch.arange(3)}, index=[0, 1, 2])
    acc.close(num_items=3)
    Accumulator(directory=tmp_path, shard=(1, 2), format="parquet").close(num_items=3)
    np.testing.assert_array_equal(tonumpy.load(tmp_path)["y"], np.arange(3))


def test_resume_starts_an_incomplete_parquet_shard_over(tmp_path: Path) -> None:
    """resume=True: a crashed run's Parquet file has no footer, so the shard starts again."""
    acc = Accumulator(directory=tmp_path, shard=(0, 1), format="parquet")
    for i in range(3):
        acc.append({"y": torch.full((2,), i)}, index=[2 * i, 2 * i + 1])
    del acc  # the process dies: the file was never closed
    with pytest.raises(FileFormatError, match="incomplete"):
        tonumpy.load(tmp_path)
    acc = Accumulator(directory=tmp_path, shard=(0, 1), format="parquet", resume=True)
    assert acc.batches == 0
    assert len(acc) == 0
    for i in range(5):
        acc.append({"y": torch.full((2,), i)}, index=[2 * i, 2 * i + 1])
    acc.close(num_items=10)
    assert tonumpy.load(tmp_path)["y"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert [p.name for p in (tmp_path / "rank-00000-of-00001").iterdir() if p.name[0] == "."] == []
    with pytest.raises(FileExistsError, match="complete already"):
        Accumulator(directory=tmp_path, shard=(0, 1), format="parquet", resume=True)
    with pytest.raises(FileExistsError, match="another run"):
        Accumulator(directory=tmp_path, shard=(0, 1), format="parquet")


def test_resume_refuses_a_directory_of_the_other_format(tmp_path: Path) -> None:
    """A .npy run is not continued as Parquet."""
    acc = Accumulator(directory=tmp_path, format="npy")
    acc.append({"y": torch.ones(2)})
    with pytest.raises(FileExistsError, match="other files"):
        Accumulator(directory=tmp_path, format="parquet", resume=True)


def test_no_append_after_close(tmp_path: Path) -> None:
    """A closed Parquet file takes no more rows: the append says so and changes nothing."""
    acc = Accumulator(directory=tmp_path, format="parquet")
    acc.append({"y": torch.ones(2)})
    acc.close()
    with pytest.raises(ConversionError, match="closed"):
        acc.append({"y": torch.ones(2)})
    assert len(acc) == 2
    np.testing.assert_array_equal(acc.result()["y"], np.ones(2, np.float32))


def test_rows_that_are_not_one_per_example_are_refused(tmp_path: Path) -> None:
    """Leaves with different row counts cannot share a table: the error names both."""
    acc = Accumulator(directory=tmp_path, format="parquet")
    with pytest.raises(ConversionError, match=r"one row per example.*\['a'\].*\['b'\]"):
        acc.append({"a": torch.ones(2), "b": torch.ones(3)})


def test_a_changed_dtype_is_refused_naming_the_leaf(tmp_path: Path) -> None:
    """A Parquet column keeps its first dtype; the in-memory accumulator would promote."""
    acc = Accumulator(directory=tmp_path, format="parquet")
    acc.append({"a": torch.ones(2, dtype=torch.int32)})
    with pytest.raises(ConversionError, match=r"\['a'\] holds int64 after int32"):
        acc.append({"a": torch.ones(2, dtype=torch.int64)})
    acc.append({"a": torch.ones(1, dtype=torch.int32)})
    assert acc.result()["a"].tolist() == [1, 1, 1]


def test_options_are_checked() -> None:
    """format= takes npy or parquet; parquet needs a directory."""
    with pytest.raises(OptionError, match=r"'npy'.*'parquet'"):
        Accumulator(directory="x", format="csv")
    with pytest.raises(OptionError, match="pass directory="):
        Accumulator(format="parquet")


def test_appends_from_several_threads_write_whole_batches(tmp_path: Path) -> None:
    """Each batch is one row group, its rows contiguous, whatever thread appended it."""
    import threading

    acc = Accumulator(directory=tmp_path, format="parquet")

    def work(t: int) -> None:
        for i in range(5):
            acc.append({"who": torch.full((3,), 10 * t + i), "x": torch.ones(3, 2) * t})

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    acc.close()
    who = tonumpy.load(tmp_path)["who"].reshape(-1, 3)
    assert (who == who[:, :1]).all()
    assert sorted(who[:, 0].tolist()) == sorted(10 * t + i for t in range(4) for i in range(5))
    assert pq.ParquetFile(tmp_path / "predictions.parquet").metadata.num_row_groups == 20


def test_a_shard_that_claims_an_index_it_lacks_is_refused(tmp_path: Path) -> None:
    """__shard__.json and the file must agree: an indexed shard without its column is refused."""
    acc = Accumulator(directory=tmp_path, shard=(0, 1), format="parquet")
    acc.append({"y": torch.arange(2)})
    acc.close()
    meta_path = tmp_path / "rank-00000-of-00001" / "__shard__.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps(meta | {"indexed": True}))
    with pytest.raises(FileFormatError, match="has no index"):
        tonumpy.load(tmp_path)


def test_a_nested_tensor_is_refused_at_the_first_append(tmp_path: Path) -> None:
    """A jagged (nested) tensor has no column form here: refused, naming it, nothing added."""
    nested = torch.nested.nested_tensor([torch.ones(2), torch.ones(3)], layout=torch.jagged)
    acc = Accumulator(directory=tmp_path, format="parquet")
    with pytest.raises(ConversionError, match=r"\['rows'\] is a nested \(jagged\) tensor"):
        acc.append({"rows": nested, "y": torch.ones(2)})
    acc.append({"rows": torch.ones(2, 3), "y": torch.ones(2)})
    acc.close()
    assert tonumpy.load(tmp_path)["rows"].shape == (2, 3)
