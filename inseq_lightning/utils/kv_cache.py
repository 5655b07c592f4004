"""Key/value caches of a prefix that many rows share.

When every row of a forward starts with the same positions (the tokens before a moving position in
sequential integrated gradients, the chat template before the first removable token of a
faithfulness row), a causal decoder's keys and values of those positions are the same in every row.
They come from one forward of one row without gradient, and the rows run only the positions after
it. Only a plain full-attention ``DynamicCache`` qualifies: sliding-window layers, recurrent states
and encoder-decoders (a bidirectional encoder) run whole sequences.
"""

import copy
import inspect

import torch


def cache_argument(model: torch.nn.Module) -> str | None:
    """The name under which ``model.forward`` takes a key/value cache (``cache`` in transformers 5,
    ``past_key_values`` before), or None when it takes none.

    A PEFT model (LoRA and the other adapter methods) hands the keyword arguments it does not know to
    its base model, so the base model's name holds; prompt-learning methods (prefix tuning, prompt
    tuning) fill the cache or the inputs themselves, so no prefix of ours goes in."""
    if hasattr(model, "get_base_model") and hasattr(model, "peft_config"):
        config = getattr(model, "active_peft_config", None)
        if config is None or getattr(config, "is_prompt_learning", True):
            return None
        return cache_argument(model.get_base_model())
    parameters = inspect.signature(model.forward).parameters
    if "use_cache" not in parameters:
        return None
    return next((name for name in ("cache", "past_key_values") if name in parameters), None)


def returned_cache(output):
    """The cache a forward with ``use_cache=True`` returned, under either name."""
    return output.get("cache") if output.get("cache") is not None else output.get("past_key_values")


def is_plain_cache(cache, length: int) -> bool:
    """``cache`` is a full-attention ``DynamicCache`` holding ``length`` positions of every layer: what a
    later forward can continue exactly as one forward over the whole sequence would."""
    try:
        from transformers.cache_utils import DynamicCache, DynamicLayer
    except ImportError:
        return False
    return (isinstance(cache, DynamicCache) and all(type(layer) is DynamicLayer for layer in cache.layers)
            and cache.get_seq_length() == length)


def prefix_cache(model: torch.nn.Module, embeds: torch.Tensor, mask: torch.Tensor, start: int,
                 forward_defaults: dict | None = None, can_skip_logits: bool = False):
    """The key/value cache of positions ``< start`` of ``embeds`` ``[B, L, D]`` (one forward without
    gradient), or None when the model returns anything but a plain full-attention ``DynamicCache``.

    Args:
        model: the (decoder-only) model.
        embeds: the input embeddings; only ``[:, :start]`` is run.
        mask: the attention mask ``[B, >= start]``.
        start: the prefix length.
        forward_defaults: extra forward arguments (``use_cache`` is set to True).
        can_skip_logits: the forward takes ``logits_to_keep`` (only the last position's logits are made).
    """
    kwargs = {**(forward_defaults or {}), "use_cache": True}
    if can_skip_logits:
        kwargs["logits_to_keep"] = 1
    with torch.no_grad():
        output = model(inputs_embeds=embeds[:, :start], attention_mask=mask[:, :start], **kwargs)
    cache = returned_cache(output)
    del output
    return cache if is_plain_cache(cache, start) else None


def expanded(cache, index: torch.Tensor):
    """A copy of ``cache`` whose rows are ``cache``'s rows ``index`` (a forward appends to the cache it
    is given, so each forward gets its own copy and the original can serve the next)."""
    out = copy.copy(cache)
    out.layers = [copy.copy(layer) for layer in cache.layers]
    out.batch_select_indices(index)  # new key/value tensors: the original's are untouched
    return out


__all__ = ["cache_argument", "expanded", "is_plain_cache", "prefix_cache", "returned_cache"]
