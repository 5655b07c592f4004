"""Occlusion: the change of the attributed score when a window of tokens' embeddings is replaced by
the baseline's. Each occluded variant covers every step at once, and ``positions_per_forward``
variants (16 by default) share one batched forward."""

import torch

from ...errors import InvalidInputError
from ..engine import EngineContext
from .base import AttributionMethod, MethodResult, register_method


def _window_shapes(value, inputs: list[torch.Tensor]) -> list[tuple[int, int]]:
    """captum/inseq ``sliding_window_shapes``: one ``(tokens, embedding_dim)`` per attributed input,
    or one shape for all (default ``(1, embedding_dim)``)."""
    if value is None:
        return [(1, x.shape[-1]) for x in inputs]
    shapes = [value] * len(inputs) if isinstance(value[0], int) else list(value)
    if len(shapes) != len(inputs):
        raise InvalidInputError(f"sliding_window_shapes has {len(shapes)} shapes for {len(inputs)} attributed inputs")
    for shape, x in zip(shapes, inputs):
        if len(shape) != 2 or shape[1] != x.shape[-1] or not 1 <= shape[0]:
            raise InvalidInputError(
                f"sliding_window_shapes {tuple(shape)}: a window is (tokens, {x.shape[-1]}): at least one token, and "
                "the whole embedding (partial embeddings would give each dimension its own score)"
            )
    return [tuple(s) for s in shapes]


def _occlusion_scores(ctx: EngineContext, inputs: list[torch.Tensor], baselines: list[torch.Tensor], which: int,
                      width: int, stride: int, chunk: int, initial: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """``[B, L, N]`` = ``|mean over the windows covering token j that step n sees of (f(x) - f(x with the
    window occluded))|`` (captum's Occlusion over the prefix each step sees, as inseq runs it).

    ``visible``: ``[B, N]`` how many tokens of this input each step sees (its prefix length, or the whole
    source)."""
    x, base = inputs[which], baselines[which]
    batch, length = x.shape[0], x.shape[1]
    # captum's windows: starts 0, stride, ..., up to ceil((L - width) / stride) * stride; the last one
    # may run past the end and is cut there (what it covers beyond a step's prefix is unseen anyway)
    starts = list(range(0, -(-max(length - width, 0) // stride) * stride + 1, stride))
    diffs = torch.empty(batch, len(starts), initial.shape[1], dtype=initial.dtype, device=initial.device)
    for first in range(0, len(starts), chunk):
        group = starts[first : first + chunk]
        variants = []
        for s in group:
            occluded = x.clone()
            occluded[:, s : s + width] = base[:, s : s + width]
            variants.append(occluded)
        others = [t.repeat(len(group), 1, 1) for t in inputs]
        others[which] = torch.cat(variants, 0)
        with torch.no_grad():
            scores = ctx.attributed_scores(ctx.forward(others, repeat=len(group)))
        diffs[:, first : first + len(group)] = (initial.repeat(len(group), 1) - scores).view(
            len(group), batch, -1).permute(1, 0, 2)
    start_t = torch.tensor(starts, device=initial.device)
    tokens = torch.arange(length, device=initial.device)
    covers = ((tokens.view(1, -1) >= start_t.view(-1, 1)) & (tokens.view(1, -1) < start_t.view(-1, 1) + width))
    # the windows captum slides over what step n sees (its prefix): [B, W, N]
    last = -(-(visible - width).clamp(min=0) // stride) * stride
    exists = start_t.view(1, -1, 1) <= last.unsqueeze(1)
    weight = covers.to(diffs.dtype).view(1, len(starts), length, 1) * exists.to(diffs.dtype).unsqueeze(2)  # [B,W,L,N]
    total = (weight * diffs.unsqueeze(2)).sum(1)
    count = weight.sum(1)
    return (total / count.clamp(min=1)).abs()


@register_method
class Occlusion(AttributionMethod):
    """captum ``Occlusion`` with the UNK baseline, absolute value (inseq's ``occlusion``).

    Args:
        ctx: the engine context of one batch.
        sliding_window_shapes: ``(tokens, embedding_dim)`` per attributed input, or one for all
            (default ``(1, embedding_dim)``: one token at a time). A token's score is the mean
            change over the windows that cover it, within what each step sees (captum's rule).
        strides: tokens between consecutive windows (default 1).
        positions_per_forward: occluded variants batched into one forward (default 16; 1 uses the
            least memory, ``[positions_per_forward * B, L, d_model]`` inputs per forward).
    """

    name = "occlusion"
    granularity = "coarse"

    def attribute(self, ctx: EngineContext, positions_per_forward: int = 16, sliding_window_shapes=None,
                  strides: int = 1, **kwargs) -> MethodResult:
        inputs, baselines = ctx.embeddings(), ctx.baseline_embeddings()
        shapes = _window_shapes(sliding_window_shapes, inputs)
        if not isinstance(strides, int) or not 1 <= strides <= min(width for width, _ in shapes):
            raise InvalidInputError(f"strides must be a number of tokens between 1 and the window's, got {strides!r}")
        with torch.no_grad():
            initial = ctx.attributed_scores(ctx.forward(inputs), at_real_inputs=True)
        results = []
        for which, (width, _) in enumerate(shapes):
            visible = ctx.visible_lengths(which)
            if width > int(visible[ctx.valid].min()):
                raise InvalidInputError(
                    f"sliding_window_shapes: a {width}-token window does not fit the {int(visible[ctx.valid].min())} "
                    "tokens the first step sees; use a smaller window or attribute later steps (attr_pos_start)"
                )
            results.append(_occlusion_scores(ctx, inputs, baselines, which, width, strides, positions_per_forward,
                                             initial, visible))
        return MethodResult(*ctx.split(results))
