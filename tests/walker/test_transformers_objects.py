"""Real transformers objects: KV caches, BatchEncoding, ModelOutput (tiny models, no download).

A cache becomes the legacy ``past_key_values`` layout of arrays (issue 12, item 3); batches of
BatchEncodings keep every batch's per-row encodings, in row order (item 12); an Accumulator
does not keep a ModelOutput batch (or its autograd graph) alive (item 10).
"""

from __future__ import annotations

import gc
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from _helpers.models import tiny_gpt2, tiny_t5
from _helpers.trees import assert_same_tree
from tonumpy import Accumulator, UnsupportedLeafError, apply, concat, to_numpy, to_torch

transformers = pytest.importorskip("transformers")
cache_utils = pytest.importorskip("transformers.cache_utils")


def _gpt2() -> Any:
    return tiny_gpt2().eval()


def _t5() -> Any:
    return tiny_t5().eval()


def _cache_key(out: Any) -> str:
    """``cache`` in transformers 5, ``past_key_values`` in 4.x."""
    return "cache" if "cache" in out else "past_key_values"


def _layers(cache: Any) -> list[tuple[torch.Tensor, ...]]:
    """A cache's per-layer tensors, read with transformers' own API (4.x and 5.x)."""
    if hasattr(cache, "self_attention_cache"):
        own, cross = _layers(cache.self_attention_cache), _layers(cache.cross_attention_cache)
        return [a + b for a, b in zip(own, cross, strict=True)] if cross else own
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache, strict=True))  # pragma: no cover - 4.x


def _cache_arrays(cache: Any) -> tuple[tuple[np.ndarray, ...], ...]:
    """What a cache converts to: per layer, a tuple of its tensors as arrays."""
    return tuple(tuple(t.detach().numpy() for t in layer) for layer in _layers(cache))


# ---------------------------------------------------------------------- caches


def test_gpt2_cache_becomes_per_layer_key_value_arrays() -> None:
    """GPT-2's DynamicCache becomes ((keys, values), ...) of arrays; copy=True shares nothing."""
    model = _gpt2()
    out = model(input_ids=torch.randint(0, 100, (3, 5)), use_cache=True)
    key = _cache_key(out)
    cache = out[key]
    assert isinstance(cache, cache_utils.DynamicCache)
    arrays = to_numpy(out)
    assert_same_tree(arrays[key], _cache_arrays(cache))
    assert arrays[key][0][0].shape == (3, 2, 5, 16)
    copied = to_numpy(out, copy=True)
    assert_same_tree(copied[key], _cache_arrays(cache))
    for layer, tensors in zip(copied[key], _layers(cache), strict=True):
        for array, tensor in zip(layer, tensors, strict=True):
            assert not np.shares_memory(array, tensor.detach().numpy())
    assert type(out[key]) is type(cache)  # the input is untouched


def test_t5_and_generate_encoder_decoder_cache() -> None:
    """T5's EncoderDecoderCache becomes (self_k, self_v, cross_k, cross_v) per layer."""
    model = _t5()
    ids = torch.randint(2, 100, (2, 6))
    out = model(input_ids=ids, decoder_input_ids=ids[:, :3], use_cache=True)
    key = _cache_key(out)
    assert isinstance(out[key], cache_utils.EncoderDecoderCache)
    arrays = to_numpy(out)
    assert_same_tree(arrays[key], _cache_arrays(out[key]))
    assert [len(layer) for layer in arrays[key]] == [4, 4]
    assert arrays[key][0][2].shape == (2, 2, 6, 8)  # cross-attention keys: encoder length
    generated = model.generate(ids, max_new_tokens=3, return_dict_in_generate=True)
    gen_arrays = to_numpy(generated, copy=True)
    assert_same_tree(
        gen_arrays[_cache_key(generated)], _cache_arrays(generated[_cache_key(generated)])
    )
    assert isinstance(gen_arrays["sequences"], np.ndarray)


def test_accumulator_over_batches_with_caches() -> None:
    """Caches accumulate like any leaf: concatenated per layer; no batch is kept alive."""
    model = _gpt2()
    batches = [torch.randint(0, 100, (2, 5)) for _ in range(3)]
    acc = Accumulator()
    kept = []
    for ids in batches:
        out = model(input_ids=ids, use_cache=True)
        key = _cache_key(out)
        kept.append(to_numpy(out, copy=True))
        refs = [weakref.ref(out), weakref.ref(out[key]), weakref.ref(out.logits)]
        acc.append(out)
        del out
        gc.collect()
        assert [r() for r in refs] == [None, None, None]
    result = acc.result()
    assert result.logits.shape == (6, 5, 100)
    for layer in range(2):
        for part in range(2):
            want = np.concatenate([k[key][layer][part] for k in kept])
            np.testing.assert_array_equal(result[key][layer][part], want)
    together = concat(kept)
    np.testing.assert_array_equal(together[key][1][1], result[key][1][1])


