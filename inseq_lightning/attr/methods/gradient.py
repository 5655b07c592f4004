"""Gradient methods on input embeddings: saliency, input x gradient, integrated gradients,
DeepLIFT and GradientSHAP, each computed from one forward per batch (per integration point)."""

import torch
from captum.attr._core.deep_lift import SUPPORTED_NON_LINEAR
from captum.attr._utils.approximation_methods import approximation_parameters

from ..engine import EngineContext, interpolation_chunks
from .base import AttributionMethod, MethodResult, register_method


def _gradients_at(ctx: EngineContext, inputs: list[torch.Tensor], repeat: int = 1, at_real_inputs: bool = False,
                  row_weights: list[torch.Tensor | float] | None = None):
    """Forward on ``inputs`` and per-step gradients: a list of ``[R*B, L, N, D]``, one per input
    (``[B, L, N, D]`` weighted sums over the R copies with ``row_weights``, see ``step_gradients``).
    ``at_real_inputs``: ``inputs`` are the unperturbed embeddings (the step scores are read too)."""
    inputs = [x.detach().requires_grad_(True) for x in inputs]
    scores = ctx.attributed_scores(ctx.forward(inputs, repeat=repeat), at_real_inputs)
    return ctx.step_gradients(scores, inputs, row_weights=row_weights)


def _per_step(x: torch.Tensor) -> torch.Tensor:
    """``[B, L, D]`` -> ``[B, L, 1, D]`` so it broadcasts over the step axis."""
    return x.unsqueeze(2)


@register_method
class Saliency(AttributionMethod):
    """``|d f / d e|`` (captum ``Saliency`` with ``abs=True``).

    Args:
        ctx: the engine context of one batch.
        abs: absolute value of the gradients (captum's default for saliency).
    """

    name = "saliency"

    def attribute(self, ctx: EngineContext, abs: bool = True, **kwargs) -> MethodResult:
        grads = _gradients_at(ctx, ctx.embeddings(), at_real_inputs=True)
        grads = [g.abs_() if abs else g for g in grads]  # in place: the engine's own tensors
        return MethodResult(*ctx.split(grads))


@register_method
class InputXGradient(AttributionMethod):
    """``e * d f / d e`` (signed).

    Args:
        ctx: the engine context of one batch.
    """

    name = "input_x_gradient"

    def attribute(self, ctx: EngineContext, **kwargs) -> MethodResult:
        inputs = ctx.embeddings()
        grads = _gradients_at(ctx, inputs, at_real_inputs=True)
        return MethodResult(*ctx.split([_per_step(x) * g for x, g in zip(inputs, grads)]))


def _check_deeplift_applicable(model: torch.nn.Module, name: str) -> None:
    blocking = sorted({type(m).__name__ for m in model.modules() if type(m) in SUPPORTED_NON_LINEAR})
    if blocking:
        raise NotImplementedError(
            f"{name} on a model with {', '.join(blocking)} modules needs DeepLIFT's rescale rule, which the "
            "batched engine does not implement; use integrated_gradients or input_x_gradient instead."
        )


@register_method
class DeepLift(AttributionMethod):
    """captum ``DeepLift`` with the UNK baseline.

    Transformer language models apply their non-linearities as functions or custom modules
    (GELU, SiLU), none of which captum's rescale rule rewrites, so DeepLIFT equals
    ``(e - e') * d f / d e`` at the input; models with rewritten modules are refused.

    Args:
        ctx: the engine context of one batch.
        multiply_by_inputs: multiply by ``e - e'`` (global attribution); False gives the multipliers.
    """

    name = "deeplift"

    def attribute(self, ctx: EngineContext, multiply_by_inputs: bool = True, **kwargs) -> MethodResult:
        _check_deeplift_applicable(ctx.model.model, self.name)
        inputs, baselines = ctx.embeddings(), ctx.baseline_embeddings()
        grads = _gradients_at(ctx, inputs, at_real_inputs=True)
        if multiply_by_inputs:
            grads = [_per_step(x - b) * g for x, b, g in zip(inputs, baselines, grads)]
        return MethodResult(*ctx.split(grads))


