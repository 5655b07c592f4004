"""The attribution engine: one forward pass shared by every teacher-forced step, batched backward.

For a causal decoder the logits that predict target position ``t`` only depend on positions
``< t``, so a single forward over the whole (prompt + target) sequence yields the predictions of
every step. The gradients of all steps' scores then come from vectorised backwards
(:mod:`.backward`).

:class:`EngineContext` is what a method sees of one batch. It composes three seams, each in its own
module: the architecture adapter (:mod:`~inseq_lightning.models.architectures`: inputs, forwards,
sides), the step scorer (:mod:`.step_scorer`: every score from the logits) and the backward strategy
(:mod:`.backward`: per-step gradients).
"""

import itertools
import math
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from transformers.utils import ModelOutput

from ..utils.kv_cache import is_plain_cache, returned_cache
from ..utils.model_dims import model_dims
from ..utils.sharding import has_sharded_parameters
from .backward import (
    SHARDED_MEMORY_BUDGET_BYTES,
    VOCAB_SIZE_WHEN_UNKNOWN,
    HeadRecorder,
    StepLayout,
    default_memory_budget,
    plan_segments,
    step_gradients,
)
from .step_scorer import StepScorer

if TYPE_CHECKING:
    from ..models.batch import Batch
    from .contrast import ContrastBatch
    from .request import AttributionRequest

__all__ = ["EngineContext", "default_memory_budget", "interpolation_chunks", "nan_future_positions"]

# Models whose forward turned out not to return a plain key/value cache (sliding-window layers, recurrent
# states): they run whole forwards from then on.
_NO_PLAIN_CACHE: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()


