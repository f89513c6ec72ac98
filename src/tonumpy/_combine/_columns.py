"""The column policy: how one leaf combines across chunks (batches, ranks or captured calls).

[`tonumpy.concat`][], [`tonumpy.Accumulator`][] (in memory and with ``directory=``),
[`tonumpy.gather`][] and [`tonumpy.Activations.concat`][] all join, for every place in a tree,
the values it holds in each chunk. A [`Column`][tonumpy._combine._columns.Column] decides, the same
way for all of them, chunk by chunk:

* **form**: an array with at least one dimension (concatenated along ``axis``), a 0-d value
  (one row per chunk: a loss), a nested (jagged) tensor (converted to a list of arrays, one per
  row: the rows of all chunks join into one list, as ``torch.cat`` joins nested tensors along
  dim 0) or anything else (a list with one value per chunk); a leaf keeps its form in every
  chunk;
* **rank and axis**: an array leaf keeps its number of dimensions, and ``axis`` (negative counts
  from the end) must be one of them;
* **dtype**: chunks may differ in dtype only where one dtype holds every value of the others
  exactly. The result is then NumPy's promoted dtype (``int16`` and ``int32`` give ``int32``,
  ``uint8`` and ``int16`` give ``int16``, ``float16`` and ``float32`` give ``float32``,
  ``int32`` and ``float64`` give ``float64``); any other mix (``int64`` and ``float64``,
  ``int64`` and ``uint64``, ``bool`` and ``float16``... where values would be rounded) is an
  error naming the leaf. Chunks with no rows decide nothing, unless every chunk is empty;
* **shape**: every dimension but ``axis`` is padded to its largest size over the chunks (chunks
  with no rows take no part), with the leaf's ``pad_value`` (``tonumpy._combine._pad``), which must
  fit the result dtype exactly: padding never changes a dtype. Without a pad value, chunks that
  differ there are an error naming the leaf and the shapes.

[`concat_arrays`][tonumpy._combine._columns.concat_arrays] then builds the result in one allocation,
every byte written once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from optree import PyTreeSpec

from .. import _tree
from .._dtypes import is_ml_dtype
from ..errors import ConversionError
from ._pad import PadValue, pad_value_for

__all__ = [
    "Column",
    "Form",
    "Jagged",
    "check_chunk",
    "concat_arrays",
    "copy_padded",
    "form_of",
    "join",
    "mark_jagged",
    "rows_first",
]

Form = Literal["array", "scalar", "jagged", "object"]

_FORM_TEXT = {
    "array": "an array",
    "scalar": "a 0-d value",
    "jagged": "a nested (jagged) tensor",
    "object": "a non-array value",
}


class Jagged(list):  # type: ignore[type-arg]
    """A converted nested tensor: its rows (one array each), marked as such while it is joined.

    Only the joining code sees this type; results hold plain lists.
    """

    __slots__ = ()


def mark_jagged(originals: Sequence[Any], converted: list[Any]) -> list[Any]:
    """``converted`` with each converted nested tensor (a list, from a tensor) marked ``Jagged``.

    Examples:
        >>> import torch
        >>> nt = torch.nested.nested_tensor([torch.ones(1), torch.ones(2)], layout=torch.jagged)
        >>> [type(v).__name__ for v in mark_jagged([nt, [1]], [[1, 2], [1]])]
        ['Jagged', 'list']
    """
    for i, value in enumerate(converted):
        if type(value) is list and isinstance(originals[i], torch.Tensor):
            converted[i] = Jagged(value)
    return converted


def form_of(leaf: Any) -> Form:
    """A leaf's form: ``"array"``, ``"scalar"`` or ``"object"``.

    An array has at least one dimension; a scalar is a 0-d array or a NumPy scalar; anything
    else (Python numbers included: they are collected in a list) is an object; a converted
    nested tensor marked [`Jagged`][tonumpy._combine._columns.Jagged] is ``"jagged"``.
    """
    if isinstance(leaf, Jagged):
        return "jagged"
    if isinstance(leaf, np.ndarray):
        return "array" if leaf.ndim else "scalar"
    if isinstance(leaf, np.generic):
        return "scalar"
    return "object"


def rows_first(leaf: Any, form: Form, axis: int) -> np.ndarray:
    """The leaf as an array with the concatenation axis first (a 0-d value becomes 1 row)."""
    if form == "scalar":
        return np.asarray(leaf).reshape(1)
    return np.moveaxis(leaf, axis, 0) if axis else leaf


def _bits(dtype: np.dtype[Any]) -> int:
    """How many bits an integer (or bool) dtype's values need, sign excluded."""
    return 1 if dtype.kind == "b" else dtype.itemsize * 8 - (dtype.kind == "i")