def integrate(
    ctx: EngineContext,
    inputs: list[torch.Tensor],
    baselines: list[torch.Tensor],
    run,
    n_steps: int,
    method: str,
    internal_batch_size: int | None,
    rounds: int = 1,
) -> list[torch.Tensor]:
    """Riemann/Gauss-Legendre integral of per-step gradients along ``baseline -> input``.

    ``run(scaled_inputs, repeat, row_weights)`` returns the per-step gradients w.r.t.
    ``scaled_inputs`` summed over the ``repeat`` points with ``row_weights`` (the quadrature
    weights), ``[B, L, N, D]`` per input. Returns the integrated gradients ``[B, L, N, D]`` per
    input (not yet multiplied by ``input - baseline``).
    """
    step_sizes_fn, alphas_fn = approximation_parameters(method)
    step_sizes, alphas = step_sizes_fn(n_steps), alphas_fn(n_steps)
    total = [None for _ in inputs]
    batch = ctx.batch.size
    chunks = interpolation_chunks(n_steps, batch, internal_batch_size)
    ctx.gradient_passes = len(chunks) * rounds  # progress: every chunk of every round counts its share
    for chunk in chunks:
        scaled = [torch.cat([b + alphas[a] * (x - b) for a in chunk], 0) for x, b in zip(inputs, baselines)]
        weights = [torch.tensor([step_sizes[a] for a in chunk], dtype=torch.promote_types(x.dtype, torch.float32),
                                device=x.device)
                   .repeat_interleave(batch).view(-1, *([1] * (x.ndim - 1))) for x in inputs]  # [R*B, 1, 1]
        grads = run(scaled, len(chunk), weights)
        total = [g if t is None else t.add_(g) for t, g in zip(total, grads)]
    return total


@register_method
class IntegratedGradients(AttributionMethod):
    """captum ``IntegratedGradients`` (``n_steps=50``, ``method="gausslegendre"``), from the UNK
    baseline; every integration point is one forward shared by all steps.

    Args:
        ctx: the engine context of one batch.
        n_steps: integration points.
        method: captum's approximation method (``gausslegendre``, ``riemann_left``, ``riemann_right``,
            ``riemann_middle``, ``riemann_trapezoid``).
        internal_batch_size: rows per forward (points x sequences); None runs all points in one forward.
        multiply_by_inputs: multiply the integrated gradients by ``input - baseline``.
    """

    name = "integrated_gradients"

    def attribute(
        self,
        ctx: EngineContext,
        n_steps: int = 50,
        method: str = "gausslegendre",
        internal_batch_size: int | None = None,
        multiply_by_inputs: bool = True,
        **kwargs,
    ) -> MethodResult:
        inputs, baselines = ctx.embeddings(), ctx.baseline_embeddings()

        def run(scaled, repeat, row_weights):
            return _gradients_at(ctx, scaled, repeat, row_weights=row_weights)

        total = integrate(ctx, inputs, baselines, run, n_steps, method, internal_batch_size)
        if multiply_by_inputs:
            total = [g * _per_step(x - b) for g, x, b in zip(total, inputs, baselines)]
        return MethodResult(*ctx.split(total))


@register_method
class GradientShap(AttributionMethod):
    """captum ``GradientShap``: the mean over ``n_samples`` random points ``b + a (x + noise - b)``,
    ``a ~ U(0, 1)``, of ``(x + noise - b) * d f``. One uniform draw per sample and sequence is
    shared by all steps of that sequence (inseq draws one per step), so numbers agree with inseq's
    in expectation, not draw for draw. ``seed`` makes runs repeatable without touching global RNG.

    Args:
        ctx: the engine context of one batch.
        n_samples: random points per sequence.
        stdevs: standard deviation of the Gaussian noise added to the inputs.
        seed: seed of the method's own generator (None: drawn from torch's global RNG).
        multiply_by_inputs: multiply by ``x + noise - b``.
        internal_batch_size: rows per forward (samples x sequences); None runs all samples at once.
    """

    name = "gradient_shap"

    def attribute(
        self,
        ctx: EngineContext,
        n_samples: int = 5,
        stdevs: float = 0.0,
        seed: int | None = None,
        multiply_by_inputs: bool = True,
        internal_batch_size: int | None = None,
        **kwargs,
    ) -> MethodResult:
        inputs, baselines = ctx.embeddings(), ctx.baseline_embeddings()
        device = inputs[0].device
        generator = torch.Generator(device=device)
        generator.manual_seed(seed if seed is not None else int(torch.randint(0, 2**31 - 1, (1,)).item()))
        batch = ctx.batch.size
        coeff = torch.rand(n_samples, batch, generator=generator, device=device, dtype=inputs[0].dtype)
        noisy = [
            x.unsqueeze(0) + stdevs * torch.randn((n_samples, *x.shape), generator=generator, device=device)
            if stdevs > 0 else x.unsqueeze(0).expand(n_samples, *x.shape)
            for x in inputs
        ]
        total = [None for _ in inputs]
        chunks = interpolation_chunks(n_samples, batch, internal_batch_size)
        ctx.gradient_passes = len(chunks)
        for chunk in chunks:
            idx = list(chunk)
            c = coeff[idx].view(len(idx), batch, 1, 1)
            scaled = [(c * n[idx] + (1 - c) * b.unsqueeze(0)).reshape(-1, *b.shape[1:]) for n, b in zip(noisy, baselines)]
            # (x + noise - b) per sample multiplies that sample's gradients before the sum
            weights = [(n[idx] - b.unsqueeze(0)).reshape(-1, *b.shape[1:]) if multiply_by_inputs else 1.0
                       for n, b in zip(noisy, baselines)]
            grads = _gradients_at(ctx, scaled, len(idx), row_weights=weights)
            total = [g if t is None else t.add_(g) for t, g in zip(total, grads)]
        return MethodResult(*ctx.split([t / n_samples for t in total]))


