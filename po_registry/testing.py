"""Helpers for tests of po-registry and of its plugins: a character tokenizer and tiny causal LMs built offline."""

from __future__ import annotations

from .embedded import char_tokenizer, llama

__all__ = ["char_tokenizer", "tiny_causal_lm"]


def tiny_causal_lm(tokenizer, seed: int = 0, hidden_size: int = 32, num_layers: int = 2):
    """A randomly initialised Llama small enough for unit tests (about 30k parameters by default)."""
    return llama(tokenizer, seed=seed, hidden_size=hidden_size, num_layers=num_layers, tie=False)
