"""What every rank sends ``gather`` before any data, and the plan every rank makes from it.

Each rank's metadata is one [`RankMeta`][tonumpy.distributed._metadata.RankMeta] record (see
[`payload`][tonumpy.distributed._metadata.payload]): a structure fingerprint, each leaf's
description (a [`LeafInfo`][tonumpy.distributed._metadata.LeafInfo]), the options every rank
must pass alike (a [`Signature`][tonumpy.distributed._metadata.Signature]), its sampler's
attributes, which leaves hold one value per batch, and its rows' dataset indices. Every rank
receives every rank's record and runs the same checks on the same data, so a problem anywhere
(a rank that failed to prepare its tree, another structure, dtype or number of dimensions, a
ragged leaf without a pad value, other options) makes *every* rank raise the same error, before
any data moves, instead of leaving the others waiting in a collective.

From the same records every rank then makes the same [`Plan`][tonumpy.distributed._metadata.Plan]
([`agree`][tonumpy.distributed._metadata.agree]): each leaf's column (kind, dtype, padded shape,
pad value), where each rank's rows go, and the rounds in which the bytes travel (each rank's
leaves cut along the concatenation axis into pieces of whole rows, at most about
``chunk_bytes`` per rank and round, a row larger than that alone). The sender packs its
pieces (``_packing``) and the receiver places them (``_destination``) by this one plan;
neither consults the other.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
from optree import PyTreeSpec

from .. import _dtypes, _tree
from .._combine._columns import Column, Form
from .._combine._indices import resolve
from .._combine._pad import PadValue
from ..errors import ConversionError
from ._sampler import SamplerInfo, check_samplers, sample_positions, sampler_info

__all__ = [
    "ALIGN",
    "ARRAY",
    "DTENSOR",
    "JAGGED",
    "OBJECT",
    "PROTOCOL",
    "TENSOR",
    "LeafInfo",
    "Piece",
    "Plan",
    "RankError",
    "RankMeta",
    "Signature",
    "agree",
    "check_all",
    "error_payload",
    "payload",
    "round_size",
]

#: Bumped whenever the metadata layout changes: ranks running different tonumpy versions then
#: raise a clear error instead of misreading each other.
PROTOCOL = 5

# Leaf codes in the metadata.
TENSOR = "t"  # a tensor sent as raw bytes, rebuilt as a tensor of the same dtype
ARRAY = "n"  # an ndarray sent as raw bytes, rebuilt as an ndarray of the same dtype
DTENSOR = "d"  # a DTensor: materialised with full_tensor() after the checks, then sent as bytes
OBJECT = "o"  # anything else: pickled into the metadata
#: The ``dtype`` of an OBJECT leaf that is a converted nested tensor (its ``shape``: ``(rows,)``).
JAGGED = "jagged"

ALIGN = 16  # the largest item size sent (complex128): every piece starts at a multiple of it

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


class LeafInfo(NamedTuple):
    """One leaf of one rank, as its metadata describes it."""

    code: str  #: ``TENSOR``, ``ARRAY``, ``DTENSOR`` or ``OBJECT``
    dtype: Any  #: a torch or NumPy dtype, ``JAGGED``, or None (an object that is no array)
    shape: tuple[int, ...] | None  #: None for an object that is no array
    nbytes: int  #: the bytes sent in rounds (0 for objects)
    payload: bytes | None  #: the pickled value of an object leaf sent in the metadata

    @property
    def form(self) -> Form:
        """How the leaf joins the other ranks' (the column policy's form)."""
        if self.shape is None:
            return "object"
        if isinstance(self.dtype, str) and self.dtype == JAGGED:
            return "jagged"
        return "array" if self.shape else "scalar"

    def rows(self, axis: int) -> int:
        """How many rows a sized leaf has along its (normalised) concatenation axis."""
        assert self.shape is not None  # noqa: S101
        return self.shape[axis] if self.shape else 1

    def numpy_dtype(self, ml_dtypes: bool) -> np.dtype[Any]:
        """The dtype the converted leaf has (what ``concat`` sees)."""
        if self.code in (ARRAY, OBJECT):
            result: np.dtype[Any] = np.dtype(self.dtype)
            return result
        if self.dtype in _dtypes.ML_DTYPES:
            return _dtypes.ml_numpy_dtype(self.dtype) if ml_dtypes else np.dtype(np.float32)
        return np.dtype(str(self.dtype).removeprefix("torch."))


class Signature(NamedTuple):
    """The options every rank must pass alike (``sampler``: whether one was given)."""

    dst: int | None
    axis: int
    num_items: int | None
    sampler: bool
    ml_dtypes: bool
    chunk_bytes: int | None


class RankError(NamedTuple):
    """What a rank raised while preparing its tree."""

    name: str  #: the exception's type name
    message: str
    place: str | None  #: the place in the tree, rendered, or None


class RankMeta(NamedTuple):
    """What one rank sends every other before any data (pickled by ``all_gather_object``).

    Attributes:
        protocol: [`PROTOCOL`][tonumpy.distributed._metadata.PROTOCOL] of the sending rank's
            tonumpy.
        error: What the rank raised preparing its tree, else None (every other field is then
            empty).
        fingerprint: A digest of the tree's structure.
        infos: Each leaf's description, in leaf order.
        signature: The options every rank must pass alike.
        sampler: The sampler's attributes, or None without ``sampler=``.
        per_batch: For each leaf, whether it holds one value per batch (by its Accumulator).
        indices: The rows' dataset indices of an Accumulator given ``index=``, else None.
    """

    protocol: int
    error: RankError | None
    fingerprint: bytes
    infos: list[LeafInfo]
    signature: Signature
    sampler: SamplerInfo | None
    per_batch: tuple[bool, ...]
    indices: np.ndarray | None

    def __reduce__(self) -> tuple[Any, tuple[dict[str, Any]]]:
        """Pickled with the leaves' descriptions as plain tuples.

        A named record costs a Python call to pickle: a millisecond per thousand leaves.
        """
        fields = self._asdict()
        fields["infos"] = list(map(tuple, self.infos))
        return _received, (fields,)


def _received(fields: dict[str, Any]) -> RankMeta:
    """A rank's metadata, unpickled: its leaves' descriptions named again."""
    fields["infos"] = list(map(LeafInfo._make, fields["infos"]))
    return RankMeta(**fields)


class Piece(NamedTuple):
    """Rows ``start:stop`` of leaf ``leaf`` of one rank, at ``offset`` in a round's buffer."""

    leaf: int
    start: int
    stop: int
    offset: int
    nbytes: int


