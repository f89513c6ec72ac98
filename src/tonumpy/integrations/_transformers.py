"""transformers objects that need more than a generic container: caches and BatchEncoding.

Nothing here imports transformers: a class is recognised by the names along its MRO, so these
rules cost nothing to programs that never hand tonumpy a transformers object.

**Caches.** A forward pass with ``use_cache=True`` returns a ``Cache`` (``DynamicCache`` for
decoders, ``EncoderDecoderCache`` for T5/Whisper/... and ``generate()``). Its tensors are the
data, so tonumpy walks a cache as the layout known as *legacy* ``past_key_values``: a tuple
with one tuple per layer, ``(keys, values)``, or ``(self_keys, self_values, cross_keys,
cross_values)`` for an encoder-decoder cache (``(self_keys, self_values)`` while its
cross-attention part is empty). Every tonumpy function returns a cache in that layout (tuples,
not a ``Cache`` object): rebuilding a live ``Cache`` depends on transformers' internals, which
changed between 4.x and 5.x. A layer whose cache holds other tensors than keys and values
(quantized or linear-attention layers) is refused with [`UnsupportedLeafError`][];
0-d bookkeeping tensors (a sliding window's size, a static layer's position) are dropped.

**BatchEncoding.** Besides its items, a ``BatchEncoding`` from a fast tokenizer keeps one
``tokenizers.Encoding`` per row (``encodings``, behind ``word_ids()``, ``token_to_chars()``,
...). Those are per-row state: they are walked as one leaf, a 1-d object array with one element
per row, so that concatenating batches (``concat``, ``Accumulator``, ``gather``) concatenates,
reorders and truncates them with the rows, and the rebuilt object gets them back as a list.
If the combined rows and encodings cannot line up (batches concatenated along another axis),
the result's ``encodings`` is ``None`` rather than another batch's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .._tree import _containers
from .._tree._containers import NodeError, NodeMeta

_CACHE_MODULE = "transformers.cache_utils"
_ENCODING_MODULE = "transformers.tokenization_utils_base"
_ROWS = "_encodings"  # BatchEncoding's per-row state


def _derives(cls: type[Any], module: str, name: str) -> bool:
    return any(k.__name__ == name and k.__module__ == module for k in cls.__mro__)


def is_cache(cls: type[Any]) -> bool:
    """Whether ``cls`` is a transformers ``Cache`` class (without importing transformers)."""
    return _derives(cls, _CACHE_MODULE, "Cache")


def is_batch_encoding(cls: type[Any]) -> bool:
    """Whether ``cls`` is (a subclass of) transformers' ``BatchEncoding``."""
    return _derives(cls, _ENCODING_MODULE, "BatchEncoding")


# ------------------------------------------------------------------------------ caches


def _big_tensor(value: Any) -> bool:
    """Whether ``value`` is, or directly holds, a tensor with at least one dimension."""
    if isinstance(value, torch.Tensor):
        return value.dim() > 0
    if isinstance(value, dict):
        return any(map(_big_tensor, value.values()))
    if isinstance(value, list | tuple):
        return any(map(_big_tensor, value))
    return False


def _layer_kv(cache: Any, layer: Any, index: int) -> tuple[Any, Any]:
    """A v5 cache layer's ``(keys, values)``; refuses layers with other data."""
    state = vars(layer)
    for name, value in state.items():
        if name not in ("keys", "values") and _big_tensor(value):
            raise NodeError(
                cache,
                f"its layer {index} ({type(layer).__name__}) keeps tensors in .{name}, beside "
                "its keys and values, and tonumpy has no NumPy layout for them",
            )
    return state.get("keys"), state.get("values")


def cache_layers(cache: Any) -> list[tuple[Any, ...]]:
    """The per-layer tensors of a transformers cache, in the legacy ``past_key_values`` layout."""
    state = vars(cache)
    own = state.get("self_attention_cache")
    cross = state.get("cross_attention_cache")
    if own is not None and cross is not None:
        first, second = cache_layers(own), cache_layers(cross)
        if not second:
            return first
        if len(first) != len(second):
            raise NodeError(
                cache,
                f"its self-attention cache has {len(first)} layers but its cross-attention "
                f"cache has {len(second)}",
            )
        return [a + b for a, b in zip(first, second, strict=True)]
    layers = state.get("layers")
    if isinstance(layers, list):  # transformers >= 4.54
        return [_layer_kv(cache, layer, i) for i, layer in enumerate(layers)]
    keys, values = state.get("key_cache"), state.get("value_cache")
    if isinstance(keys, list) and isinstance(values, list) and len(keys) == len(values):
        return list(zip(keys, values, strict=True))  # transformers 4.3x-4.53
    raise NodeError(cache, "it has no per-layer keys and values that tonumpy knows how to read")


def register_cache(cls: type[Any]) -> None:
    """Walk instances of the cache class ``cls`` as their legacy ``past_key_values`` tuples."""

    def flatten(cache: Any) -> tuple[list[tuple[Any, ...]], NodeMeta, range]:
        layers = cache_layers(cache)
        return layers, NodeMeta(cls, len(layers)), range(len(layers))

    def unflatten(meta: NodeMeta, children: tuple[Any, ...]) -> tuple[Any, ...]:
        return tuple(children)

    _containers.register(cls, flatten, unflatten)


# ------------------------------------------------------------------------------ BatchEncoding


def _rows_array(encodings: Any) -> np.ndarray:
    rows = np.empty(len(encodings), dtype=object)
    for i, encoding in enumerate(encodings):  # one by one: never unpack an Encoding
        rows[i] = encoding
    return rows


def _wrap(names: tuple[Any, ...], values: list[Any]) -> None:
    for i, name in enumerate(names):
        if name == _ROWS and isinstance(values[i], list | tuple):
            values[i] = _rows_array(values[i])


def _row_count(data: dict[Any, Any]) -> int | None:
    """The number of rows the array items share (their first dimension), if they agree."""
    counts = {len(v) for v in data.values() if isinstance(v, np.ndarray | torch.Tensor) and v.ndim}
    return counts.pop() if len(counts) == 1 else None


def _unwrap(new: Any, meta: NodeMeta) -> None:
    state = vars(new)
    rows = state.get(_ROWS)
    if not isinstance(rows, np.ndarray):
        return
    encodings = list(rows.reshape(-1)) if rows.dtype == object else None
    count = _row_count(state["data"])
    if encodings is not None and count is not None and len(encodings) != count:
        encodings = None  # the rows were combined along another axis: they no longer line up
    state[_ROWS] = encodings


def register_batch_encoding(cls: type[Any]) -> None:
    """A ``UserDict`` whose per-row ``encodings`` travel as a 1-d object array (see above)."""
    _containers.register_userdict(cls, wrap=_wrap, unwrap=_unwrap, config=("_n_sequences",))


def registrar(cls: type[Any]) -> Callable[[type[Any]], None] | None:
    """How the walker registers ``cls`` if it is a cache or a ``BatchEncoding``, else ``None``."""
    if is_cache(cls):
        return register_cache
    if is_batch_encoding(cls):
        return register_batch_encoding
    return None
