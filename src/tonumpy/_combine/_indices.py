"""Dataset indices: every row's item number, rows put back in dataset order, and the proof.

``Accumulator.append(batch, index=...)`` keeps one dataset index per row. ``gather`` (every
rank's indices travel with its metadata) and the reader of a set of shards
(``tonumpy._rowfiles._shards``) then call [`resolve`][tonumpy._combine._indices.resolve] on the
indices of every rank, in rank order, to learn where each row goes: rows sorted by index, repeats
dropped, and, with ``num_items``, a check that every index of ``range(num_items)`` appears exactly
once.

Telling the padding of a sampler from a genuine duplicate (the rule, documented in
``docs/guides/scale-shards.md``): padding samplers (``DistributedSampler``, accelerate's
``even_batches``) repeat items **at the end** of a rank's stream, **to give every rank the same
number of rows**. So a row whose index appears elsewhere too is taken as padding, and dropped,
only when

* it lies in the run of such rows that ends its rank's rows (its rank's *tail*), and
* there are several ranks and every one holds the same number of rows (a padding sampler's
  whole purpose; one process is never padded);

the occurrence kept is the first one outside a tail (else the first one). Any other repeat (two
occurrences outside tails, or a repeat while ranks hold different numbers of rows) is a
duplicate, an error naming the index and the ranks that hold it: never silently dropped. A
repeat at the very end of an evenly split run is indistinguishable from padding by indices
alone; ``num_items`` still catches the gap such a duplicate usually comes with.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import ConversionError

__all__ = ["as_index", "resolve"]

#: How many indices a message lists before it says how many more there are.
_SHOWN = 8


def as_index(index: Any, rows: int | None, caller: str) -> np.ndarray:
    """``index`` (a tensor, array or sequence of ints) as a 1-d ``int64`` array, checked.

    ``rows``: the number of rows the batch holds, when known; ``caller`` names the call.

    Examples:
        >>> as_index([3, 1, 2], 3, "append")
        array([3, 1, 2])
        >>> as_index([0, -1], 2, "append")
        Traceback (most recent call last):
        ...
        tonumpy.errors.ConversionError: append(index=...): dataset indices are ints >= 0; got -1
    """
    detach = getattr(index, "detach", None)
    if callable(detach):  # a tensor, on any device
        index = detach().cpu().numpy()
    try:
        array = np.asarray(index)
    except (TypeError, ValueError) as exc:
        raise ConversionError(
            f"{caller}(index=...): expected a 1-d sequence of ints (a tensor, an array or a "
            f"list), got {type(index).__name__} ({exc})"
        ) from None
    if array.ndim != 1 or not (array.dtype.kind in "iu" or array.size == 0):
        raise ConversionError(
            f"{caller}(index=...): expected a 1-d sequence of ints (one dataset index per row), "
            f"got {array.ndim}-d {array.dtype} of shape {array.shape}"
        )
    if array.size and array.dtype.kind == "u" and array.max() > np.iinfo(np.int64).max:
        raise ConversionError(f"{caller}(index=...): an index does not fit int64")
    array = array.astype(np.int64, copy=True)
    if array.size and array.min() < 0:
        raise ConversionError(
            f"{caller}(index=...): dataset indices are ints >= 0; got {int(array.min())}"
        )
    if rows is not None and array.size != rows:
        raise ConversionError(
            f"{caller}(index=...): {array.size} indices for a batch of {rows} rows; give one "
            "dataset index per row (batch['idx'], or the sampler's indices for the batch)"
        )
    return array


def _listed(values: np.ndarray, count: int | None = None) -> str:
    """The first few ``values``, and how many more of ``count`` (default: all of them)."""
    shown = ", ".join(str(int(v)) for v in values[:_SHOWN])
    more = (values.size if count is None else count) - _SHOWN
    return f"{shown}, ... ({more} more)" if more > 0 else shown


def _missing(present: np.ndarray, num_items: int) -> tuple[np.ndarray, int]:
    """The first few indices of ``range(num_items)`` not in ``present`` (sorted), and how many.

    Memory follows ``present``, never ``num_items`` (a file may record any number).
    """
    count = num_items - present.size
    first: list[int] = []
    gaps = np.flatnonzero(np.diff(present, prepend=-1) > 1)
    for g in gaps[:_SHOWN]:
        start = int(present[g - 1]) + 1 if g else 0
        first.extend(range(start, min(int(present[g]), start + _SHOWN)))
        if len(first) >= _SHOWN:
            break
    previous = int(present[-1]) if present.size else -1
    if len(first) < _SHOWN:
        first.extend(range(previous + 1, min(num_items, previous + 1 + _SHOWN)))
    return np.array(first[:_SHOWN], dtype=np.int64), count


def _tails(repeated: np.ndarray, counts: Sequence[int]) -> np.ndarray:
    """Per row: whether it lies in the run of repeated rows that ends its rank's rows."""
    tail = np.zeros(repeated.size, dtype=bool)
    start = 0
    for count in counts:
        segment = repeated[start : start + count]
        plain = np.flatnonzero(~segment)
        first = plain[-1] + 1 if plain.size else 0
        tail[start + first : start + count] = True
        start += count
    return tail