class Plan(NamedTuple):
    """What every rank concludes, alike, from every rank's metadata: how the result is laid out."""

    columns: list[Column]  #: each leaf's column over the ranks (kind, dtype, shape, pad value)
    per_batch: list[bool]  #: for each leaf, whether it holds one value per batch
    maps: list[np.ndarray] | None  #: for each rank, each row's row in the result, or -1
    rounds: list[list[list[Piece]]]  #: ``rounds[k][rank]``: what ``rank`` sends in round ``k``

    @property
    def axes(self) -> list[int]:
        """Each leaf's concatenation axis (normalised)."""
        return [column.axis for column in self.columns]


def _fingerprint(spec: PyTreeSpec) -> bytes:
    text = _ADDRESS.sub("", repr(spec))  # a lambda default_factory's address differs per rank
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


def payload(
    spec: PyTreeSpec,
    infos: list[LeafInfo],
    signature: Signature,
    sampler: Any,
    per_batch: Sequence[bool],
    *,
    indices: np.ndarray | None = None,
) -> RankMeta:
    """One rank's metadata, for ``all_gather_object`` (``error`` None; see ``error_payload``).

    ``sampler`` is the ``DistributedSampler`` given to ``gather`` (or None): its attributes
    are read here.
    """
    return RankMeta(
        protocol=PROTOCOL,
        error=None,
        fingerprint=_fingerprint(spec),
        infos=infos,
        signature=signature,
        sampler=None if sampler is None else sampler_info(sampler),
        per_batch=tuple(per_batch),
        indices=None if indices is None else np.array(indices),  # a memory map: its values
    )


