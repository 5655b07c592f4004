"""Gradient methods on input embeddings: saliency, input x gradient, integrated gradients,
DeepLIFT and GradientSHAP, each computed from one forward per batch (per integration point)."""

import dataclasses

import torch
from captum.attr._core.deep_lift import SUPPORTED_NON_LINEAR
from captum.attr._utils.approximation_methods import approximation_parameters

from ...utils.kv_cache import prefix_cache, returned_cache
from ...utils.model_dims import model_dims
from ...utils.sharding import has_sharded_parameters
from ..backward import step_gradients
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


def _prefix_cache(ctx: EngineContext, x: torch.Tensor, start: int, repeat: int):
    """The key/value cache of positions ``< start`` of the real inputs ``x`` ``[B, L, D]``, its batch
    ``repeat`` stacked copies of the batch (rows ``r * B + b``, as the interpolated inputs stack them);
    None when the model's cache is not a plain full-attention one (:func:`~inseq_lightning.utils.kv_cache.prefix_cache`)."""
    cache = prefix_cache(ctx.adapter.model, x, ctx.batch.target_mask, start, ctx.model.forward_defaults,
                         ctx.model.can_skip_logits)
    if cache is not None and repeat > 1:
        cache.batch_select_indices(torch.arange(x.shape[0], device=x.device).repeat(repeat))
    return cache


