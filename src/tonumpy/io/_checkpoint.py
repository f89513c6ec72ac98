"""Hugging Face checkpoint directories (what ``save_pretrained`` writes), read as one tree.

``model.safetensors`` (or ``pytorch_model.bin``), or shards (``model-00001-of-00003.safetensors``
...) joined through their index (``model.safetensors.index.json``), whose ``weight_map`` must
name every tensor the shards hold, each in the shard that holds it. Every file is a regular file
inside the directory (no symbolic links); the tree is the flat mapping of tensor names, in the
index's order.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .._format._fs import check_entry, open_entry, short
from ..errors import FileFormatError
from . import _safetensors

__all__ = ["is_checkpoint", "read"]

_INDEXES = (".safetensors.index.json", ".bin.index.json")
Verify = Callable[[Any], None]


def is_checkpoint(names: list[str]) -> bool:
    """True for the entries of a directory that holds a checkpoint."""
    return "pytorch_model.bin" in names or any(
        n.endswith((".safetensors", *_INDEXES)) for n in names
    )


def read(
    path: Path,
    names: list[str],
    read_torch: Callable[[Path], tuple[Any, Verify | None]],
) -> tuple[dict[str, Any], dict[str, str], Verify | None]:
    """(tensors by name, the shards' ``__metadata__`` if they agree, a checksum verifier).

    ``read_torch`` reads a ``.bin`` shard: (its tree, its verifier).

    Raises:
        FileFormatError: The index is damaged or disagrees with the shards, a shard is missing,
            is a symbolic link, or is not a regular file.
    """
    shards, weight_map = _shards(path, names)
    loaded: dict[str, tuple[Any, str]] = {}
    metadata: list[dict[str, str]] = []
    checks: list[Verify] = []
    for shard in shards:
        shard_path = check_entry(path, shard)
        if shard.endswith(".safetensors"):
            tensors, shard_metadata = _safetensors.read(shard_path)
            metadata.append(shard_metadata)
        else:
            tensors, check = read_torch(shard_path)
            if not isinstance(tensors, dict):
                raise FileFormatError(f"{shard_path}: not a state dict of tensors")
            if check is not None:
                checks.append(check)
        for name, tensor in tensors.items():
            if name in loaded:
                raise FileFormatError(
                    f"{path}: tensor {short(name)} is in both {loaded[name][1]} and {shard}"
                )
            loaded[name] = (tensor, shard)
    order = list(loaded) if weight_map is None else _check_index(path, weight_map, loaded)
    same = bool(metadata) and all(m == metadata[0] for m in metadata)
    verify = None
    if checks:

        def verify(leaf: Any) -> None:
            for check in checks:
                check(leaf)

    return {name: loaded[name][0] for name in order}, dict(metadata[0]) if same else {}, verify


def _shards(path: Path, names: list[str]) -> tuple[list[str], dict[str, str] | None]:
    """The shard files to read, and the index's weight map if there is one."""
    indexes = [n for n in names if n.endswith(_INDEXES)]
    if len(indexes) > 1:
        raise FileFormatError(f"{path}: holds several indexes ({', '.join(indexes)}); keep one")
    if not indexes:
        shards = [n for n in names if n.endswith(".safetensors")] or ["pytorch_model.bin"]
        if len(shards) > 1:
            raise FileFormatError(
                f"{path}: holds several .safetensors files and no index to join them; read "
                "one of them"
            )
        return shards, None
    with open_entry(path, indexes[0]) as f:
        raw = f.read()
    try:
        index = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise FileFormatError(f"{path / indexes[0]}: not valid JSON") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise FileFormatError(f"{path / indexes[0]}: has no weight_map of names to shards")
    return list(dict.fromkeys(weight_map.values())), weight_map


def _check_index(
    path: Path, weight_map: dict[str, str], loaded: dict[str, tuple[Any, str]]
) -> list[str]:
    """The index's order of names, once it agrees with what the shards hold."""
    for name, shard in weight_map.items():
        if loaded.get(name, (None, None))[1] != shard:
            raise FileFormatError(
                f"{path}: the index puts {short(name)} in {shard}, which does not hold it"
            )
    extra = [name for name in loaded if name not in weight_map]
    if extra:
        raise FileFormatError(
            f"{path}: {loaded[extra[0]][1]} holds {short(extra[0])}, which the index does not "
            f"list ({len(extra)} such tensors)"
        )
    return list(weight_map)