def error_payload(
    exc: BaseException, signature: Signature, spec: PyTreeSpec | None = None
) -> RankMeta:
    """The metadata of a rank that failed to prepare its tree: what it raised, and where.

    ``spec``, the tree's structure, renders the place; without it (the walker refused the
    tree, and its message names the place already) the place is not repeated.
    """
    path = getattr(exc, "path", None)
    place = None if path is None or spec is None else _tree.place(spec, path)
    error = RankError(type(exc).__name__, str(exc), place)
    return RankMeta(PROTOCOL, error, b"", [], signature, None, (), None)


def check_all(metas: Sequence[RankMeta], error: BaseException | None, rank: int) -> None:
    """Raise, on every rank, if any rank failed, runs another protocol or passed other options.

    ``error`` is what this rank raised while preparing its tree, if anything: re-raised as it
    was on the rank that failed.
    """
    for r, meta in enumerate(metas):
        # another version's record may be any tuple: its first field is its protocol
        protocol = meta.protocol if isinstance(meta, RankMeta) else next(iter(meta or ()), None)
        if protocol != PROTOCOL:
            raise ConversionError(
                f"gather(): rank {r} speaks metadata protocol {protocol} but rank {rank} speaks "
                f"{PROTOCOL}; install the same tonumpy version on every rank"
            )
    failed = [r for r, meta in enumerate(metas) if meta.error is not None]
    if failed:
        if error is not None:
            raise error
        reason = metas[failed[0]].error
        assert reason is not None  # noqa: S101
        ranks = ", ".join(map(str, failed))
        raise ConversionError(
            f"gather() failed on rank{'s' if len(failed) > 1 else ''} {ranks}, so every rank "
            f"raises: rank {failed[0]} raised {reason.name}: {reason.message}"
            + (f" (at {reason.place})" if reason.place else "")
        )
    first = metas[0].signature
    for r, meta in enumerate(metas):
        for name, mine, theirs in zip(Signature._fields, meta.signature, first, strict=True):
            if mine != theirs:
                shown, other = repr(theirs), repr(mine)
                if name == "sampler":
                    shown, other = ("given", "None") if theirs else ("None", "given")
                raise ConversionError(
                    f"gather() was called with {name}={shown} on rank 0 but {name}={other} on "
                    f"rank {r}; every rank must pass the same {name}"
                )


def agree(
    metas: Sequence[RankMeta],
    spec: PyTreeSpec,
    exchange: tuple[Any, Any] | None,
    *,
    pad_value: PadValue,
    chunk_bytes: int,
) -> Plan:
    """Every check on every rank's metadata, in order; the result's layout, or the first error.

    The options come from the ranks' signature (alike on every rank: ``check_all``), but
    ``pad_value`` (a callable cannot be compared) and ``chunk_bytes``, the size of a rank's
    share of a round. ``exchange`` is ``(torch.distributed, group)`` when there are other
    ranks (a differing structure takes one more exchange to report, and the bytes travel in
    rounds), ``None`` in a world of one.
    """
    signature = metas[0].signature
    if exchange is not None:
        _check_structure(metas, spec, *exchange)
    columns = _check_columns(metas, spec, signature, pad_value)
    per_batch = _check_per_batch(metas, spec)
    axes = [c.axis for c in columns]
    maps: list[np.ndarray] | None = None
    indices = _check_indices(metas, spec, axes, per_batch, signature.sampler)
    if indices is not None:
        names = [f"rank {r}" for r in range(len(metas))]
        maps = resolve(indices, num_items=signature.num_items, names=names, caller="gather")
    elif signature.sampler:
        samplers = [meta.sampler for meta in metas if meta.sampler is not None]
        check_samplers(samplers, world=len(metas))
        _check_sampled_rows(metas, spec, axes, per_batch, samplers[0].num_samples)
        maps = sample_positions(samplers)
    rounds = [] if exchange is None else _plan_rounds(metas, axes, chunk_bytes)
    return Plan(columns, per_batch, maps, rounds)