def _numeric(dtype: np.dtype[Any]) -> bool:
    return dtype.kind in "biufc" or is_ml_dtype(dtype)


def _holds_exactly(dtype: np.dtype[Any], result: np.dtype[Any]) -> bool:
    """Whether every value of ``dtype`` converts to ``result`` without change."""
    if dtype == result:
        return True
    if not np.can_cast(dtype, result, "safe"):
        return False
    if dtype.kind in "biu" and (result.kind in "fc" or is_ml_dtype(result)):
        return _bits(dtype) <= int(np.finfo(result).nmant) + 1
    return True


def common_dtype(a: np.dtype[Any], b: np.dtype[Any]) -> np.dtype[Any] | None:
    """The dtype that holds every value of ``a`` and of ``b`` exactly (see the module), or None.

    Examples:
        >>> common_dtype(np.dtype("int16"), np.dtype("uint8"))
        dtype('int16')
        >>> common_dtype(np.dtype("int64"), np.dtype("float64")) is None
        True
        >>> common_dtype(np.dtype("float64"), np.dtype("<U5")) is None  # 1.5 is not '1.5'
        True
    """
    if a == b:
        return a
    if a.kind != b.kind and not (_numeric(a) and _numeric(b)):
        return None  # text, bytes, dates, durations and objects never mix with anything else
    try:
        result = np.result_type(a, b)
    except TypeError:
        return None
    if _holds_exactly(a, result) and _holds_exactly(b, result):
        return result
    return None


class _State(NamedTuple):
    """A column's state after some chunks: what the joined result looks like so far."""

    form: Form | None = None
    first: str = ""  # the first chunk's name
    ndim: int = 0
    axis: int = 0  # non-negative
    rows: int = 0
    dtype: np.dtype[Any] | None = None  # of the chunks with rows
    trailing: tuple[int, ...] | None = None  # the largest shape after the axis (chunks with rows)
    ragged: bool = False  # chunks with rows differ in trailing shape: padding is needed
    empty_dtype: np.dtype[Any] | None = None  # used only while no chunk has rows
    empty_trailing: tuple[int, ...] | None = None
    fill: np.ndarray | None = None  # the pad value for ``dtype``, when ragged
    shapes: tuple[tuple[int, ...], ...] = ()  # a few distinct shapes seen, axis first (messages)