def resolve(
    indices: Sequence[np.ndarray], *, num_items: int | None, names: Sequence[str], caller: str
) -> list[np.ndarray]:
    """For each rank, each row's row in the result (dataset order), or ``-1`` (padding).

    ``indices[r]`` are rank ``r``'s rows' dataset indices; ``names[r]`` how messages name rank
    ``r`` (``"rank 1"``, a shard's directory); ``caller`` the call (``"gather"``).

    Examples:
        >>> a, b = np.array([0, 2, 4]), np.array([1, 3, 0])  # DistributedSampler, 5 items
        >>> [m.tolist() for m in resolve([a, b], num_items=5, names=["0", "1"], caller="f")]
        [[0, 2, 4], [1, 3, -1]]

    Raises:
        ConversionError: An index is duplicated (not padding, by the rule of the module); or,
            with ``num_items``, an index of ``range(num_items)`` is missing or one lies outside.
    """
    counts = [int(i.size) for i in indices]
    flat = np.concatenate(list(indices)) if indices else np.empty(0, np.int64)
    if flat.size == 0:
        unique = inverse = occurrences = flat
    else:
        unique, inverse, occurrences = np.unique(flat, return_inverse=True, return_counts=True)
    repeated = occurrences[inverse] > 1 if flat.size else np.zeros(0, bool)
    padding_possible = len(counts) > 1 and len(set(counts)) == 1
    tail = _tails(repeated, counts) if padding_possible else np.zeros(flat.size, bool)
    body_counts = np.bincount(inverse[~tail], minlength=unique.size) if flat.size else flat
    rank_of = np.repeat(np.arange(len(counts)), counts)
    duplicated = np.flatnonzero(body_counts > 1) if flat.size else flat
    # the row kept for each index: its first occurrence outside a tail, else its first one
    order = np.lexsort((np.arange(flat.size), tail, inverse)) if flat.size else flat
    starts = np.flatnonzero(np.r_[True, np.diff(inverse[order]) != 0]) if flat.size else flat
    kept = order[starts]
    destination = np.full(flat.size, -1, dtype=np.int64)
    destination[kept] = np.arange(kept.size)
    dropped = flat.size - kept.size - int(np.sum(body_counts[duplicated] - 1))
    problems = []
    if duplicated.size:
        first = unique[duplicated[0]]
        holders = sorted({names[r] for r in rank_of[flat == first]})
        problems.append(
            f"{duplicated.size} duplicated ({_listed(unique[duplicated])}; index {int(first)} "
            f"is held by {' and '.join(holders)})"
        )
    if num_items is not None:
        outside = unique[unique >= num_items]
        missing, count = _missing(unique[unique < num_items], num_items)
        if count:
            problems.append(f"{count} missing ({_listed(missing, count)})")
        if outside.size:
            problems.append(f"{outside.size} outside range({num_items}) ({_listed(outside)})")
    if problems:
        padded = np.unique(flat[tail & (destination < 0)])
        padding = (
            f"; {dropped} repeated row{'s' if dropped != 1 else ''} at the end of ranks that "
            f"all hold the same number of rows were taken as a sampler's padding (of "
            f"{_listed(padded)})"
            if dropped
            else ""
        )
        expected = (
            f"every index of range({num_items}) exactly once"
            if num_items is not None
            else ("each dataset index at most once")
        )
        raise ConversionError(
            f"{caller}(): the rows' dataset indices must hold {expected}: "
            f"{'; '.join(problems)}{padding}. A duplicate means an item was predicted twice "
            "(a streaming dataset not split by rank, a rank that ran twice); a missing index, "
            "an item no rank predicted (drop_last=True, a crashed rank, a split that left "
            "items out)"
        )
    starts_of = np.cumsum([0, *counts])
    return [destination[starts_of[r] : starts_of[r + 1]] for r in range(len(counts))]