def _check_structure(metas: Sequence[RankMeta], spec: PyTreeSpec, dist: Any, group: Any) -> None:
    """Raise, on every rank, if the structure fingerprints differ (one more exchange).

    The ranks then exchange their structures as sketches, and every rank reports the first
    path where the first differing rank's tree parts from rank 0's, as ``concat`` does.
    """
    if all(meta.fingerprint == metas[0].fingerprint for meta in metas):
        return
    sketches: list[Any] = [None] * len(metas)
    dist.all_gather_object(sketches, _tree.sketch(spec), group=group)
    bad = next(r for r, meta in enumerate(metas) if meta.fingerprint != metas[0].fingerprint)
    raise _tree.difference_error(
        sketches[0],
        sketches[bad],
        "rank 0",
        f"rank {bad}",
        hint="every rank must pass the same keys, fields and lengths",
        spec=spec,
    )


def _check_columns(
    metas: Sequence[RankMeta], spec: PyTreeSpec, signature: Signature, pad_value: PadValue
) -> list[Column]:
    """Every leaf's column over the ranks (kind, dtype, padded shape, pad value), or an error.

    The column policy of ``concat``, applied to the metadata alone.
    """
    columns = []
    for i, (path, place) in enumerate(_tree.leaf_paths(spec)):
        column = Column(path, place, axis=signature.axis, pad_value=pad_value, noun="ranks")
        for rank, meta in enumerate(metas):
            info = meta.infos[i]
            form = info.form
            np_dtype = None
            if form not in ("object", "jagged"):
                np_dtype = info.numpy_dtype(signature.ml_dtypes)
            column.commit(column.check(form, np_dtype, info.shape, f"rank {rank}"))
        columns.append(column)
    return columns


def _check_per_batch(metas: Sequence[RankMeta], spec: PyTreeSpec) -> list[bool]:
    """Which leaves hold one value per batch: the same on every rank, or an error."""
    first = metas[0].per_batch
    for rank, meta in enumerate(metas):
        if meta.per_batch == first:
            continue
        i = next(i for i, (a, b) in enumerate(zip(first, meta.per_batch, strict=True)) if a != b)
        path, place = _tree.leaf_path(spec, i)
        holds = "one value per batch" if first[i] else "one row per sample"
        raise ConversionError(
            f"{place} holds {holds} on rank 0 (by its Accumulator) but not on rank {rank}; "
            "pass every rank's Accumulator (gather(acc, ...)), or a plain tree on every rank",
            path=path,
        )
    return list(first)


def _per_sample_rows(
    metas: Sequence[RankMeta],
    axes: Sequence[int],
    per_batch: Sequence[bool],
    forms: tuple[Form, ...],
) -> Iterator[tuple[int, int, int]]:
    """``(leaf, rank, rows)`` of every per-sample leaf of a form in ``forms``, leaf by leaf."""
    for i, axis in enumerate(axes):
        if per_batch[i]:
            continue
        for rank, meta in enumerate(metas):
            info = meta.infos[i]
            if info.form in forms:
                yield i, rank, info.rows(axis if info.form == "array" else 0)


