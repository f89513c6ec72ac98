"""The directory format of ``convert``, written while rows arrive (``Accumulator``, ``gather``).

A directory holds a structure (``__tonumpy__.json``: the tree's containers, keys, each array
leaf's file name and exact dtype, the values of the other leaves) and one ``.npy`` file per
array leaf. [`Directory`][tonumpy._combine._directory.Directory] writes the structure of a tree
whose leaves are [`Column`][tonumpy._combine._columns.Column]s (created exclusively: never another
run's structure), rewrites it (a new file renamed over it) when a column's dtype changes, and
records the values of the non-array leaves at the end. The ``.npy`` files themselves are
``tonumpy._combine._storage``'s.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from optree import PyTreeSpec

from .. import _options, _tree
from .._format import _names, _structure
from ..errors import ConversionError
from ._columns import Column
from ._storage import stored_dtype

__all__ = ["Directory"]


class Directory:
    """The structure file of one directory, and the file name of each array leaf.

    ``caller`` names the caller in messages (``Accumulator``, ``gather``).
    """

    def __init__(self, path: Path, caller: str) -> None:
        self.path = path
        self.caller = caller
        self.structure = path / f"{_names.STRUCTURE}.json"
        self.layout: _structure.Layout | None = None
        self.index: dict[int, int] = {}  # leaf of the tree -> array of the plan
        self.recorded: dict[int, str] = {}  # plan array -> dtype recorded

    def start(
        self, spec: PyTreeSpec, columns: Sequence[Column], ml_dtypes: bool
    ) -> list[Path | None]:
        """Write the structure (exclusively); return the file of each array leaf (else None).

        Raises:
            FileExistsError: The directory holds a structure or one of the files already.
            OptionError: The path is, or lies below, a file.
        """
        _options.check_directory(self.path, self.caller)  # it may have changed meanwhile
        self.path.mkdir(parents=True, exist_ok=True)
        files = self._layout(spec, columns, ml_dtypes)
        existing = [f for f in [self.structure, *files] if f is not None and f.exists()]
        if existing:
            raise FileExistsError(
                f"{existing[0]} already exists; {self.caller}(directory=...) never overwrites "
                "another run's files: pass a new directory, or delete the old files"
            )
        self._record(columns)
        self._write(exclusive=True)
        return files

    def adopt(
        self, spec: PyTreeSpec, columns: Sequence[Column], ml_dtypes: bool, names: list[str]
    ) -> list[Path | None]:
        """As ``start``, for a directory written before (``resume=True``) with array ``names``.

        Every leaf is an array leaf (``resume`` refuses others); the structure is rewritten
        by the first ``update``.

        Raises:
            ConversionError: The tree's array leaves are not the ones the directory holds.
        """
        files = self._layout(spec, [None] * len(columns), ml_dtypes)
        assert self.layout is not None  # noqa: S101
        if self.layout.names != names:
            raise ConversionError(
                f"{self.path} holds the arrays {names[:6]} but the batch's array leaves are "
                f"{self.layout.names[:6]}: resume=True continues a run with the same outputs; "
                "pass the same reduce=/exclude= and model, or a new directory"
            )
        return files

    def _layout(
        self, spec: PyTreeSpec, arrays: Sequence[Column | None], ml_dtypes: bool
    ) -> list[Path | None]:
        """Plan the structure of a tree of columns (``None``: an array leaf, dtype not known).

        Returns the file of each array leaf (else None).
        """
        holders: list[Any] = []
        for column in arrays:
            if column is None:
                holders.append(np.empty(0, np.uint8))
                continue
            dtype = column.dtype
            if column.form == "object" or dtype is None or dtype.hasobject:
                holders.append([])  # kept in memory; written into the structure at the end
            else:
                holders.append(np.empty(0, dtype))
        self.layout = _structure.layout(_tree.unflatten(spec, holders), ml_dtypes=ml_dtypes)
        by_id = {id(h): i for i, h in enumerate(holders)}
        self.index = {by_id[id(h)]: k for k, h in enumerate(self.layout.leaves)}
        files: list[Path | None] = [None] * len(arrays)
        for i, k in self.index.items():
            files[i] = self.path / f"{self.layout.names[k]}.npy"
        return files

    def _record(self, columns: Sequence[Column]) -> bool:
        """Note each array leaf's dtype in the plan; True if anything changed."""
        assert self.layout is not None  # noqa: S101
        changed = False
        for i, k in self.index.items():
            dtype = columns[i].dtype
            if dtype is None or self.recorded.get(k) == str(dtype):
                continue
            self.recorded[k] = str(dtype)
            name = dtype.name if stored_dtype(dtype) != dtype else None
            if name is None:  # promoted from an ml_dtypes type would be an error: clear it
                self.layout.nodes[k].pop("dtype", None)
            self.layout.complete(k, name, str(stored_dtype(dtype)))
            changed = True
        return changed

    def update(self, columns: Sequence[Column]) -> None:
        """Rewrite the structure if a leaf's dtype changed (promoted, or first rows)."""
        if self._record(columns):
            self._write(exclusive=False)

    def finish(self, spec: PyTreeSpec, values: Sequence[Any], ml_dtypes: bool) -> None:
        """Record the non-array leaves' values (``values[i]`` for leaf ``i``) that JSON holds."""
        assert self.layout is not None  # noqa: S101
        holders: list[Any] = []
        for i, value in enumerate(values):
            holders.append(self.layout.leaves[self.index[i]] if i in self.index else value)
        try:
            final = _structure.layout(_tree.unflatten(spec, holders), ml_dtypes=ml_dtypes)
        except ConversionError:  # a value JSON cannot hold: the structure keeps empty lists
            return
        for new, recorded in zip(final.nodes, self.layout.nodes, strict=True):
            new.update(recorded)  # the same arrays, in the same order: keep their dtypes
        self.layout.structure = final.structure
        self.layout.nodes = final.nodes
        self._write(exclusive=False)

    def _write(self, *, exclusive: bool) -> None:
        assert self.layout is not None  # noqa: S101
        data = self.layout.structure_bytes()
        if exclusive:
            fd = os.open(self.structure, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return
        tmp = self.structure.with_name(self.structure.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, self.structure)
