"""Helpers for tests of po-registry and of its plugins: a character tokenizer and tiny causal LMs built offline."""

from __future__ import annotations

import string

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<unk>", "<bos>", "<eos>"]
CHARACTERS = list(string.digits) + list("+-*=()<>:?,.") + [" "] + list(string.ascii_lowercase) + ["\n"]


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer (54 tokens: 4 specials, digits, punctuation, space, a-z, newline)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.padding_side = "left"
    return tokenizer


def tiny_causal_lm(tokenizer: PreTrainedTokenizerFast, seed: int = 0, hidden_size: int = 32,
                   num_layers: int = 2) -> LlamaForCausalLM:
    """A randomly initialised Llama small enough for unit tests (about 40k parameters by default)."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.generation_config, key, getattr(config, key))
    return model