def _check_indices(
    metas: Sequence[RankMeta],
    spec: PyTreeSpec,
    axes: Sequence[int],
    per_batch: Sequence[bool],
    sampler: bool,
) -> list[np.ndarray] | None:
    """Every rank's rows' dataset indices (``None`` if no rank has any), checked everywhere.

    Every rank's Accumulator carries indices, or none does; each per-sample leaf holds one row
    per index.
    """
    indexed = [meta.indices is not None for meta in metas]
    if not any(indexed):
        return None
    if not all(indexed):
        odd = indexed.index(not indexed[0])
        raise ConversionError(
            f"gather(): rank 0's rows {'carry' if indexed[0] else 'do not carry'} dataset "
            f"indices (Accumulator.append(..., index=)) but rank {odd}'s "
            f"{'do not' if indexed[0] else 'do'}; pass index= on every rank or on none"
        )
    if sampler:
        raise ConversionError(
            "gather(acc, sampler=...): the Accumulators' rows carry dataset indices (append(..., "
            "index=)), which place every row already; drop sampler="
        )
    indices = [meta.indices for meta in metas if meta.indices is not None]
    for i, rank, rows in _per_sample_rows(metas, axes, per_batch, ("array",)):
        if rows != indices[rank].size:
            path, place = _tree.leaf_path(spec, i)
            raise ConversionError(
                f"gather(): {place} has {rows} rows on rank {rank} but that rank's "
                f"Accumulator holds {indices[rank].size} dataset indices; every per-sample leaf "
                "holds one row per index",
                path=path,
            )
    return indices


def _check_sampled_rows(
    metas: Sequence[RankMeta],
    spec: PyTreeSpec,
    axes: Sequence[int],
    per_batch: Sequence[bool],
    num_samples: int,
) -> None:
    """Raise unless every per-sample leaf holds one row per sample its rank's sampler gave it.

    Per-sample leaves are the array (and nested tensor) leaves not in ``per_batch``.
    """
    for i, rank, rows in _per_sample_rows(metas, axes, per_batch, ("array", "jagged")):
        if rows != num_samples:
            path, place = _tree.leaf_path(spec, i)
            raise ConversionError(
                f"gather(sampler=...): {place} has {rows} rows along axis {axes[i]} on rank "
                f"{rank}, but the sampler gives that rank {num_samples} samples; every array "
                "leaf must hold one row per sample (do not drop the DataLoader's last batch). "
                "Values with one row per batch (a loss) are told apart when you pass the "
                "Accumulator itself: gather(acc, sampler=...); or gather them in a separate "
                "call without sampler=",
                path=path,
            )


def _plan_rounds(
    metas: Sequence[RankMeta], axes: Sequence[int], chunk_bytes: int
) -> list[list[list[Piece]]]:
    """``rounds[k][rank]``: the pieces rank ``rank`` sends in round ``k`` (the same everywhere).

    Each rank's sized leaves are cut, in leaf order, into pieces of whole rows that fill rounds
    of at most ``chunk_bytes`` (a piece of one row larger than that fills a round alone). The
    ranks send in every round until they run out; there are as many rounds as the rank that
    needs most.
    """
    per_rank = [_rank_rounds(meta.infos, axes, chunk_bytes) for meta in metas]
    count = max(len(rounds) for rounds in per_rank)
    return [[rounds[k] if k < len(rounds) else [] for rounds in per_rank] for k in range(count)]


def _rank_rounds(
    infos: Sequence[LeafInfo], axes: Sequence[int], chunk_bytes: int
) -> list[list[Piece]]:
    """One rank's pieces, round by round (see ``_plan_rounds``)."""
    rounds: list[list[Piece]] = [[]]
    used = 0
    for i, info in enumerate(infos):
        if info.code == OBJECT or not info.nbytes:
            continue
        rows = info.rows(axes[i])
        row_bytes = info.nbytes // rows
        start = 0
        while start < rows:
            take = min(rows - start, (chunk_bytes - used) // row_bytes)
            if take == 0 and used:
                rounds.append([])
                used = 0
                continue
            take = max(take, 1)
            size = take * row_bytes
            rounds[-1].append(Piece(i, start, start + take, used, size))
            used += -(-size // ALIGN) * ALIGN
            start += take
            if used >= chunk_bytes:
                rounds.append([])
                used = 0
    if not rounds[-1]:
        rounds.pop()
    return rounds


def round_size(pieces_by_rank: Sequence[Sequence[Piece]]) -> int:
    """The buffer size of a round: the largest rank's, 16-byte aligned, at least 16 bytes."""
    ends = [p.offset + p.nbytes for pieces in pieces_by_rank for p in pieces]
    return -(-max(1, *ends) // ALIGN) * ALIGN if ends else ALIGN