@register_method
class SequentialIntegratedGradients(AttributionMethod):
    """Sequential integrated gradients (Enguehard, 2023; inseq's ``sequential_integrated_gradients``):
    each token's attribution integrates the gradients along a path where only that token moves from
    its baseline (UNK) embedding to its own, every other token staying as it is.

    The ``n_steps`` interpolations of a position run as one forward shared by every step (a causal
    model's prediction at step ``t`` only sees positions ``< t``, which is what inseq's per-step
    prefix gives), and one per-step backward keeps the moving position's column.

    On decoder-only models that return a plain key/value cache (``prefix_cache``), the positions
    before the moving one are the real inputs in every interpolated row: their keys and values come
    from one forward without gradient over that prefix (expanded to the rows), and only the positions
    from the first moving one on run with the interpolated inputs and are differentiated. That part
    runs in segments of ``steps_per_segment`` predicting positions, each segment a forward on the
    cache the segments before it filled (with their gradients), so that a step's backward runs
    through the positions up to its own segment only, and skips the steps no moving position
    reaches. The gradient flows to the moving position only (the other positions are detached), so
    the rows of every position and point are weighted and summed as each backward comes
    (``[B, L', steps, D]``, never per row). A forward holds as many positions' points as keep its
    activations within half the memory budget (at least one position's, or ``internal_batch_size``
    rows). Encoder-decoders (a bidirectional encoder) and models whose cache is anything else
    (sliding windows, recurrent states) run whole sequences in every forward.

    Args:
        ctx: the engine context of one batch.
        n_steps: integration points per position.
        method: captum's approximation method (``gausslegendre`` by default).
        internal_batch_size: rows per forward (points x sequences); None runs all points of a position at once.
        multiply_by_inputs: multiply by ``input - baseline`` at the moving position.
        prefix_cache: compute the unchanged prefix once without gradient where the model allows it;
            False always runs whole sequences (same numbers, within float rounding).
        steps_per_segment: predicting positions per segment of the cached path: fewer run less of
            the backward, more make fewer (per-call overhead) forwards and backwards.
    """

    name = "sequential_integrated_gradients"

    def attribute(
        self,
        ctx: EngineContext,
        n_steps: int = 50,
        method: str = "gausslegendre",
        internal_batch_size: int | None = None,
        multiply_by_inputs: bool = True,
        prefix_cache: bool = True,
        steps_per_segment: int = 4,
        **kwargs,
    ) -> MethodResult:
        inputs, baselines = ctx.embeddings(), ctx.baseline_embeddings()
        # The cached path needs a prefix the adapter can cache, and a number of forwards that depends on
        # the batch's steps (sharded ranks must run the same collectives: they keep whole sequences).
        cache_argument = ctx.adapter.prefix_cache_argument() if prefix_cache else None
        if (cache_argument is not None and len(inputs) == 1 and not has_sharded_parameters(ctx.model.model)
                and _prefix_cache(ctx, inputs[0], 1, 1) is not None):
            return self._attribute_cached(ctx, inputs[0], baselines[0], cache_argument, n_steps, method,
                                          internal_batch_size, multiply_by_inputs, max(1, int(steps_per_segment)))
        return self._attribute_whole(ctx, inputs, baselines, n_steps, method, internal_batch_size, multiply_by_inputs)

    @staticmethod
    def _attribute_cached(ctx: EngineContext, x: torch.Tensor, b: torch.Tensor, cache_argument: str, n_steps: int,
                          method: str, internal_batch_size: int | None, multiply_by_inputs: bool,
                          steps_per_segment: int) -> MethodResult:
        """Decoder-only: each forward runs positions ``start..`` with the prefix ``< start`` cached,
        every row moving one position ``>= start``, in segments (see the class docstring)."""
        step_sizes_fn, alphas_fn = approximation_parameters(method)
        step_sizes, alphas = step_sizes_fn(n_steps), alphas_fn(n_steps)
        batch, length = x.shape[0], x.shape[1]
        model = ctx.adapter.model
        # Activations per row and position of the forward: what the backward's estimate counts per
        # step, plus the output layer's logits.
        per_token = (ctx.layout.hidden_size * max(ctx.layout.num_layers, 1) * 24
                     + (model_dims(ctx.model.model.config).vocab or 0)) * max(x.element_size(), 4)
        forward_budget = ctx.memory_budget_bytes // 2
        # The position that predicts each step (-1: padding step). Positions from the last of them
        # on are seen by no step: their gradients are zero (as in a whole forward) and are not run.
        predicting = (ctx.positions - 1).masked_fill(~ctx.valid, -1)  # [B, N]
        host = [[p - 1 for p in positions] for positions in ctx.batch.step_positions]
        end = max((max(q) + 1 for q in host if q), default=0)
        groups = []  # (start, [(position, alpha indices)])
        position = 0
        # All points of a position in one forward (as inseq), unless ``internal_batch_size`` says fewer.
        points = n_steps if internal_batch_size is None else max(1, min(n_steps, internal_batch_size // batch))
        while position < end:
            if points < n_steps:  # one position, its points in chunks
                groups += [(position, [(position, range(s, min(s + points, n_steps)))])
                           for s in range(0, n_steps, points)]
                position += 1
                continue
            rows_cap = forward_budget // max((end - position) * per_token, 1)
            if internal_batch_size is not None:
                rows_cap = min(rows_cap, internal_batch_size)
            k = max(1, min(rows_cap // (n_steps * batch), end - position))
            groups.append((position, [(p, range(n_steps)) for p in range(position, position + k)]))
            position += k
        ctx.gradient_passes = max(len(groups), 1)
        dtype = torch.promote_types(x.dtype, torch.float32)
        total = x.new_zeros(batch, length, ctx.num_steps, x.shape[2], dtype=dtype)
        mask = ctx.batch.target_mask
        forward_kwargs = {**ctx.model.forward_defaults, "use_cache": True}
        for start, items in groups:
            repeat = sum(len(points) for _, points in items)
            rows = repeat * batch
            # Segments end after every ``steps_per_segment`` distinct predicting positions: a step's
            # backward runs through the segments up to its own only.
            seen = sorted({q for qs in host for q in qs if q >= start})
            ends = [q + 1 for q in seen[steps_per_segment - 1 :: steps_per_segment]]
            if not ends or ends[-1] != seen[-1] + 1:
                ends.append(seen[-1] + 1)
            stop = ends[-1]
            scaled = x[:, start:stop].unsqueeze(0).repeat(repeat, 1, 1, 1)  # [R, B, L', D]
            moving = torch.zeros(repeat, 1, stop - start, 1, dtype=torch.bool, device=x.device)
            weights = []
            r = 0
            for p, points in items:
                for a in points:
                    scaled[r, :, p - start] = b[:, p] + alphas[a] * (x[:, p] - b[:, p])
                    moving[r, :, p - start] = True
                    weights.append(step_sizes[a])
                    r += 1
            scaled = scaled.view(rows, stop - start, -1).requires_grad_(True)
            moving = moving.expand(repeat, batch, stop - start, 1).reshape(rows, stop - start, 1)
            row_weights = torch.tensor(weights, dtype=dtype, device=x.device).repeat_interleave(batch).view(-1, 1, 1)
            cache = _prefix_cache(ctx, x, start, repeat) if start > 0 else None
            segment_start = start
            for i, segment_end in enumerate(ends):
                # Only the moving position carries the gradient: the rows of different positions
                # then sum into different columns.
                window = slice(segment_start - start, segment_end - start)
                segment = torch.where(moving[:, window], scaled[:, window], scaled[:, window].detach())
                in_segment = (predicting >= segment_start) & (predicting < segment_end)  # [B, N]
                kwargs = dict(forward_kwargs)
                if cache is not None:
                    kwargs[cache_argument] = cache
                if ctx.model.can_skip_logits:
                    kwargs["logits_to_keep"] = segment_end - max(segment_start, int(predicting[in_segment].min()))
                with ctx.head_recorder.recording():  # the output projection's input: the backward's split point
                    output = model(inputs_embeds=segment, attention_mask=mask[:, :segment_end].repeat(repeat, 1),
                                   **kwargs)
                if cache is None:
                    cache = returned_cache(output)
                logits = output.logits
                del output, segment
                # [rows, N, V]: the logits that predict each step, read from this segment's kept
                # positions (steps outside the segment read some other row: their scores are zeroed)
                offset = segment_end - logits.shape[1]
                index = (ctx.positions - 1 - offset).clamp(0, logits.shape[1] - 1).repeat(repeat, 1)
                step_logits = logits.gather(1, index.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
                del logits
                scores = ctx.scorer.scores(step_logits)
                del step_logits
                steps = in_segment.any(0).nonzero().squeeze(1)
                scores = torch.where(in_segment.repeat(repeat, 1), scores, torch.zeros_like(scores))[:, steps]
                layout = dataclasses.replace(ctx.layout, positions=ctx.positions[:, steps],
                                             valid=in_segment[:, steps], target_length=segment_end)
                head = ctx.head_recorder.split_point(rows, segment_end)
                ctx.head_recorder.inputs = []
                last = i == len(ends) - 1
                (grads,) = step_gradients(ctx.request.backward, layout, ctx.memory_budget_bytes, scores, [scaled],
                                          head, retain_graph=not last, row_weights=[row_weights])  # [B, L', n, D]
                del scores, head
                for p in dict.fromkeys(p for p, _ in items):
                    total[:, p, steps] += grads[:, p - start]
                del grads
                segment_start = segment_end
            del cache, scaled
            ctx.report_steps_done(range(ctx.num_steps))
        results = total.to(x.dtype)
        if multiply_by_inputs:
            results = results * (x - b).unsqueeze(2)
        return MethodResult(*ctx.split([results]))

    @staticmethod
    def _attribute_whole(ctx: EngineContext, inputs: list[torch.Tensor], baselines: list[torch.Tensor], n_steps: int,
                         method: str, internal_batch_size: int | None, multiply_by_inputs: bool) -> MethodResult:
        """Whole sequences in every forward (encoder-decoders, models without a plain cache)."""
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
