"""A model's sizes as the memory estimates read them, whatever its config calls them."""

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelDims:
    """Sizes read from a transformers config (GPT-2's ``n_embd``/``n_inner`` through the config's own
    aliases, T5-style ``d_model``/``num_layers``), with fallbacks for configs that lack them.

    Attributes:
        hidden: the hidden size (512 when unknown).
        layers: the number of layers (12 when unknown).
        heads: attention heads (8 when unknown).
        inner: the feed-forward width (4 x hidden when unknown).
        kv_dim: keys (or values) per position and layer: head size x key/value heads.
        vocab: the vocabulary size, or None when unknown (each estimate picks its own fallback).
    """

    hidden: int
    layers: int
    heads: int
    inner: int
    kv_dim: int
    vocab: int | None


def model_dims(config) -> ModelDims:
    hidden = getattr(config, "hidden_size", None) or getattr(config, "d_model", None) or 512
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "num_layers", None) or 12
    heads = getattr(config, "num_attention_heads", None) or 8
    inner = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv_dim = head_dim * (getattr(config, "num_key_value_heads", None) or heads)
    return ModelDims(hidden, layers, heads, inner, kv_dim, getattr(config, "vocab_size", None) or None)


__all__ = ["ModelDims", "model_dims"]
