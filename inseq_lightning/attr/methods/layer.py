"""Layer methods on the embedding layer's output, fed token ids: layer integrated gradients,
layer gradient x activation and layer DeepLIFT (captum's layer methods, batched over steps)."""

import torch

from ..engine import EngineContext
from .base import AttributionMethod, MethodResult, register_method
from .gradient import _check_deeplift_applicable, integrate


def _layer_outputs(ctx: EngineContext) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs of the embedding layer for the attributed ids and for the baseline ids."""
    layer = ctx.model.architecture.input_layer()
    with torch.no_grad():
        return layer(ctx.attributed_ids()), layer(ctx.attributed_ids(baseline=True))


def _layer_gradients(ctx: EngineContext, layer_output: torch.Tensor, repeat: int = 1, at_real_inputs: bool = False,
                     row_weights: torch.Tensor | None = None):
    layer_output = layer_output.detach().requires_grad_(True)
    scores = ctx.attributed_scores(ctx.forward_ids_with_layer(layer_output, repeat=repeat), at_real_inputs)
    (grads,) = ctx.step_gradients(scores, [layer_output], row_weights=None if row_weights is None else [row_weights])
    return grads


def _as_result(ctx: EngineContext, scores: torch.Tensor) -> MethodResult:
    return MethodResult(*ctx.split([scores]))


class _LayerMethod(AttributionMethod):
    supports_attribute_target = False


@register_method
class LayerIntegratedGradients(_LayerMethod):
    """captum ``LayerIntegratedGradients`` on the embedding layer (UNK baseline ids).

    Args:
        ctx: the engine context of one batch.
        n_steps: integration points.
        method: captum's approximation method.
        internal_batch_size: rows per forward (points x sequences); None runs all points in one forward.
        multiply_by_inputs: multiply by ``layer(input) - layer(baseline)``.
    """

    name = "layer_integrated_gradients"

    def attribute(
        self,
        ctx: EngineContext,
        n_steps: int = 50,
        method: str = "gausslegendre",
        internal_batch_size: int | None = None,
        multiply_by_inputs: bool = True,
        **kwargs,
    ) -> MethodResult:
        actual, baseline = _layer_outputs(ctx)

        def run(scaled, repeat, row_weights):
            return [_layer_gradients(ctx, scaled[0], repeat, row_weights=row_weights[0])]

        (total,) = integrate(ctx, [actual], [baseline], run, n_steps, method, internal_batch_size)
        if multiply_by_inputs:
            total = total * (actual - baseline).unsqueeze(2)
        return _as_result(ctx, total)


@register_method
class LayerGradientXActivation(_LayerMethod):
    """captum ``LayerGradientXActivation`` on the embedding layer: ``a * d f / d a``.

    Args:
        ctx: the engine context of one batch.
        multiply_by_inputs: multiply by the activation; False gives the gradients.
    """

    name = "layer_gradient_x_activation"

    def attribute(self, ctx: EngineContext, multiply_by_inputs: bool = True, **kwargs) -> MethodResult:
        actual, _ = _layer_outputs(ctx)
        grads = _layer_gradients(ctx, actual, at_real_inputs=True)
        return _as_result(ctx, grads * actual.unsqueeze(2) if multiply_by_inputs else grads)


@register_method
class LayerDeepLift(_LayerMethod):
    """captum ``LayerDeepLift`` on the embedding layer: ``(a - a') * d f / d a`` (see ``deeplift``).

    Args:
        ctx: the engine context of one batch.
        multiply_by_inputs: multiply by ``a - a'``; False gives the multipliers.
    """

    name = "layer_deeplift"

    def attribute(self, ctx: EngineContext, multiply_by_inputs: bool = True, **kwargs) -> MethodResult:
        _check_deeplift_applicable(ctx.model.model, self.name)
        actual, baseline = _layer_outputs(ctx)
        grads = _layer_gradients(ctx, actual, at_real_inputs=True)
        return _as_result(ctx, grads * (actual - baseline).unsqueeze(2) if multiply_by_inputs else grads)
