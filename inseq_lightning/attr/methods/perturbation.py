"""Occlusion: the change of the attributed score when one token's embedding is replaced by the
baseline's. Each occluded variant covers every step at once, and ``positions_per_forward`` variants
(16 by default) share one batched forward."""

import torch

from ..engine import EngineContext
from .base import AttributionMethod, MethodResult, register_method


def _occlusion_scores(
    ctx: EngineContext, inputs: list[torch.Tensor], baselines: list[torch.Tensor], which: int, chunk: int, initial
) -> torch.Tensor:
    """``[B, L, N]`` = ``|f(x) - f(x with token j of input `which` occluded)|``."""
    x, base = inputs[which], baselines[which]
    batch, length = x.shape[0], x.shape[1]
    out = torch.empty(batch, length, initial.shape[1], dtype=initial.dtype, device=initial.device)
    for start in range(0, length, chunk):
        positions = range(start, min(start + chunk, length))
        variants = []
        for j in positions:
            occluded = x.clone()
            occluded[:, j] = base[:, j]
            variants.append(occluded)
        stacked = torch.cat(variants, 0)
        others = [t.repeat(len(positions), 1, 1) for t in inputs]
        others[which] = stacked
        with torch.no_grad():
            scores = ctx.attributed_scores(ctx.forward(others, repeat=len(positions)))
        out[:, start : start + len(positions)] = (initial.repeat(len(positions), 1) - scores).view(
            len(positions), batch, -1
        ).permute(1, 0, 2)
    return out.abs()


@register_method
class Occlusion(AttributionMethod):
    """captum ``Occlusion`` with a one-token x d_model window and the UNK baseline, absolute value.

    Args:
        ctx: the engine context of one batch.
        positions_per_forward: occluded positions batched into one forward (default 16; 1 uses the
            least memory, ``[positions_per_forward * B, L, d_model]`` inputs per forward).
    """

    name = "occlusion"
    granularity = "coarse"

    def attribute(self, ctx: EngineContext, positions_per_forward: int = 16, **kwargs) -> MethodResult:
        inputs, baselines = ctx.embeddings(), ctx.baseline_embeddings()
        with torch.no_grad():
            initial = ctx.attributed_scores(ctx.forward(inputs), at_real_inputs=True)
        results = [_occlusion_scores(ctx, inputs, baselines, i, positions_per_forward, initial) for i in range(len(inputs))]
        return MethodResult(*ctx.split(results))
