"""What every rank sends ``gather`` before any data, and the checks made on it everywhere.

Each rank's metadata is one [`RankMeta`][tonumpy.distributed._metadata.RankMeta] record (see
[`payload`][tonumpy.distributed._metadata.payload]): a structure fingerprint, each leaf's
description (``tonumpy.distributed._packing.Info``), the options, its sampler's attributes, which
leaves hold one value per batch, and its rows' dataset indices. Every rank receives every rank's
tuple and runs the same checks on the same data, so a problem anywhere (a rank that failed to
prepare its tree, another structure, dtype or number of dimensions, a ragged leaf without a pad
value, other options) makes *every* rank raise the same error, before any data moves, instead of
leaving the others waiting in a collective.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
from optree import PyTreeSpec

from .. import _tree
from .._combine._columns import Column
from .._combine._indices import resolve
from .._combine._pad import PadValue
from ..errors import ConversionError
from ._packing import Info, info_kind, info_rows, numpy_dtype
from ._sampler import SamplerInfo, check_sampler, sample_positions

__all__ = [
    "OPTIONS",
    "PROTOCOL",
    "Agreement",
    "RankMeta",
    "agree",
    "check_all",
    "check_columns",
    "check_indices",
    "check_per_batch",
    "check_structure",
    "error_payload",
    "payload",
]

#: Bumped whenever the metadata layout changes: ranks running different tonumpy versions then
#: raise a clear error instead of misreading each other.
PROTOCOL = 4

#: The options every rank must pass alike, in the order of the metadata's signature.
OPTIONS = ("dst", "axis", "num_items", "sampler", "ml_dtypes", "chunk_bytes")

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


class RankMeta(NamedTuple):
    """What one rank sends every other before any data (pickled by ``all_gather_object``).

    Attributes:
        protocol: [`PROTOCOL`][tonumpy.distributed._metadata.PROTOCOL] of the sending rank's
        tonumpy. error: ``(exception type name, message, rendered path or None)`` when the rank
            failed to prepare its tree, else None (every other field is then empty).
        fingerprint: A digest of the tree's structure.
        infos: Each leaf's description, in leaf order.
        signature: The options every rank must pass alike, in the order of ``OPTIONS``.
        sampler: The sampler's attributes, or None without ``sampler=``.
        per_batch: For each leaf, whether it holds one value per batch (by its Accumulator).
        indices: The rows' dataset indices of an Accumulator given ``index=``, else None.
    """

    protocol: int
    error: tuple[str, str, str | None] | None
    fingerprint: bytes
    infos: list[Info]
    signature: tuple[Any, ...]
    sampler: SamplerInfo | None
    per_batch: tuple[bool, ...]
    indices: np.ndarray | None


class Agreement(NamedTuple):
    """What every rank concludes, alike, from every rank's metadata: how the result is laid out."""

    columns: list[Column]  #: each leaf's column over the ranks (kind, dtype, shape, pad value)
    per_batch: list[bool]  #: for each leaf, whether it holds one value per batch
    maps: list[np.ndarray] | None  #: for each rank, each row's row in the result, or -1


def agree(
    metas: Sequence[RankMeta],
    spec: PyTreeSpec,
    exchange: tuple[Any, Any] | None,
    *,
    axis: int,
    pad_value: PadValue,
    ml_dtypes: bool,
    sampler: bool,
    num_items: int | None,
) -> Agreement:
    """Every check on every rank's metadata, in order; the result's layout, or the first error.

    ``exchange`` is ``(torch.distributed, group)`` when there are other ranks (a differing
    structure takes one more exchange to report), ``None`` in a world of one.
    """
    if exchange is not None:
        check_structure(metas, spec, *exchange)
    columns = check_columns(metas, spec, axis=axis, pad_value=pad_value, ml_dtypes=ml_dtypes)
    per_batch = check_per_batch(metas, spec)
    axes = [c.axis for c in columns]
    world = len(metas)
    indices = check_indices(metas, spec, axes, per_batch, sampler)
    maps: list[np.ndarray] | None = None
    if indices is not None:
        names = [f"rank {r}" for r in range(world)]
        maps = resolve(indices, num_items=num_items, names=names, where="gather")
    elif sampler:
        samplers = [meta.sampler for meta in metas if meta.sampler is not None]
        infos = [meta.infos for meta in metas]
        check_sampler(samplers, infos, spec.paths(), axes, world=world, per_batch=per_batch)
        maps = sample_positions(samplers)
    return Agreement(columns, per_batch, maps)


def _fingerprint(spec: PyTreeSpec) -> bytes:
    text = _ADDRESS.sub("", repr(spec))  # a lambda default_factory's address differs per rank
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