class Column:
    """How the chunks of one leaf combine: check a chunk, then commit it.

    Checking changes nothing, so a caller can check every leaf of a new batch before it
    commits any (a refused batch leaves the column as it was). ``place`` is how messages name
    the leaf (``tree['out'].logits``), ``path`` its key path (the errors' ``.path``).

    Examples:
        >>> col = Column(("ids",), "tree['ids']", axis=0, pad_value=-1)
        >>> for chunk, name in [(np.ones((2, 3), np.int8), "batch 0"),
        ...                     (np.ones((1, 5), np.int16), "batch 1")]:
        ...     col.commit(col.check("array", chunk.dtype, chunk.shape, name))
        >>> col.rows, col.dtype, col.trailing, col.fill
        (3, dtype('int16'), (5,), array(-1, dtype=int16))
    """

    __slots__ = ("_axis_option", "_pad_value", "noun", "path", "place", "state")

    def __init__(
        self,
        path: tuple[Any, ...],
        place: str,
        *,
        axis: int,
        pad_value: PadValue,
        noun: str = "chunks",
    ) -> None:
        self.path = path
        self.place = place
        self.noun = noun  # what the chunks are, in messages: batches, ranks, calls
        self._axis_option = axis
        self._pad_value = pad_value
        self.state = _State()

    # -- what the result looks like
    @property
    def form(self) -> Form | None:
        return self.state.form

    @property
    def axis(self) -> int:
        return self.state.axis

    @property
    def rows(self) -> int:
        return self.state.rows

    @property
    def dtype(self) -> np.dtype[Any] | None:
        state = self.state
        return state.dtype if state.dtype is not None else state.empty_dtype

    @property
    def trailing(self) -> tuple[int, ...] | None:
        state = self.state
        return state.trailing if state.trailing is not None else state.empty_trailing

    @property
    def fill(self) -> np.ndarray | None:
        """The pad value for the result dtype when the chunks differ in shape, else None."""
        return self.state.fill

    def pad_value(self) -> np.ndarray | None:
        """The leaf's pad value for the result dtype, whether or not padding is needed yet.

        Only for a column with rows (its dtype is known).
        """
        dtype = self.dtype
        assert dtype is not None  # noqa: S101 - a column with rows
        return pad_value_for(self._pad_value, self.path, dtype, self.place)

    # -- adding a chunk
    def commit(self, state: _State) -> None:
        """Adopt the state [`check`][tonumpy._combine._columns.Column.check] returned."""
        self.state = state

    def check(self, form: Form, dtype: Any, shape: tuple[int, ...] | None, name: str) -> _State:
        """The column's state with one more chunk; raise if the chunk cannot join.

        ``form``, ``dtype`` and ``shape`` describe the chunk's leaf (``dtype`` and ``shape``
        are ignored for non-array leaves), ``name`` names the chunk in messages (``batch 7``).

        Raises:
            ConversionError: The chunk changes the leaf's form or rank, ``axis`` is not one of
                its dimensions, its dtype and the others' have no common dtype (see the
                module), or its shape differs outside ``axis`` and there is no pad value that
                fits; the message names the leaf, the chunks and the fix.
        """
        state = self.state
        if state.form is None:
            state = state._replace(form=form, first=name)
            if form == "array":
                assert shape is not None  # noqa: S101 - arrays have shapes
                state = state._replace(ndim=len(shape), axis=self._normalise(len(shape), name))
        elif form != state.form:
            raise ConversionError(
                f"{self.place} is {_FORM_TEXT[state.form]} in {state.first} but "
                f"{_FORM_TEXT[form]} in {name}; a leaf must be an array (or tensor) with at "
                f"least one dimension in all the {self.noun}, a 0-d value in all of them, or "
                "neither in all of them",
                path=self.path,
            )
        if form == "object":
            return state._replace(rows=state.rows + 1)
        if form == "jagged":  # ``shape`` is (rows,): a list of per-row arrays
            return state._replace(rows=state.rows + (shape[0] if shape else 0))
        dtype = np.dtype(dtype)
        trailing: tuple[int, ...] = ()
        if form == "scalar":
            rows = 1
        else:
            assert shape is not None  # noqa: S101
            if len(shape) != state.ndim:
                raise ConversionError(
                    f"{self.place} has {state.ndim} dimension(s) in {state.first} but "
                    f"{len(shape)} in {name} (shape {tuple(shape)}): the {self.noun} have "
                    "different numbers of dimensions; a leaf must have the same number in all "
                    "of them",
                    path=self.path,
                )
            ax = state.axis
            rows, trailing = shape[ax], (*shape[:ax], *shape[ax + 1 :])
        if len(state.shapes) < 7 and (rows, *trailing) not in state.shapes:
            state = state._replace(shapes=(*state.shapes, (rows, *trailing)))
        if rows == 0:  # a chunk with no rows decides neither dtype nor shape
            if state.dtype is not None:
                return state
            empty = dtype if state.empty_dtype is None else self._merge(state.empty_dtype, dtype)
            widest = trailing if state.empty_trailing is None else _widest(state, trailing)
            return state._replace(empty_dtype=empty, empty_trailing=widest)
        if state.dtype is None or state.trailing is None:
            return state._replace(rows=state.rows + rows, dtype=dtype, trailing=trailing)
        merged = self._merge(state.dtype, dtype, state.first, name)
        widest = tuple(max(a, b) for a, b in zip(trailing, state.trailing, strict=True))
        ragged = state.ragged or trailing != state.trailing
        fill = state.fill
        if ragged and (fill is None or merged != state.dtype):
            fill = pad_value_for(self._pad_value, self.path, merged, self.place)
            if fill is None:
                axis = self._axis_option
                shown = ", ".join(map(str, state.shapes[:6]))
                more = ", ..." if len(state.shapes) > 6 else ""
                raise ConversionError(
                    f"the {self.noun} of {self.place} differ in size along an axis other than "
                    f"axis={axis} (shapes, axis {axis} first: {shown}{more}; first in {name}); "
                    "pass pad_value= (a value, a mapping from key path to value, or a callable "
                    "(path, dtype) -> value) to pad every such axis to the largest size",
                    path=self.path,
                )
        return state._replace(
            rows=state.rows + rows, dtype=merged, trailing=widest, ragged=ragged, fill=fill
        )

    def _normalise(self, ndim: int, name: str) -> int:
        axis = self._axis_option
        ax = axis + ndim if axis < 0 else axis
        if not 0 <= ax < ndim:
            raise ConversionError(
                f"axis={axis} is out of bounds for {self.place} in {name}, which has {ndim} "
                "dimension(s); pass an axis every array leaf has",
                path=self.path,
            )
        return ax

    def _merge(
        self, have: np.dtype[Any], new: np.dtype[Any], first: str = "", name: str = ""
    ) -> np.dtype[Any]:
        merged = common_dtype(have, new)
        if merged is None:
            between = f" ({first} ... {name})" if name else ""
            raise ConversionError(
                f"the {self.noun} of {self.place} have dtypes {have} and {new}{between}, and "
                "no dtype holds both exactly (mixing signed and unsigned 64-bit integers, or "
                "integers and floats too narrow for them, would round values); cast the leaf "
                "to one dtype first",
                path=self.path,
            )
        return merged


