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

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from transformers.utils import ModelOutput

from ..utils.model_dims import model_dims
from ..utils.sharding import has_sharded_parameters
from .backward import SHARDED_MEMORY_BUDGET_BYTES, HeadRecorder, StepLayout, default_memory_budget, step_gradients
from .step_scorer import StepScorer

if TYPE_CHECKING:
    from ..models.batch import Batch
    from .contrast import ContrastBatch
    from .request import AttributionRequest

__all__ = ["EngineContext", "default_memory_budget", "interpolation_chunks", "nan_future_positions"]


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
            hidden_size=dims.hidden, num_layers=dims.layers,
        )
        self._forward_kwargs = {**self.model.forward_defaults, **self._logits_to_keep()}
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
        possibly interpolated), whose batch is ``repeat`` stacked copies of the batch."""
        with self.head_recorder.recording():
            return self.adapter.forward_embeddings(self.batch, inputs, self.decoder_embeddings, repeat,
                                                   **{**self._forward_kwargs, **kwargs})

    def forward_ids_with_layer(self, layer_output: torch.Tensor, repeat: int = 1, **kwargs) -> ModelOutput:
        """Run the model from token ids, replacing the embedding layer's output (the one that
        embeds the attributed side) with ``layer_output``."""
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
        head = self.head_recorder.split_point(scores.shape[0], self.layout.target_length)
        try:
            return step_gradients(self.request.backward, self.layout, self.memory_budget_bytes, scores, inputs, head,
                                  retain_graph, row_weights, self.report_steps_done)
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