@register_method
class SequentialIntegratedGradients(AttributionMethod):
    """Sequential integrated gradients (Enguehard, 2023; inseq's ``sequential_integrated_gradients``):
    each token's attribution integrates the gradients along a path where only that token moves from
    its baseline (UNK) embedding to its own, every other token staying as it is.

    One round per input position: the ``n_steps`` interpolations of that position run as one forward
    shared by every step (a causal model's prediction at step ``t`` only sees positions ``< t``, which
    is what inseq's per-step prefix gives), and one per-step backward keeps the moving position's column.

    Args:
        ctx: the engine context of one batch.
        n_steps: integration points per position.
        method: captum's approximation method (``gausslegendre`` by default).
        internal_batch_size: rows per forward (points x sequences); None runs all points of a position at once.
        multiply_by_inputs: multiply by ``input - baseline`` at the moving position.
    """

    name = "sequential_integrated_gradients"

    def attribute(
        self,
        ctx: EngineContext,
        n_steps: int = 50,
        method: str = "gausslegendre",
        internal_batch_size: int | None = None,
        multiply_by_inputs: bool = True,
        **kwargs,
    ) -> MethodResult:
        inputs, baselines = ctx.embeddings(), ctx.baseline_embeddings()
        batch = ctx.batch.size
        step_sizes_fn, alphas_fn = approximation_parameters(method)
        step_sizes, alphas = step_sizes_fn(n_steps), alphas_fn(n_steps)
        # Positions per forward: all n_steps points of k positions share one forward and one per-step
        # backward, within the memory budget for their [rows, L, N, D] gradients (a small model's
        # time is mostly per-call overhead, which this divides by k).
        grad_bytes = n_steps * batch * sum(x[0].numel() for x in inputs) * ctx.num_steps * 4
        k = max(1, int(ctx.memory_budget_bytes // max(grad_bytes, 1)))
        if internal_batch_size is not None:
            k = min(k, internal_batch_size // max(n_steps * batch, 1))
        results = [x.new_zeros(x.shape[0], x.shape[1], ctx.num_steps, *x.shape[2:]) for x in inputs]
        if k < 1:  # the points of one position do not fit one forward: integrate them in chunks
            rounds = sum(x.shape[1] for x in inputs)
            for which, (x, b) in enumerate(zip(inputs, baselines)):
                for position in range(x.shape[1]):

                    def run(scaled, repeat, row_weights, which=which):
                        full = [t.repeat(repeat, *([1] * (t.ndim - 1))) for t in inputs]
                        full[which] = scaled[0]
                        weights = [row_weights[0] if i == which else 1.0 for i in range(len(full))]
                        return [_gradients_at(ctx, full, repeat, row_weights=weights)[which]]

                    path_start = x.clone()  # only ``position`` on the path: the baseline is the input elsewhere
                    path_start[:, position] = b[:, position]
                    (total,) = integrate(ctx, [x], [path_start], run, n_steps, method, internal_batch_size, rounds=rounds)
                    column = total[:, position]
                    results[which][:, position] = column * (x - b)[:, position].unsqueeze(1) if multiply_by_inputs else column
            return MethodResult(*ctx.split(results))
        weights = torch.tensor(step_sizes, dtype=torch.float32, device=inputs[0].device).view(-1, 1, 1, 1)
        groups = [(which, range(s, min(s + k, x.shape[1]))) for which, x in enumerate(inputs)
                  for s in range(0, x.shape[1], k)]
        ctx.gradient_passes = len(groups)
        for which, group in groups:
            x, b = inputs[which], baselines[which]
            scaled = []
            for position in group:
                for alpha in alphas:
                    moved = x.clone()
                    moved[:, position] = b[:, position] + alpha * (x[:, position] - b[:, position])
                    scaled.append(moved)
            repeat = len(group) * n_steps
            full = [t.repeat(repeat, *([1] * (t.ndim - 1))) for t in inputs]
            full[which] = torch.cat(scaled, 0)
            grads = _gradients_at(ctx, full, repeat)[which]  # [k * n_steps * B, L, N, D]
            grads = grads.view(len(group), n_steps, batch, *grads.shape[1:])
            for i, position in enumerate(group):
                column = (grads[i, :, :, position].float() * weights).sum(0).to(x.dtype)  # [B, N, D]
                if multiply_by_inputs:
                    column = column * (x - b)[:, position].unsqueeze(1)
                results[which][:, position] = column
        return MethodResult(*ctx.split(results))