def test_apply_and_to_torch_return_the_cache_layout() -> None:
    """apply and to_torch walk a cache as the same layout: tuples of per-layer tensors."""
    model = _gpt2()
    out = model(input_ids=torch.randint(0, 100, (1, 4)), use_cache=True)
    key = _cache_key(out)
    doubled = apply(lambda t: t * 2, out)
    assert type(doubled[key]) is tuple
    want = _layers(out[key])
    torch.testing.assert_close(doubled[key][1][0], want[1][0] * 2)
    back = to_torch(to_numpy(out))
    assert type(back[key][0][1]) is torch.Tensor
    torch.testing.assert_close(back[key][0][1], want[0][1].detach())
    kept = to_numpy(out, is_leaf=lambda x: isinstance(x, cache_utils.Cache))
    assert kept[key] is out[key]  # is_leaf keeps the cache object itself


def test_cache_layer_with_other_tensors_is_refused() -> None:
    """A layer holding more than keys and values (quantized, linear attention) is refused."""
    cache = cache_utils.DynamicCache(
        ddp_cache_data=[(torch.ones(1, 2, 3, 4), torch.ones(1, 2, 3, 4))]
    )
    cache.layers[0].scales = torch.ones(2, 3)
    with pytest.raises(UnsupportedLeafError, match=r"tree\['cache'\].*layer 0.*\.scales") as info:
        to_numpy({"cache": cache})
    assert info.value.path == ("cache",)
    assert "use_cache=False" in str(info.value)


def test_cache_of_transformers_4x_layout() -> None:
    """Caches with ``key_cache``/``value_cache`` lists (transformers 4.3x-4.53) are read too."""

    class ListCache(cache_utils.Cache):  # the 4.x DynamicCache layout
        def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
            self.key_cache = keys
            self.value_cache = values

    k, v = torch.arange(6.0).reshape(1, 1, 2, 3), -torch.arange(6.0).reshape(1, 1, 2, 3)
    out = to_numpy({"pkv": ListCache([k, k + 1], [v, v - 1])})
    assert len(out["pkv"]) == 2
    np.testing.assert_array_equal(out["pkv"][1][0], (k + 1).numpy())
    np.testing.assert_array_equal(out["pkv"][1][1], (v - 1).numpy())


# ---------------------------------------------------------------------- BatchEncoding


def _tokenizer() -> Any:
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[PAD]": 0, "[UNK]": 1, "hello": 2, "world": 3, "foo": 4, "bar": 5, "baz": 6}
    unknown, padding = "[UNK]", "[PAD]"
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token=unknown))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=padding, unk_token=unknown
    )


def test_accumulated_batch_encodings_line_up_with_the_rows(tmp_path: Path) -> None:
    """Every batch's encodings are combined in row order; none is kept for another's rows."""
    tok = _tokenizer()
    single = tok(["hello world", "foo"], padding=True, return_tensors="pt")
    out = to_numpy(single)  # one batch: type, n_sequences and encodings are kept
    assert type(out) is type(single)
    assert isinstance(out["input_ids"], np.ndarray)
    assert out.n_sequences == single.n_sequences
    assert [out.word_ids(i) for i in range(2)] == [single.word_ids(i) for i in range(2)]
    plain = tok(["hello world"])  # lists, not tensors: the encodings stay as well
    assert to_numpy(plain).word_ids(0) == plain.word_ids(0)
    texts = [["hello world", "foo"], ["bar baz foo hello"], ["world", "baz bar", "foo foo"]]
    batches = [tok(t, padding=True, return_tensors="pt") for t in texts]
    want = [b.word_ids(i) for b in batches for i in range(len(b["input_ids"]))]
    acc = Accumulator(pad_value=0)
    for batch in batches:
        acc.append(batch)
    result = acc.result()
    assert result["input_ids"].shape == (6, 4)
    assert [result.word_ids(i) for i in range(6)] == want
    together = concat(batches, pad_value=0)
    assert [together.word_ids(i) for i in range(6)] == want
    first_three = acc.result(num_items=3)
    assert [first_three.word_ids(i) for i in range(3)] == want[:3]
    assert len(first_three.encodings) == 3
    on_disk = Accumulator(pad_value=0, directory=tmp_path / "acc")  # encodings stay in memory
    for batch in batches:
        on_disk.append(batch)
    from_disk = on_disk.result()
    assert isinstance(from_disk["input_ids"], np.memmap)
    assert [from_disk.word_ids(i) for i in range(6)] == want
    # along the last axis rows and encodings no longer line up: dropped, never batch 0's
    side_by_side = concat([batches[0], batches[0]], axis=-1)
    assert side_by_side["input_ids"].shape == (2, 4)
    assert side_by_side.encodings is None
