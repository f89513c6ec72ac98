"""Batched predictions: ``concat`` a list of trees, or ``Accumulator`` them batch by batch.

An evaluation loop produces one nested output per batch; the user wants one NumPy array per leaf
at the end. [`concat`][] does it for a list of trees that is already there; an
[`Accumulator`][] takes the batches one at a time, moves each to the host at once (so that
device memory is freed), and keeps them as separate chunks until [`Accumulator.result`][]
copies every chunk once into the final array (amortised O(batch) per append; nothing
accumulated is ever copied again by a later append). With ``directory=`` each leaf grows in a
``.npy`` file instead, for predictions larger than RAM.

Padding (for leaves whose batches differ in a dimension other than the concatenation axis)
lives in ``tonumpy._ragged``, shared with ``tonumpy.gather``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from optree import PyTreeSpec

from . import _options, _ragged, _tree
from ._ragged import PadValue
from .convert import convert_flat, start
from .errors import ConversionError, OptionError

__all__ = ["Accumulator", "concat"]

_Kind = Literal["array", "scalar", "object"]


# ------------------------------------------------------------------------------ structure

_SAME_STRUCTURE = (
    "every batch must have the same keys, fields and lengths (use None-free outputs, or drop "
    "the differing keys before accumulating)"
)


def _structure_error(
    first: PyTreeSpec, other: PyTreeSpec, first_name: str, other_name: str
) -> ConversionError:
    return _tree.structure_error(first, other, first_name, other_name, hint=_SAME_STRUCTURE)


# ------------------------------------------------------------------------------ leaves


def _kind_of(leaf: Any) -> _Kind:
    if isinstance(leaf, np.ndarray):
        return "array" if leaf.ndim else "scalar"
    if isinstance(leaf, np.generic):
        return "scalar"
    return "object"


def _kind_text(kind: _Kind) -> str:
    return {"array": "an array", "scalar": "a 0-d value", "object": "a non-array value"}[kind]


def _rows_first(leaf: Any, kind: _Kind, axis: int) -> np.ndarray:
    """The leaf as an array with the concatenation axis first (0-d values become 1 row)."""
    if kind == "scalar":
        return np.asarray(leaf).reshape(1)
    return np.moveaxis(leaf, axis, 0) if axis else leaf


def _normalise_axis(axis: int, ndim: int, path: tuple[Any, ...], what: str) -> int:
    ax = axis + ndim if axis < 0 else axis
    if not 0 <= ax < ndim:
        raise ConversionError(
            f"axis={axis} is out of bounds for {_tree.format_path(path)} in {what}, which has "
            f"{ndim} dimension(s); pass an axis every array leaf has",
            path=path,
        )
    return ax


def _kind_error(
    path: tuple[Any, ...], first: _Kind, other: _Kind, first_name: str, other_name: str
) -> ConversionError:
    return ConversionError(
        f"{_tree.format_path(path)} is {_kind_text(first)} in {first_name} but "
        f"{_kind_text(other)} in {other_name}; a leaf must be an array (or tensor) with at least "
        "one dimension in every batch, a 0-d value in every batch, or neither in every batch",
        path=path,
    )


def _fill_for(pad_value: PadValue, path: tuple[Any, ...]) -> Callable[[np.dtype[Any]], Any]:
    return lambda dtype: _ragged.pad_value_for(pad_value, path, dtype)


# ------------------------------------------------------------------------------ concat


def concat(
    trees: Sequence[Any] | Iterable[Any],
    /,
    *,
    axis: int = 0,
    pad_value: PadValue = None,
    ml_dtypes: bool = False,
    is_leaf: Callable[[Any], bool] | None = None,
) -> Any:
    """Concatenate a list of trees leaf by leaf into one tree of NumPy arrays.

    Every leaf of the result is that leaf's concatenation along ``axis`` over ``trees``
    (tensors on any device, arrays, or a mix). 0-d leaves are stacked into a 1-d array;
    non-array leaves become a list of the values. A leaf whose batches differ in another
    dimension is padded, in every such dimension, to the largest size, with ``pad_value``;
    padding never changes the dtype. Batches with no rows take no part in the padded shape.

    Examples:
        >>> import numpy as np, torch
        >>> batches = [
        ...     {"ids": torch.tensor([[1, 2]]), "loss": torch.tensor(0.5)},
        ...     {"ids": np.array([[3, 4, 5]]), "loss": torch.tensor(0.25)},
        ... ]
        >>> out = concat(batches, pad_value={"ids": -100})
        >>> out["ids"]
        array([[   1,    2, -100],
               [   3,    4,    5]])
        >>> out["loss"]
        array([0.5 , 0.25], dtype=float32)

    Args:
        trees: The batches: any nesting of containers (as for [`tonumpy.to_numpy`][]), all
            of one structure.
        axis: The axis to concatenate along (negative counts from the end of each leaf).
        pad_value: How to pad leaves whose batches differ in size along another axis: a value
            for every leaf; a mapping from key path to value (a key path is the tuple that
            ``optree.tree_paths`` gives, e.g. ``("labels",)`` or ``("hidden", 2)``; a key
            that is a prefix of a leaf's path covers it, ``()`` covers every leaf, and a bare
            key ``"labels"`` means ``("labels",)``); or a callable ``(path, dtype) -> value``.
            ``None`` (or no value for a leaf) makes ragged batches an error.
        ml_dtypes: Keep bfloat16 and float8 tensors as bit-exact ``ml_dtypes`` arrays instead
            of widening them to float32 (see [`tonumpy.to_numpy`][]).
        is_leaf: Called on each node; a node it returns True for is treated as a leaf.

    Returns:
        One tree of the batches' structure; every array is newly allocated and owns its memory.

    Raises:
        ConversionError: No trees; the trees differ in structure (the message names the first
            differing path); a leaf differs in rank, kind or dtype family across trees; or
            ragged batches have no pad value, or one their dtype cannot represent.
        OptionError: ``axis`` is not an int, ``ml_dtypes`` not a bool, or a ``pad_value``
            callable cannot take ``(path, dtype)``.
    """
    axis = _options.check_axis(axis, "concat")
    _options.check_flag(ml_dtypes, "ml_dtypes", "concat")
    _ragged.check_pad_option(pad_value, "concat")
    trees = list(trees)
    if not trees:
        raise ConversionError("concat() needs at least one tree; got an empty sequence")
    flat: list[list[Any]] = []
    spec0: PyTreeSpec | None = None
    for index, tree in enumerate(trees):
        leaves, spec = _tree.flatten(tree, is_leaf=is_leaf)
        if spec0 is None:
            spec0 = spec
        elif not _tree.same_structure(spec, spec0):
            raise _structure_error(spec0, spec, "trees[0]", f"trees[{index}]")
        flat.append(convert_flat(leaves, spec, ml_dtypes=ml_dtypes))
    assert spec0 is not None  # noqa: S101 - trees is not empty
    paths = spec0.paths()
    out: list[Any] = []
    for i, path in enumerate(paths):
        column = [leaves[i] for leaves in flat]
        kinds = [_kind_of(leaf) for leaf in column]
        for j, kind in enumerate(kinds):
            if kind != kinds[0]:
                raise _kind_error(path, kinds[0], kind, "trees[0]", f"trees[{j}]")
        if kinds[0] == "object":
            out.append(column)
            continue
        if kinds[0] == "scalar":
            chunks = [_rows_first(leaf, "scalar", 0) for leaf in column]
            out.append(_ragged.concat_arrays(chunks, path, fill_for=_fill_for(pad_value, path)))
            continue
        ndims = {leaf.ndim for leaf in column}
        if len(ndims) > 1:  # let target_shape phrase the rank error
            _ragged.target_shape([leaf.shape for leaf in column], path, padded=False, axis=axis)
        ax = _normalise_axis(axis, column[0].ndim, path, "trees[0]")
        chunks = [_rows_first(leaf, "array", ax) for leaf in column]
        out.append(
            _ragged.concat_arrays(chunks, path, fill_for=_fill_for(pad_value, path), axis=ax)
        )
    return _tree.unflatten(spec0, out)


# ------------------------------------------------------------------------------ .npy files

_MAGIC = b"\x93NUMPY\x01\x00"
_BLOCK_BYTES = 16 << 20  # re-layouts copy about this much at a time
#: Re-layouts may rewrite this many bytes, plus twice the bytes appended, before growing
#: dimensions geometrically instead of exactly (rewriting small files early costs nothing).
_REWRITE_SLACK = 64 << 20


def _pwrite(fd: int, data: memoryview, offset: int) -> int:
    if hasattr(os, "pwrite"):
        return os.pwrite(fd, data, offset)
    os.lseek(fd, offset, os.SEEK_SET)  # pragma: no cover - Windows
    return os.write(fd, data)  # pragma: no cover


def _pread(fd: int, n: int, offset: int) -> bytes:
    if hasattr(os, "pread"):
        return os.pread(fd, n, offset)
    os.lseek(fd, offset, os.SEEK_SET)  # pragma: no cover - Windows
    return os.read(fd, n)  # pragma: no cover


def _read_all(fd: int, n: int, offset: int) -> bytes:
    parts = []
    while n > 0:
        part = _pread(fd, n, offset)
        if not part:
            raise OSError(f"unexpected end of file at byte {offset}")
        parts.append(part)
        n -= len(part)
        offset += len(part)
    return b"".join(parts)


def _write_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        written = _pwrite(fd, data, offset)
        data = data[written:]
        offset += written


def _bytes_of(arr: np.ndarray) -> memoryview:
    return np.ascontiguousarray(arr).reshape(-1).view(np.uint8).data


class _NpyFile:
    """One leaf growing along its first axis in a ``.npy`` file (format version 1.0).

    The header is written with room for any row count, and rewritten in place after every
    append, once the batch's bytes are in the file: at every moment the file is a valid
    ``.npy`` whose header counts only complete rows (bytes of a batch whose append was cut
    short lie past the counted rows, where ``np.load`` does not look).

    When a batch is larger than the file's rows in another dimension, the file is rewritten
    (to a temporary file, then renamed over the old one, so a crash leaves one or the other)
    with those dimensions grown: to the exact size while all rewrites so far stay within twice
    the bytes appended plus 64 MiB (the usual case: the largest length shows up early, while
    the file is small), otherwise by half as much again, so that rewrites stay amortised O(1)
    per appended byte even when every batch is longer than the last; the surplus is trimmed
    when the result is read.
    """

    def __init__(self, path: Path, dtype: np.dtype[Any], trailing: tuple[int, ...]) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        self._finalizer = weakref.finalize(self, os.close, self.fd)
        self.reset(dtype, trailing)

    def reset(self, dtype: np.dtype[Any], trailing: tuple[int, ...]) -> None:
        """Empty the file and start it again with rows of ``dtype`` and shape ``trailing``."""
        self.dtype = dtype
        self.trailing = trailing
        self.rows = 0
        self._appended = 0
        self._rewritten = 0
        self._descr = np.lib.format.dtype_to_descr(dtype)
        probe = self._header_text(self._descr, (2**63, *(2**63 for _ in trailing)))
        self._header_len = -(-(len(probe) + 10 + 16) // 64) * 64  # room for any row count
        os.ftruncate(self.fd, 0)
        self._write_header(self.fd)

    @staticmethod
    def _header_text(descr: Any, shape: tuple[int, ...]) -> str:
        return repr({"descr": descr, "fortran_order": False, "shape": shape})

    def _header(self) -> bytes:
        text = self._header_text(self._descr, (self.rows, *self.trailing))
        body = text.ljust(self._header_len - 10 - 1) + "\n"
        return _MAGIC + len(body).to_bytes(2, "little") + body.encode("latin1")

    def _write_header(self, fd: int) -> None:
        _write_all(fd, memoryview(self._header()), 0)

    @property
    def row_bytes(self) -> int:
        return _ragged.nbytes_of(self.trailing, self.dtype)

    def append(self, chunk: np.ndarray, fill: np.ndarray | None) -> None:
        """Write ``chunk`` (rows first, at most the file's trailing shape) after the last row."""
        n = chunk.shape[0]
        if chunk.shape[1:] != self.trailing or chunk.dtype != self.dtype:
            padded = np.empty((n, *self.trailing), dtype=self.dtype)
            _ragged.copy_padded(padded, chunk, fill)
            chunk = padded
        _write_all(self.fd, _bytes_of(chunk), self._header_len + self.rows * self.row_bytes)
        self.rows += n
        self._appended += n * self.row_bytes
        self._write_header(self.fd)

    def grow_to(self, needed: tuple[int, ...], fill: np.ndarray | None) -> None:
        """Make room for rows of trailing shape ``needed`` (rewrites the file if it must)."""
        if all(n <= t for n, t in zip(needed, self.trailing, strict=True)):
            return
        cost = self._rewritten + self.rows * self.row_bytes
        exact = cost <= 2 * self._appended + _REWRITE_SLACK
        new = tuple(
            t if n <= t else (n if exact else max(n, t + t // 2))
            for n, t in zip(needed, self.trailing, strict=True)
        )
        self.relayout(new, fill)

    def relayout(self, trailing: tuple[int, ...], fill: np.ndarray | None) -> None:
        """Rewrite the file with rows of shape ``trailing`` (cropping or padding each row)."""
        old_trailing, old_row = self.trailing, self.row_bytes
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            self.trailing = trailing
            self._write_header(fd)
            new_row = self.row_bytes
            step = max(1, _BLOCK_BYTES // max(1, old_row, new_row))
            keep = tuple(slice(0, min(a, b)) for a, b in zip(old_trailing, trailing, strict=True))
            for start in range(0, self.rows, step):
                n = min(step, self.rows - start)
                raw = _read_all(self.fd, n * old_row, self._header_len + start * old_row)
                block = np.frombuffer(raw, dtype=self.dtype).reshape(n, *old_trailing)
                out = np.empty((n, *trailing), dtype=self.dtype)
                rows_and_keep = (slice(None), *keep)
                cropped = block[rows_and_keep]
                _ragged.copy_padded(out, cropped, fill)
                _write_all(fd, _bytes_of(out), self._header_len + start * new_row)
        except BaseException:
            os.close(fd)
            self.trailing = old_trailing
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, self.path)
        self._finalizer()  # closes the old descriptor
        self.fd = fd
        self._finalizer = weakref.finalize(self, os.close, fd)
        self._rewritten += self.rows * self.row_bytes

    def open(self, rows: int) -> np.ndarray:
        """The first ``rows`` rows, memory-mapped read-only."""
        shape = (rows, *self.trailing)
        if rows == 0 or math.prod(shape) == 0:
            return np.empty(shape, dtype=self.dtype)
        return np.memmap(
            self.path, dtype=self.dtype, mode="r", offset=self._header_len, shape=shape
        )


_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]+")
#: The longest file stem: with a ``-N`` suffix, ``.npy`` and a re-layout's ``.tmp``, names
#: stay well under the 255 bytes most file systems allow.
_MAX_STEM = 200


def _file_stem(path: tuple[Any, ...]) -> str:
    """The file name (without ``.npy``) of the leaf at ``path``: ``hidden.2``, ``logits``.

    Only ``[A-Za-z0-9_-]`` and dots; a name longer than ``_MAX_STEM`` keeps its start and
    ends in ``~`` and a digest of the whole key path, so that long keys that share a start
    still get distinct names (``manifest.json`` maps each file to its key path).

    Examples:
        >>> _file_stem(("hidden", 2)), _file_stem(("a/b", "..")), _file_stem(())
        ('hidden.2', 'a_b._', 'leaf')
        >>> len(_file_stem(("x" * 300,)))
        200
    """
    parts = [_UNSAFE.sub("_", str(p)).strip("_") or "_" for p in path]
    stem = ".".join(parts) or "leaf"
    if len(stem) > _MAX_STEM:
        digest = hashlib.sha1(repr(path).encode("utf-8", "surrogatepass")).hexdigest()[:12]  # noqa: S324 - a name, not security
        stem = f"{stem[: _MAX_STEM - 13]}~{digest}"
    return stem


# ------------------------------------------------------------------------------ slabs

#: Larger than glibc's largest mmap threshold (32 MiB on 64-bit): an allocation this big is
#: always a memory mapping of its own, returned to the system the moment it is freed.
_SLAB_MAX = 48 << 20
_SLAB_MIN = 256 << 10


class _Slabs:
    """Storage for one leaf's chunks: batches are copied, back to back, into large slabs.

    Batch-sized arrays are small enough for the C allocator to serve from its heap, where
    memory freed in the middle stays counted in the process's RSS. Slabs grow from 256 KiB to
    48 MiB, so all but the first few are memory mappings of their own: when
    [`Accumulator.result`][] has copied every chunk of a slab, the slab is unmapped, and
    memory peaks near the result's size instead of the chunks' plus the result's.
    """

    __slots__ = ("buf", "next_size", "used")

    def __init__(self) -> None:
        self.buf: np.ndarray | None = None
        self.used = 0
        self.next_size = _SLAB_MIN

    def store(self, arr: np.ndarray) -> np.ndarray:
        """A copy of ``arr`` (C-contiguous) in a slab; it keeps its slab alive."""
        n = arr.nbytes
        if n == 0 or n >= _SLAB_MAX or arr.dtype.hasobject:
            return np.array(arr, order="C", copy=True)
        if self.buf is None or self.used + n > self.buf.nbytes:
            self.buf = np.empty(max(self.next_size, n), dtype=np.uint8)
            self.used = 0
            self.next_size = min(2 * self.next_size, _SLAB_MAX)
        out = self.buf[self.used : self.used + n].view(arr.dtype).reshape(arr.shape)
        np.copyto(out, arr, casting="no")
        self.used += -(-n // 64) * 64  # the next chunk starts 64-byte aligned
        return out


# ------------------------------------------------------------------------------ Accumulator


class _Leaf:
    """What the accumulator holds for one leaf (one position in the tree)."""

    __slots__ = (
        "axis",
        "chunks",
        "dtype",
        "file",
        "kind",
        "ndim",
        "path",
        "returned",
        "rows",
        "slabs",
        "trailing",
        "values",
    )

    def __init__(self, path: tuple[Any, ...], kind: _Kind, ndim: int, axis: int) -> None:
        self.path = path
        self.kind: _Kind = kind
        self.ndim = ndim
        self.axis = axis
        self.chunks: list[np.ndarray] = []  # rows first
        self.slabs = _Slabs()
        self.values: list[Any] = []  # non-array leaves
        self.rows = 0
        self.dtype: np.dtype[Any] | None = None  # of the rows so far (empty batches aside)
        self.trailing: tuple[int, ...] | None = None  # largest shape after the rows axis
        self.file: _NpyFile | None = None
        self.returned: np.ndarray | None = None  # the array result() handed out and kept


class Accumulator:
    """Collect a model's batched outputs and concatenate them once, at the end.

    ``append`` takes one batch: a tree of tensors (on any device) or arrays, of the same
    structure every time. Each batch is moved to the host right away (a batch with CUDA
    tensors asynchronously: its copies overlap the next step, and the next call collects
    them), so device memory is freed as the loop goes. Appending is amortised O(size of the
    batch): each batch is copied once into the accumulator's storage and not touched again
    until [`result`][] copies it, once, into the final arrays, releasing the storage as it
    goes, so that memory peaks near the result's size. Leaves that differ between batches in a
    dimension other than ``axis`` are padded to the largest size with ``pad_value``, without
    changing their dtype; a missing or unrepresentable pad value is reported by the
    ``append`` that brings the first differing batch, not at the end of the loop.

    With ``directory=``, every array leaf instead grows in a ``.npy`` file in that directory
    (named after its key path: ``logits.npy``, ``hidden.2.npy``; ``manifest.json`` maps files
    to paths and dtypes) and [`result`][] returns read-only memory-mapped arrays: memory
    stays bounded by a few batches whatever the total. The files are plain ``.npy`` files,
    valid after every ``append`` (the header is rewritten, with the new row count, once the
    batch's bytes are written), so after a crash ``np.load`` gives every row of every batch
    whose ``append`` returned. bfloat16/float8 leaves (with ``ml_dtypes=True``) are stored as
    raw 2/1-byte void fields that ``np.load`` returns as ``V2``/``V1``; view them with the
    dtype named in ``manifest.json``. Non-array leaves (and object arrays) stay in memory.

    ``append``, ``len`` and ``result`` may be called from several threads at once, in memory
    and with ``directory=``. Each batch is added whole: its rows are contiguous in the result,
    never interleaved with another batch's, and the batches are in the order their ``append``
    calls added them (for one thread, the order of the calls; across threads, whichever call
    got there first). A CPU batch is converted before the accumulator is locked, so threads
    overlap that part; the copy into the accumulator's storage is made one batch at a time.

    Examples:
        >>> import torch
        >>> acc = Accumulator(pad_value={"labels": -100})
        >>> for length in (3, 5):
        ...     acc.append({"labels": torch.ones(2, length, dtype=torch.int64),
        ...                 "loss": torch.tensor(0.5)})
        >>> len(acc)
        4
        >>> out = acc.result()
        >>> labels, loss = out["labels"], out["loss"]
        >>> labels.shape, labels[0, -1], loss
        ((4, 5), np.int64(-100), array([0.5, 0.5], dtype=float32))
        >>> acc.result(num_items=3)["labels"].shape
        (3, 5)

    Args:
        axis: The axis to concatenate along (negative counts from the end of each leaf);
            ``directory=`` needs ``axis=0``.
        pad_value: How to pad ragged leaves, as for [`tonumpy.concat`][]: a value, a mapping
            from key path to value, or a callable ``(path, dtype) -> value``.
        directory: Grow each array leaf in a ``.npy`` file under this directory (created if
            needed; the files must not exist yet) and return memory-mapped arrays. File names
            are made of the key path's characters that are safe in a file name; a name that
            would be long is cut and ends in a digest of the key path.
        ml_dtypes: As for [`tonumpy.to_numpy`][]: keep bfloat16/float8 bit-exact as
            ``ml_dtypes`` arrays instead of widening them to float32.
        scalars: As for [`tonumpy.to_numpy`][]: 0-d tensors become Python scalars, so such
            a leaf's result is a list of numbers rather than a 1-d array.
        is_leaf: As for [`tonumpy.to_numpy`][]: nodes it returns True for are leaves.

    Raises:
        OptionError: An option has the wrong type or value (``axis=1.5``, ``ml_dtypes=1``, a
            ``pad_value`` callable that cannot take ``(path, dtype)``), ``directory`` is or
            lies below a file, or ``directory=`` comes with an ``axis`` other than 0.
    """

    def __init__(
        self,
        *,
        axis: int = 0,
        pad_value: PadValue = None,
        directory: str | os.PathLike[str] | None = None,
        ml_dtypes: bool = False,
        scalars: bool = False,
        is_leaf: Callable[[Any], bool] | None = None,
    ) -> None:
        axis = _options.check_axis(axis, "Accumulator")
        _options.check_flags("Accumulator", ml_dtypes=ml_dtypes, scalars=scalars)
        _ragged.check_pad_option(pad_value, "Accumulator")
        if directory is not None:
            directory = _options.check_directory(directory, "Accumulator")
        if directory is not None and axis != 0:
            raise OptionError(
                f"directory= grows each .npy file along its first axis, so it needs axis=0 "
                f"(got axis={axis}); move the axis to the front before appending"
            )
        self._axis = axis
        self._pad_value = pad_value
        self._directory = Path(directory) if directory is not None else None
        # Held while a batch is added (and while result() reads): appends from several threads
        # each add a whole batch, one after the other.
        self._lock = threading.Lock()
        self._ml_dtypes = ml_dtypes
        self._scalars = scalars
        self._is_leaf = is_leaf
        self._spec: PyTreeSpec | None = None  # set once a batch is added
        self._expected: PyTreeSpec | None = None  # set once a batch is accepted
        self._leaves: list[_Leaf] = []
        self._batches = 0  # batches added
        self._received = 0  # batches accepted (added, or in flight)
        self._pending: tuple[Any, PyTreeSpec, str] | None = None

    # -- appending -----------------------------------------------------------------------

    def append(self, tree: Any, /) -> None:
        """Add one batch and start moving it to the host.

        CPU batches are converted (and copied) before this returns. A batch with CUDA tensors
        is copied asynchronously: its copies are enqueued on the current stream and overlap
        the next step, and the next call (``append``, ``len`` or ``result``) waits for them;
        the device memory is released then. Problems found in that batch's contents are
        therefore raised by that next call, naming the batch.

        Args:
            tree: The batch: the same structure as every other batch.

        Raises:
            ConversionError: The batch's structure differs from the first batch's (the message
                names the first differing path), a leaf changes kind or rank, or a leaf is
                ragged and has no pad value that fits its dtype. The batch is then not added,
                and the accumulator is left as it was.
        """
        leaves, spec, kinds = _tree.flatten_typed(tree, is_leaf=self._is_leaf)
        expected = self._expected  # checked again under the lock; this spares the conversion
        if expected is not None and not _tree.same_structure(spec, expected):
            raise _structure_error(expected, spec, "batch 0", f"batch {self._received}")
        # Before the lock, so that threads convert in parallel: CPU tensors are converted
        # (zero-copy views, copied into the accumulator's storage under the lock), CUDA
        # tensors' copies enqueued (the next call collects them).
        pending = start(leaves, spec, ml_dtypes=self._ml_dtypes, scalars=self._scalars, kinds=kinds)
        with self._lock:
            name = f"batch {self._received}"
            if self._expected is not None and not _tree.same_structure(spec, self._expected):
                raise _structure_error(self._expected, spec, "batch 0", name)
            self._finish_pending()
            if pending.done():
                self._ingest(pending.result_leaves(), spec, name)
            else:
                self._pending = (pending, spec, name)
            if self._expected is None:
                self._expected = spec
            self._received += 1

    def _finish_pending(self) -> None:
        """Wait for the batch whose copies are in flight, and add it."""
        if self._pending is None:
            return
        pending, spec, name = self._pending
        self._pending = None
        try:
            self._ingest(pending.result_leaves(), spec, name)
        except BaseException:
            if self._spec is None:  # the first batch failed: the next one sets the structure
                self._expected = None
            raise

    def _ingest(self, host: list[Any], spec: PyTreeSpec, name: str) -> None:
        """Check one batch's host leaves against what was accumulated, then add them."""
        states = self._first_states(spec, host) if self._spec is None else self._leaves
        plans = [self._plan(state, leaf, name) for state, leaf in zip(states, host, strict=True)]
        if self._spec is None:
            self._start(spec, states, host)
        for state, plan in zip(states, plans, strict=True):
            self._commit(state, *plan)
        self._batches += 1

    def _first_states(self, spec: PyTreeSpec, host: list[Any]) -> list[_Leaf]:
        states = []
        for path, leaf in zip(spec.paths(), host, strict=True):
            kind = _kind_of(leaf)
            ndim = leaf.ndim if kind == "array" else 0
            axis = _normalise_axis(self._axis, ndim, path, "batch 0") if kind == "array" else 0
            states.append(_Leaf(path, kind, ndim, axis))
        return states

    def _plan(
        self, state: _Leaf, leaf: Any, name: str
    ) -> tuple[Any, np.dtype[Any] | None, tuple[int, ...] | None, np.ndarray | None]:
        """Check one leaf of a new batch against what was accumulated; change nothing.

        Returns the leaf (rows first for arrays), the leaf's dtype and largest trailing shape
        after this batch, and the pad value when the leaf is ragged.
        """
        kind = _kind_of(leaf)
        if kind != state.kind:
            raise _kind_error(state.path, state.kind, kind, "batch 0", name)
        if kind == "object":
            return leaf, None, None, None
        if kind == "array" and leaf.ndim != state.ndim:
            raise ConversionError(
                f"{_tree.format_path(state.path)} has {state.ndim} dimension(s) in batch 0 but "
                f"{leaf.ndim} in {name} (shape {leaf.shape}); every batch of a leaf must have "
                "the same rank",
                path=state.path,
            )
        chunk = _rows_first(leaf, kind, state.axis)
        if chunk.shape[0] == 0:  # an empty batch decides neither dtype nor shape
            return chunk, state.dtype, state.trailing, None
        if state.dtype is None or state.trailing is None:  # the first batch with rows
            return chunk, chunk.dtype, chunk.shape[1:], None
        dtype = self._merge_dtype(state, chunk.dtype)
        shape = chunk.shape[1:]
        if shape == state.trailing:
            return chunk, dtype, shape, None
        trailing = tuple(max(a, b) for a, b in zip(shape, state.trailing, strict=True))
        fill = _ragged.pad_value_for(self._pad_value, state.path, dtype)
        if fill is None:
            shapes = [(state.rows, *state.trailing), chunk.shape]
            _ragged.target_shape(shapes, state.path, padded=False, axis=self._axis)
        return chunk, dtype, trailing, fill

    def _merge_dtype(self, state: _Leaf, dtype: np.dtype[Any]) -> np.dtype[Any]:
        assert state.dtype is not None  # noqa: S101
        if state.file is None or state.file.rows == 0:
            return _ragged.result_dtype([state.dtype, dtype], state.path)
        if dtype == state.dtype or np.can_cast(dtype, state.dtype, "safe"):
            return state.dtype
        raise ConversionError(
            f"{_tree.format_path(state.path)} is {dtype} in this batch but its file holds "
            f"{state.dtype} (from earlier batches), which cannot hold {dtype} safely; cast "
            "the leaf to one dtype before appending",
            path=state.path,
        )

    def _start(self, spec: PyTreeSpec, states: list[_Leaf], host: list[Any]) -> None:
        """Adopt the first batch's structure; with ``directory=``, create one file per leaf."""
        if self._directory is not None:
            _options.check_directory(self._directory, "Accumulator")  # it may have changed
            self._directory.mkdir(parents=True, exist_ok=True)
            used: set[str] = set()  # casefolded: unique on case-insensitive file systems too
            paths: list[Path | None] = []
            for state, leaf in zip(states, host, strict=True):
                if state.kind == "object" or leaf.dtype.hasobject:  # no .npy without pickle
                    paths.append(None)
                    continue
                stem = _file_stem(state.path)
                name, n = stem, 1
                while name.casefold() in used:
                    n += 1
                    name = f"{stem}-{n}"
                used.add(name.casefold())
                paths.append(self._directory / f"{name}.npy")
            for file_path in paths:  # check them all before creating any
                if file_path is not None and file_path.exists():
                    raise FileExistsError(
                        f"{file_path} already exists; Accumulator(directory=...) never "
                        "overwrites predictions: pass a new directory, or delete the old files"
                    )
            for state, leaf, file_path in zip(states, host, paths, strict=True):
                if file_path is not None:
                    chunk = _rows_first(leaf, state.kind, state.axis)
                    state.file = _NpyFile(file_path, chunk.dtype, chunk.shape[1:])
        self._spec = spec
        self._leaves = states
        if self._directory is not None:
            self._write_manifest()

    def _write_manifest(self) -> None:
        """Write ``manifest.json``: which file holds which key path, and its true dtype."""
        assert self._directory is not None  # noqa: S101
        leaves = [
            {
                "file": s.file.path.name,
                "path": [k if isinstance(k, str | int) else repr(k) for k in s.path],
                "dtype": str(s.file.dtype),
            }
            for s in self._leaves
            if s.file is not None
        ]
        text = json.dumps({"format": "tonumpy.Accumulator/1", "leaves": leaves}, indent=2)
        (self._directory / "manifest.json").write_text(text + "\n")

    def _commit(
        self,
        state: _Leaf,
        leaf: Any,
        dtype: np.dtype[Any] | None,
        trailing: tuple[int, ...] | None,
        fill: np.ndarray | None,
    ) -> None:
        if state.kind == "object":
            state.values.append(leaf)
            return
        state.dtype, state.trailing = dtype, trailing
        state.rows += leaf.shape[0]
        if state.file is None:
            state.chunks.append(state.slabs.store(leaf))
            return
        if leaf.shape[0] == 0 or dtype is None or trailing is None:
            return
        file = state.file
        if file.rows == 0 and (file.dtype != dtype or file.trailing != trailing):
            file.reset(dtype, trailing)  # the first rows decide, not an earlier empty batch
            self._write_manifest()
        file.grow_to(trailing, fill)
        if fill is None and leaf.shape[1:] != file.trailing:
            fill = self._fill(state)
        file.append(leaf, fill)

    # -- reading ---------------------------------------------------------------------------

    def __repr__(self) -> str:
        with self._lock:
            parts = [f"batches={self._batches}", f"leaves={len(self._leaves)}"]
            in_flight = self._pending is not None
        if in_flight:
            parts.append("in_flight=1")
        if self._directory is not None:
            parts.append(f"directory={str(self._directory)!r}")
        return f"Accumulator({', '.join(parts)})"

    def __len__(self) -> int:
        """The number of rows so far: those of the first leaf with a rows axis.

        That is the first array leaf (in the tree's leaf order), else the first 0-d leaf (one
        row per batch); for a tree with neither, the number of batches.
        """
        with self._lock:
            self._finish_pending()
            return self._rows()

    def _rows(self) -> int:
        for kind in ("array", "scalar"):
            for state in self._leaves:
                if state.kind == kind:
                    return state.rows
        return self._batches

    def result(self, *, num_items: int | None = None) -> Any:
        """The concatenated tree (of the first batch's structure).

        In memory, each array is built in one allocation, and the chunks it is built from are
        released while it fills, so memory peaks near the result's size, not twice it. The
        returned arrays own their memory and are also kept as the accumulator's storage:
        calling ``result()`` again returns the same arrays if nothing was appended since, and
        appending more then calling ``result()`` builds new arrays (the old ones are left as
        they are). Modify returned arrays in place only once you are done with the accumulator.

        Args:
            num_items: Return only the first ``num_items`` rows of every leaf (leaves with
                fewer rows, such as a per-batch loss, keep them all): typically the dataset's
                length, to drop the samples a distributed sampler repeated to even out ranks.

        Returns:
            A tree of arrays (memory-mapped with ``directory=``) and lists (non-array leaves).

        Raises:
            ConversionError: Nothing was appended, or ``num_items`` is more than ``len(self)``.
            OptionError: ``num_items`` is not ``None`` or an int ``>= 0``.
        """
        num_items = _options.check_num_items(num_items, "result")
        with self._lock:
            self._finish_pending()
            if self._spec is None:
                raise ConversionError(
                    "result() was called before any append(); there is nothing to concatenate"
                )
            rows = self._rows()
            if num_items is not None and num_items > rows:
                raise ConversionError(
                    f"num_items={num_items} but the accumulator holds {rows} rows; pass a "
                    "number between 0 and len(accumulator)"
                )
            out = [self._leaf_result(state, num_items) for state in self._leaves]
            return _tree.unflatten(self._spec, out)

    def _leaf_result(self, state: _Leaf, num_items: int | None) -> Any:
        rows = state.rows if state.kind != "object" else len(state.values)
        keep = rows if num_items is None else min(rows, num_items)
        if state.kind == "object":
            return state.values[:keep]
        if state.file is not None:
            file = state.file
            if file.rows and state.trailing is not None and file.trailing != state.trailing:
                file.relayout(state.trailing, self._fill(state))  # trim a geometric surplus
            return file.open(keep)
        chunks = state.chunks
        returned = state.returned
        if (
            returned is not None
            and keep == rows
            and len(chunks) == 1
            and (chunks[0] is returned or chunks[0].base is returned)
        ):
            return returned
        out = _ragged.concat_arrays(
            chunks,
            state.path,
            fill_for=_fill_for(self._pad_value, state.path),
            axis=state.axis,
            rows=keep,
            consume=True,
        )
        moved = np.moveaxis(out, state.axis, 0) if state.axis else out
        chunks.insert(0, moved)
        state.returned = out
        return out

    def _fill(self, state: _Leaf) -> np.ndarray | None:
        assert state.dtype is not None  # noqa: S101
        return _ragged.pad_value_for(self._pad_value, state.path, state.dtype)
