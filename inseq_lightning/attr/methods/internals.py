"""Attention weights as attributions, read from the one forward pass (eager attention)."""

import torch

from ...errors import InvalidInputError
from ...utils.model_state import set_attn_implementation
from ..engine import EngineContext
from .base import AttributionMethod, MethodResult, register_method


def _rows_at_steps(attn: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``[B, layers, heads, Q, K]`` -> ``[B, K, N, layers, heads]``: the attention row of the query
    that predicts each step (position - 1)."""
    b, layers, heads, _, k = attn.shape
    index = (positions - 1).view(b, 1, 1, -1, 1).expand(b, layers, heads, positions.shape[1], k)
    rows = attn.gather(3, index)  # [B, layers, heads, N, K]
    return rows.permute(0, 4, 3, 1, 2)


@register_method
class AttentionWeights(AttributionMethod):
    """Attention of the predicting position over its keys, per layer and head. Models loaded with
    SDPA or flash attention are switched to eager for the pass and switched back.

    Args:
        ctx: the engine context of one batch. Results are ``[B, keys, N, layers, heads]`` (aggregated
            by default as the mean over heads, then over layers, as inseq does).
        layers: the layers kept: an index, a ``(start, end)`` range (end excluded) or a list of indices
            (negative indices count from the last layer); None keeps all.
        heads: the heads kept, in the same forms; None keeps all.
    """

    name = "attention"
    granularity = "multidimensional"

    def attribute(self, ctx: EngineContext, layers=None, heads=None, **kwargs) -> MethodResult:
        model = ctx.model.model
        original = getattr(model.config, "_attn_implementation", None)
        if original not in (None, "eager"):
            set_attn_implementation(model, "eager")
        try:
            # Without step scores nothing reads the logits: one position is enough (with a 50k
            # vocabulary the output layer is a large share of the forward).
            skip = {"logits_to_keep": 1} if not ctx.needs_logits and ctx.model.can_skip_logits else {}
            with torch.no_grad():
                output = ctx.forward(ctx.embeddings(), output_attentions=True, **skip)
        finally:
            if original not in (None, "eager"):
                set_attn_implementation(model, original)
        positions = ctx.positions
        if ctx.needs_logits:
            ctx.record_step_scores(ctx.step_logits(output.logits))
        sides = ctx.adapter.attention_rows(output, ctx.attribute_target)
        results = []
        for side in sides:
            if side is None:
                results.append(None)
                continue
            stacked = torch.stack(side, 1)  # [B, layers, heads, Q, K]
            keep_layers = _indices("layers", layers, stacked.shape[1])
            keep_heads = _indices("heads", heads, stacked.shape[2])
            stacked = stacked[:, keep_layers][:, :, keep_heads]
            results.append(_rows_at_steps(stacked, positions))
        return MethodResult(*results)


def _indices(name: str, value, size: int) -> list[int]:
    """``layers=``/``heads=`` as a list of indices into ``size`` (an int, a ``(start, end)`` range or a list)."""
    if value is None:
        return list(range(size))
    if isinstance(value, int):
        chosen = [value]
    elif isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, int) for v in value):
        chosen = list(range(*value))
    elif isinstance(value, list | tuple) and all(isinstance(v, int) for v in value):
        chosen = list(value)
    else:
        raise InvalidInputError(f"{name} must be an int, a (start, end) range or a list of ints, got {value!r}")
    if not chosen or any(not -size <= v < size for v in chosen):
        raise InvalidInputError(f"{name}={value!r} is out of range: the model has {size} {name} "
                                f"(indices {-size}..{size - 1})")
    return [v % size for v in chosen]