def _widest(state: _State, trailing: tuple[int, ...]) -> tuple[int, ...]:
    assert state.empty_trailing is not None  # noqa: S101
    return tuple(max(a, b) for a, b in zip(trailing, state.empty_trailing, strict=True))


def copy_padded(dst: np.ndarray, src: np.ndarray, fill: np.ndarray | None) -> None:
    """Copy ``src`` into the leading corner of ``dst`` and fill the rest of ``dst`` with ``fill``.

    ``dst`` and ``src`` have the same rank and ``src.shape[i] <= dst.shape[i]``; only the
    padding region is filled, so every element of ``dst`` is written exactly once. ``fill``
    may be ``None`` only when the shapes are equal.

    Examples:
        >>> dst = np.empty((2, 3), dtype=np.int8)
        >>> copy_padded(dst, np.ones((2, 2), dtype=np.int8), np.array(-1, dtype=np.int8))
        >>> dst
        array([[ 1,  1, -1],
               [ 1,  1, -1]], dtype=int8)
    """
    if src.shape == dst.shape:
        np.copyto(dst, src, casting="unsafe")
        return
    assert fill is not None, "copy_padded: shapes differ but there is no pad value"  # noqa: S101
    lead: list[slice] = []
    for size, full in zip(src.shape, dst.shape, strict=True):
        if size < full:
            region = (*lead, slice(size, None))
            dst[region] = fill
        lead.append(slice(0, size))
    np.copyto(dst[tuple(lead)], src, casting="unsafe")