@dataclass
class EngineContext:
    """Everything a method needs for one batch. Tensors are ``[B, L, ...]`` with B sequences.

    Args:
        model: the :class:`~inseq_lightning.models.AttributionModel`.
        batch: the batch.
        request: the validated request.
        progress: ``progress(n)`` advances the caller's bar by ``n`` attributed tokens (sequence-steps).
        contrast: the batch's contrast inputs, when the call has any.
        sharded: whether the model's parameters are sharded (FSDP, ZeRO-3); None: found out here
            (``attribute()`` finds out once per call).

    Attributes:
        adapter: the model's architecture adapter.
        scorer: the batch's :class:`~inseq_lightning.attr.step_scorer.StepScorer`.
        head_recorder: records the output layer's input during a forward (the point where the
            per-step backward splits); methods that run their own forwards record with it.
        gradient_passes: forward + per-step backward rounds the method runs over all steps
            (integration chunks for integrated gradients), so that each round counts its share of progress.
    """

    model: Any  # AttributionModel
    batch: "Batch"
    request: "AttributionRequest"
    progress: Callable[[float], None] | None = None
    contrast: "ContrastBatch | None" = None
    sharded: bool | None = None  # whether the model's parameters are sharded (None: find out)
    gradient_passes: int = 1
    reported_tokens: float = field(init=False, default=0.0)

    def __post_init__(self):
        self.adapter = self.model.architecture
        self.scorer = StepScorer(self.model, self.batch, self.request, lambda: self.forward(self.embeddings()),
                                 self.contrast)
        self.positions, self.valid = self.scorer.positions, self.scorer.valid
        self._decoder_embeds = None
        sharded = has_sharded_parameters(self.model.model) if self.sharded is None else self.sharded
        self.head_recorder = HeadRecorder(self.model.model, enabled=not sharded)
        budget = self.request.memory_budget_bytes
        if budget is None:
            budget = SHARDED_MEMORY_BUDGET_BYTES if sharded else self.model.default_memory_budget
        self.memory_budget_bytes = budget
        dims = model_dims(self.model.model.config)
        self.layout = StepLayout(
            self.positions, self.valid, self.batch.target_ids.shape[1],
            hidden_size=dims.hidden, num_layers=dims.layers, inner_size=dims.inner, num_heads=dims.heads,
            kv_dim=dims.kv_dim, vocab_size=dims.vocab,
        )
        self._forward_kwargs = {**self.model.forward_defaults, **self._logits_to_keep()}
        self._sharded = sharded
        self._segments: list[tuple[torch.Tensor, range]] | None = None  # of the last forward, for its backward
        # From the batch's host-side lists: no device sync per batch or per report.
        lengths = [len(positions) for positions in self.batch.step_positions]
        self._tokens_per_step = [sum(length > k for length in lengths) for k in range(self.num_steps)]

    @property
    def attribute_target(self) -> bool:
        return self.request.attribute_target

    def _logits_to_keep(self) -> dict[str, int]:
        """``logits_to_keep`` from the first position that predicts an attributed step: the prompt's
        other positions predict nothing attributed, and with a large vocabulary their output layer
        is a large share of the forward's time and memory (decoder-only models that take it)."""
        if not self.model.can_skip_logits:
            return {}
        starts = [positions[0] for positions in self.batch.step_positions if len(positions)]
        first = min(starts) - 1 if starts else 0
        return {"logits_to_keep": self.batch.target_ids.shape[1] - first} if first > 0 else {}

    @property
    def num_steps(self) -> int:
        return self.positions.shape[1]

    @property
    def num_tokens(self) -> int:
        """Attributed tokens in the batch (steps of every sequence): the unit of progress."""
        return int(sum(self._tokens_per_step))

    def report_steps_done(self, steps: range) -> None:
        if self.progress is None:
            return
        tokens = sum(self._tokens_per_step[steps.start : steps.stop]) / max(self.gradient_passes, 1)
        self.reported_tokens += tokens
        self.progress(tokens)

    @property
    def needs_logits(self) -> bool:
        """False when no step scores are asked for: a pass that only reads internals may skip the
        output layer."""
        return self.scorer.has_step_scores

    # ---- inputs (the adapter's) ------------------------------------------------------------
    def embeddings(self) -> list[torch.Tensor]:
        """The tensors attributed by embedding-level methods (one per attributed side)."""
        return self.adapter.attributed_embeddings(self.batch, self.attribute_target)

    def baseline_embeddings(self) -> list[torch.Tensor]:
        return self.adapter.attributed_embeddings(self.batch, self.attribute_target, baseline=True)

    def attributed_ids(self, baseline: bool = False) -> torch.Tensor:
        """The ids whose embedding-layer output layer methods attribute."""
        return self.adapter.attributed_ids(self.batch, baseline)

    def visible_lengths(self, which: int) -> torch.Tensor:
        """``[B, N]`` how many tokens of attributed input ``which`` each step sees: its prefix on the
        target side, the whole (unpadded) source on an encoder's."""
        return self.adapter.visible_lengths(self.batch, which, self.positions)

    def split(self, results: Sequence[torch.Tensor | None]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Per-attributed-input results -> (source, target)."""
        return self.adapter.split(results)

    def decoder_embeddings(self) -> torch.Tensor:
        """Target-side embeddings fed as-is (not attributed), computed once per batch."""
        if self._decoder_embeds is None:
            self._decoder_embeds = self.adapter.embed(self.batch.target_ids, as_targets=True).detach()
        return self._decoder_embeds

    # ---- forward --------------------------------------------------------------------------
    def forward(self, inputs: Sequence[torch.Tensor], repeat: int = 1, **kwargs) -> ModelOutput:
        """Run the model on attributed embeddings ``inputs`` (as returned by :meth:`embeddings`,
        possibly interpolated), whose batch is ``repeat`` stacked copies of the batch.

        On decoder-only models with a plain key/value cache, a forward whose per-step backwards follow
        runs in segments (``BackwardStrategy.segments``): the same numbers, and each step's backward then
        covers only the segments up to its own (:mod:`.backward`)."""
        if not torch.is_grad_enabled():  # a step function's extra forward: the last backward's forward stays
            return self.adapter.forward_embeddings(self.batch, inputs, self.decoder_embeddings, repeat,
                                                   **{**self._forward_kwargs, **kwargs})
        self._segments = None
        cache_name = self._segment_cache_argument(inputs, kwargs)
        plan = self._segment_plan(inputs, repeat) if cache_name is not None else None
        if plan is not None:
            output = self._segmented_forward(inputs[0], repeat, plan, cache_name)
            if output is not None:
                return output
        with self.head_recorder.recording():
            return self.adapter.forward_embeddings(self.batch, inputs, self.decoder_embeddings, repeat,
                                                   **{**self._forward_kwargs, **kwargs})

    def _segment_cache_argument(self, inputs: Sequence[torch.Tensor], kwargs: dict) -> str | None:
        """The forward argument a segment's cache goes in, or None where segments cannot run: they need a
        forward with gradient on one attributed input, without extra arguments, split at a ``Linear``
        output layer, and a model whose forward continues a plain cache (decoder-only, not sharded, not
        known to return another cache)."""
        if (kwargs or len(inputs) != 1 or not inputs[0].requires_grad or not torch.is_grad_enabled()
                or self._sharded or not self.request.backward.split_at_head
                or not isinstance(self.model.model.get_output_embeddings(), torch.nn.Linear)
                or self.adapter.model in _NO_PLAIN_CACHE):
            return None
        return self.adapter.prefix_cache_argument()

    def _segment_plan(self, inputs: Sequence[torch.Tensor], repeat: int) -> list[range] | None:
        """The steps of each forward segment, or None for one whole forward."""
        rows = repeat * self.batch.size
        # The segments' logits are joined into one tensor, a copy: only when that copy fits in the budget.
        kept = self._forward_kwargs.get("logits_to_keep", inputs[0].shape[1])
        if rows * kept * (self.layout.vocab_size or VOCAB_SIZE_WHEN_UNKNOWN) * inputs[0].element_size() > self.memory_budget_bytes:
            return None
        chunk = self.request.backward.steps_per_chunk(self.layout, rows, inputs[0].shape[1], self.memory_budget_bytes,
                                                      split=True, segmented=True)
        return plan_segments(self.request.backward, self.layout, chunk)

    def _segmented_forward(self, x: torch.Tensor, repeat: int, plan: list[range], cache_name: str) -> ModelOutput | None:
        """The forward of ``plan``'s segments, each continuing the previous one's key/value cache (which
        carries the gradient), the logits joined as one forward keeps them; None when the model's cache
        is not a plain one (the caller runs one whole forward)."""
        first_predicting = int(self.positions[0, 0]) - 1
        bounds = [0] + [int(self.positions[0, steps.start]) - 1 for steps in plan[1:]] + [x.shape[1]]
        mask = self.batch.target_mask.repeat(repeat, 1)
        kwargs = {**self.model.forward_defaults, "use_cache": True}
        cache, logits = None, []
        with self.head_recorder.recording():
            for start, end in itertools.pairwise(bounds):
                segment_kwargs = dict(kwargs)
                if cache is not None:
                    segment_kwargs[cache_name] = cache
                if self.model.can_skip_logits:  # as the whole forward: from the first predicting position
                    segment_kwargs["logits_to_keep"] = end - max(start, first_predicting)
                output = self.adapter.model(inputs_embeds=x[:, start:end], attention_mask=mask[:, :end],
                                            **segment_kwargs)
                cache = returned_cache(output)
                if not is_plain_cache(cache, end):
                    _NO_PLAIN_CACHE.add(self.adapter.model)
                    return None
                logits.append(output.logits)
                del output
        heads = self.head_recorder.inputs
        self.head_recorder.inputs = []
        if len(heads) == len(plan):
            self._segments = list(zip(heads, plan))
        return ModelOutput(logits=torch.cat(logits, dim=1))

    def forward_ids_with_layer(self, layer_output: torch.Tensor, repeat: int = 1, **kwargs) -> ModelOutput:
        """Run the model from token ids, replacing the embedding layer's output (the one that
        embeds the attributed side) with ``layer_output``."""
        if torch.is_grad_enabled():
            self._segments = None  # a whole forward: its backward splits at its own head
        with self.head_recorder.recording():
            return self.adapter.forward_ids_with_layer(self.batch, layer_output, self.decoder_embeddings, repeat,
                                                       **{**self._forward_kwargs, **kwargs})

    # ---- scores (the scorer's) ------------------------------------------------------------
    def step_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return self.scorer.step_logits(logits)

    def attributed_scores(self, output: ModelOutput, at_real_inputs: bool = False) -> torch.Tensor:
        return self.scorer.attributed_scores(output, at_real_inputs)

    def record_step_scores(self, step_logits: torch.Tensor) -> None:
        self.scorer.record_step_scores(step_logits)

    # ---- gradients (the backward strategy's) ----------------------------------------------
    def step_gradients(
        self, scores: torch.Tensor, inputs: Sequence[torch.Tensor], retain_graph: bool = False,
        row_weights: Sequence[torch.Tensor | float] | None = None,
    ) -> list[torch.Tensor]:
        """Gradients of each step's score w.r.t. each input: ``[rows, L, N, ...]`` per input
        (``[B, L, N, ...]`` weighted sums over the stacked copies with ``row_weights``); see
        :func:`~inseq_lightning.attr.backward.step_gradients`."""
        segments, self._segments = self._segments, None
        head = None if segments else self.head_recorder.split_point(scores.shape[0], self.layout.target_length)
        try:
            return step_gradients(self.request.backward, self.layout, self.memory_budget_bytes, scores, inputs, head,
                                  retain_graph, row_weights, self.report_steps_done, segments)
        finally:
            self.head_recorder.inputs = []


def interpolation_chunks(n_points: int, batch_size: int, internal_batch_size: int | None) -> list[range]:
    """Split integration points so that each forward holds at most ``internal_batch_size`` rows."""
    if internal_batch_size is None:
        return [range(n_points)]
    per_forward = max(1, internal_batch_size // max(batch_size, 1))
    return [range(s, min(s + per_forward, n_points)) for s in range(0, n_points, per_forward)]


def nan_future_positions(attr: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mark target-side rows not yet generated at each step (row >= step position) as NaN.

    ``attr``: ``[B, T, N, ...]``; ``positions`` / ``valid``: ``[B, N]``.
    """
    rows = torch.arange(attr.shape[1], device=attr.device).view(1, -1, 1)
    future = (rows >= positions.unsqueeze(1)) | ~valid.unsqueeze(1)
    future = future.view(*future.shape, *([1] * (attr.ndim - 3)))
    # In place (attributions are the engine's own tensors) unless broadcast views share memory.
    shared = any(stride == 0 and size > 1 for stride, size in zip(attr.stride(), attr.shape))
    return attr.masked_fill(future, math.nan) if shared else attr.masked_fill_(future, math.nan)
