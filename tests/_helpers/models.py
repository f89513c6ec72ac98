"""Tiny Hugging Face models built from configs (no download), seeded, shared by the tests.

Each builder returns a freshly initialised model with ``torch.manual_seed(0)``, so two calls
give the same weights. ``cls`` picks the head (``BertModel``, ``BertForMaskedLM``, ...);
``vocab_size`` matches the token ids a test draws.
"""

from __future__ import annotations

from typing import Any

import torch
import transformers


def tiny_bert(cls: Any = None, *, vocab_size: int = 99, **config: Any) -> Any:
    """A 2-layer BERT, hidden size 32 (modules ``bert.encoder.layer.N``); masked LM by default."""
    torch.manual_seed(0)
    settings = {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 37,
        "vocab_size": vocab_size,
        **config,
    }
    return (cls or transformers.BertForMaskedLM)(transformers.BertConfig(**settings))


def tiny_gpt2(*, vocab_size: int = 100, **config: Any) -> Any:
    """A 2-layer GPT-2 language model, its outputs carrying the KV cache."""
    torch.manual_seed(0)
    settings = {
        "n_embd": 32,
        "n_layer": 2,
        "n_head": 2,
        "vocab_size": vocab_size,
        "n_positions": 64,
        "bos_token_id": 0,
        "eos_token_id": 0,
        **config,
    }
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**settings))


def tiny_t5(*, vocab_size: int = 100, **config: Any) -> Any:
    """A 2-layer T5 encoder-decoder (its outputs carry an ``EncoderDecoderCache``)."""
    torch.manual_seed(0)
    settings = {
        "vocab_size": vocab_size,
        "d_model": 32,
        "d_kv": 8,
        "d_ff": 64,
        "num_layers": 2,
        "num_heads": 2,
        "decoder_start_token_id": 0,
        "pad_token_id": 0,
        "eos_token_id": 1,
        **config,
    }
    return transformers.T5ForConditionalGeneration(transformers.T5Config(**settings))


def tiny_bart(*, vocab_size: int = 99, **config: Any) -> Any:
    """A 2+2-layer BART (modules ``model.encoder.layers.N``, ``model.decoder.layers.N``)."""
    torch.manual_seed(0)
    settings = {
        "d_model": 32,
        "encoder_layers": 2,
        "decoder_layers": 2,
        "encoder_attention_heads": 2,
        "decoder_attention_heads": 2,
        "encoder_ffn_dim": 37,
        "decoder_ffn_dim": 37,
        "vocab_size": vocab_size,
        "max_position_embeddings": 64,
        **config,
    }
    return transformers.BartForConditionalGeneration(transformers.BartConfig(**settings))