def payload(
    spec: PyTreeSpec,
    infos: list[Info],
    signature: tuple[Any, ...],
    sampler: SamplerInfo | None,
    per_batch: Sequence[bool],
    *,
    indices: np.ndarray | None = None,
) -> RankMeta:
    """One rank's metadata, for ``all_gather_object`` (``error`` None; see ``error_payload``)."""
    return RankMeta(
        protocol=PROTOCOL,
        error=None,
        fingerprint=_fingerprint(spec),
        infos=infos,
        signature=signature,
        sampler=sampler,
        per_batch=tuple(per_batch),
        indices=indices,
    )


def error_payload(exc: BaseException, signature: tuple[Any, ...]) -> RankMeta:
    """The metadata of a rank that failed to prepare its tree: what it raised, and where."""
    path = getattr(exc, "path", None)
    error = type(exc).__name__, str(exc), None if path is None else _tree.format_path(path)
    return RankMeta(PROTOCOL, error, b"", [], signature, None, (), None)


def check_all(metas: Sequence[RankMeta], error: BaseException | None, rank: int) -> None:
    """Raise, on every rank, if any rank failed, runs another protocol or passed other options.

    ``error`` is what this rank raised while preparing its tree, if anything: re-raised as it
    was on the rank that failed.
    """
    for r, meta in enumerate(metas):
        protocol = meta.protocol if isinstance(meta, RankMeta) else (meta or [None])[0]
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
        name, message, where = reason
        ranks = ", ".join(map(str, failed))
        raise ConversionError(
            f"gather() failed on rank{'s' if len(failed) > 1 else ''} {ranks}, so every rank "
            f"raises: rank {failed[0]} raised {name}: {message}"
            + (f" (at {where})" if where else "")
        )
    for r, meta in enumerate(metas):
        for name, mine, first in zip(OPTIONS, meta.signature, metas[0].signature, strict=True):
            if mine != first:
                shown, other = repr(first), repr(mine)
                if name == "sampler":
                    shown, other = ("given", "None") if first else ("None", "given")
                raise ConversionError(
                    f"gather() was called with {name}={shown} on rank 0 but {name}={other} on "
                    f"rank {r}; every rank must pass the same {name}"
                )


def check_structure(metas: Sequence[RankMeta], spec: PyTreeSpec, dist: Any, group: Any) -> None:
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


def check_columns(
    metas: Sequence[RankMeta],
    spec: PyTreeSpec,
    *,
    axis: int,
    pad_value: PadValue,
    ml_dtypes: bool,
) -> list[Column]:
    """Every leaf's column over the ranks (kind, dtype, padded shape, pad value), or an error.

    The column policy of ``concat``, applied to the metadata alone.
    """
    columns = []
    for i, (path, where) in enumerate(_tree.leaf_paths(spec)):
        column = Column(path, where, axis=axis, pad_value=pad_value, noun="ranks")
        for rank, meta in enumerate(metas):
            info = meta.infos[i]
            kind = info_kind(info)
            jagged_or_object = kind in ("object", "jagged")
            np_dtype = None if jagged_or_object else numpy_dtype(info[0], info[1], ml_dtypes)
            column.commit(column.check(kind, np_dtype, info[2], f"rank {rank}"))
        columns.append(column)
    return columns


def check_per_batch(metas: Sequence[RankMeta], spec: PyTreeSpec) -> list[bool]:
    """Which leaves hold one value per batch: the same on every rank, or an error."""
    first = metas[0].per_batch
    for rank, meta in enumerate(metas):
        if meta.per_batch == first:
            continue
        i = next(i for i, (a, b) in enumerate(zip(first, meta.per_batch, strict=True)) if a != b)
        path, where = _tree.leaf_path(spec, i)
        holds = "one value per batch" if first[i] else "one row per sample"
        raise ConversionError(
            f"{where} holds {holds} on rank 0 (by its Accumulator) but not on rank {rank}; "
            "pass every rank's Accumulator (gather(acc, ...)), or a plain tree on every rank",
            path=path,
        )
    return list(first)


def check_indices(
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
    for i, kind_rows in enumerate(zip(per_batch, axes, strict=True)):
        if kind_rows[0]:
            continue
        for rank, meta in enumerate(metas):
            info = meta.infos[i]
            if info_kind(info) != "array":
                continue
            indices = meta.indices
            assert indices is not None  # noqa: S101 - every rank has indices (checked above)
            rows, count = info_rows(info, kind_rows[1]), indices.size
            if rows != count:
                path, where = _tree.leaf_path(spec, i)
                raise ConversionError(
                    f"gather(): {where} has {rows} rows on rank {rank} but that rank's "
                    f"Accumulator holds {count} dataset indices; every per-sample leaf holds "
                    "one row per index",
                    path=path,
                )
    return [meta.indices for meta in metas if meta.indices is not None]