def concat_arrays(
    chunks: list[np.ndarray], column: Column, *, rows: int | None = None, consume: bool = False
) -> np.ndarray:
    """Join the chunks (axis first) that ``column`` checked into one new array.

    * The result is allocated once, of the column's dtype and padded shape, with the
      concatenation axis back at the column's axis, and owns its memory.
    * ``rows`` keeps only the first ``rows`` rows. The padded shape and the dtype are still
      decided by every chunk, so the result equals the full result's first ``rows`` rows.
    * ``consume=True`` removes from the list ``chunks`` what was copied (the chunk straddling
      ``rows`` is replaced by a copy of its remaining rows), dropping each chunk as soon as it
      is copied, last chunk first, so that memory peaks near the larger of the chunks and the
      result, not their sum (provided that freeing a chunk returns its memory to the system:
      ``Accumulator`` keeps its chunks in large memory-mapped slabs for that).

    Examples:
        >>> col = Column(("x",), "tree['x']", axis=0, pad_value=-1.0)
        >>> chunks = [np.ones((1, 2)), np.zeros((1, 3))]
        >>> for i, chunk in enumerate(chunks):
        ...     col.commit(col.check("array", chunk.dtype, chunk.shape, f"batch {i}"))
        >>> concat_arrays(chunks, col)
        array([[ 1.,  1., -1.],
               [ 0.,  0.,  0.]])
    """
    dtype, trailing, axis, fill = column.dtype, column.trailing, column.axis, column.fill
    assert dtype is not None  # noqa: S101 - checked chunks exist
    assert trailing is not None  # noqa: S101
    total = sum(c.shape[0] for c in chunks)
    if rows is not None:
        total = min(total, rows)
    out = np.empty((*trailing[:axis], total, *trailing[axis:]), dtype=dtype)
    view = np.moveaxis(out, axis, 0) if axis else out
    pieces: list[tuple[int, int, int]] = []
    start = 0
    for index, chunk in enumerate(chunks):
        if start >= total and pieces:
            break
        n = min(chunk.shape[0], total - start)
        pieces.append((index, start, n))
        start += n
    for index, start, n in reversed(pieces):
        chunk = chunks[index]
        if n:
            copy_padded(view[start : start + n], chunk[:n], fill)
        if consume:
            if n == chunk.shape[0]:
                del chunks[index]
            elif n:
                chunks[index] = chunk[n:].copy()
        del chunk
    return out


def check_chunk(column: Column, value: Any, name: str) -> _State:
    """``column.check`` for a converted leaf ``value`` (an array, a NumPy scalar or anything)."""
    form = form_of(value)
    if form == "object":
        return column.check(form, None, None, name)
    if form == "jagged":
        return column.check(form, None, (len(value),), name)
    return column.check(form, value.dtype, value.shape, name)


def join(
    chunks: Sequence[Sequence[Any]],
    spec: PyTreeSpec,
    *,
    axis: int,
    pad_value: PadValue,
    name: Callable[[int], str],
    noun: str,
    root: str = "tree",
) -> Any:
    """Join chunks of converted leaves (each a flat list of ``spec``'s leaves) into one tree.

    The column policy applied to every leaf: arrays concatenated along ``axis`` and padded,
    0-d values stacked, anything else listed, each in one allocation. ``name(i)`` names chunk
    ``i`` in messages (``"batch 3"``, ``"rank 1"``), ``noun`` all of them (``"batches"``),
    ``root`` the tree (``"tree"``).
    """
    out: list[Any] = []
    for index, (path, place) in enumerate(_tree.leaf_paths(spec, root)):
        column = Column(path, place, axis=axis, pad_value=pad_value, noun=noun)
        values = [leaves[index] for leaves in chunks]
        for number, value in enumerate(values):
            column.commit(check_chunk(column, value, name(number)))
        if column.form == "object":
            out.append(values)
            continue
        if column.form == "jagged":  # the rows of every chunk, in one list
            out.append([row for rows in values for row in rows])
            continue
        form, ax = column.form, column.axis
        assert form is not None  # noqa: S101 - one chunk at least
        out.append(concat_arrays([rows_first(v, form, ax) for v in values], column))
    return _tree.unflatten(spec, out)
