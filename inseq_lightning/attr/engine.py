"""The attribution engine: one forward pass shared by every teacher-forced step, batched backward.

For a causal decoder the logits that predict target position ``t`` only depend on positions
``< t``, so a single forward over the whole (prompt + target) sequence yields the predictions of
every step. The gradients of all steps' scores then come from one vectorised backward
(``torch.autograd.grad(..., is_grads_batched=True)``) per chunk of steps, chunked to a memory budget.

The backward is split at the input of the output projection (``lm_head``): each step's score
depends only on the hidden row that predicts it, so one ordinary backward of the summed scores
gives every step's gradient at that layer, and only the part below it (``[steps, L, hidden]``
instead of ``[steps, L, vocab]``) is vectorised. With a 50k vocabulary this removes most of the
backward's work and memory.
"""

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from transformers.utils import ModelOutput

from ..utils.sharding import has_sharded_parameters
from .step_functions import StepFunctionArgs, step_function_kwargs

if TYPE_CHECKING:
    from ..models.batch import Batch

SHARDED_MEMORY_BUDGET_BYTES = 80 * 1024**2


def default_memory_budget(model: torch.nn.Module) -> int:
    """A quarter of the model's parameter memory: what the vectorised backward may add on top of
    the forward pass. Batching steps then never costs more than a fraction of what holding the
    model already costs, and grows with the model (a 7B model on a GPU batches many steps; a
    2-layer toy model takes one step per backward and stays at inseq's peak memory)."""
    return sum(p.numel() * p.element_size() for p in model.parameters()) // 4


@dataclass
class EngineContext:
    """Everything a method needs for one batch. Tensors are ``[B, L, ...]`` with B sequences.

    ``score_fn`` is the attributed function (a step function), ``score_kwargs`` its extra arguments.
    """

    model: Any  # AttributionModel
    batch: "Batch"
    score_fn: Callable[..., torch.Tensor]
    score_kwargs: dict[str, Any]
    attribute_target: bool
    memory_budget_bytes: int | None = None  # None: default_memory_budget(model)
    # ``(ctx, [B, N, V] step logits at the real inputs) -> {name: [B, N]}``; None when no step
    # scores are asked for. It takes the context as an argument: a closure over it would be a cycle.
    step_scorer: Callable[["EngineContext", torch.Tensor], dict[str, torch.Tensor]] | None = None
    step_score_values: dict[str, torch.Tensor] | None = field(init=False, default=None)
    # Progress in attributed tokens (sequence-steps): ``progress(n)`` advances the caller's bar.
    # ``gradient_passes``: forward + per-step backward rounds the method runs over all steps
    # (integration chunks for integrated gradients), so that each round counts its share.
    progress: Callable[[float], None] | None = None
    gradient_passes: int = 1
    reported_tokens: float = field(init=False, default=0.0)
    positions: torch.Tensor = field(init=False)
    valid: torch.Tensor = field(init=False)

    def __post_init__(self):
        self.positions, self.valid = self.batch.step_index()
        self._score_kwargs = step_function_kwargs(self.score_fn, self.score_kwargs)
        self._decoder_embeds = None
        self._head_inputs: list[torch.Tensor] = []
        self.sharded = has_sharded_parameters(self.model.model)
        if self.memory_budget_bytes is None:
            # Sharded ranks must chunk identically (every backward is a collective), and a rank's
            # view of the parameters holds only its shard: a fixed budget keeps them in lockstep.
            budget = SHARDED_MEMORY_BUDGET_BYTES if self.sharded else self.model.default_memory_budget
            self.memory_budget_bytes = budget
        self._forward_kwargs = {**self.model.forward_defaults, **self._logits_to_keep()}
        # From the batch's host-side lists: no device sync per batch or per report.
        lengths = [len(positions) for positions in self.batch.step_positions]
        self._tokens_per_step = [sum(length > k for length in lengths) for k in range(self.num_steps)]

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
        return self.step_scorer is not None

    @property
    def is_encoder_decoder(self) -> bool:
        return self.model.is_encoder_decoder

    @property
    def num_steps(self) -> int:
        return self.positions.shape[1]

    # ---- inputs ---------------------------------------------------------------------------
    def embeddings(self) -> list[torch.Tensor]:
        """The tensors attributed by embedding-level methods: ``[source]`` (+ ``target`` when
        ``attribute_target``) for encoder-decoder, ``[target]`` for decoder-only."""
        return self._embed_sides(self.batch.source_ids, self.batch.target_ids)

    def baseline_embeddings(self) -> list[torch.Tensor]:
        return self._embed_sides(self.batch.source_baseline_ids, self.batch.target_baseline_ids)

    def _embed_sides(self, source_ids, target_ids) -> list[torch.Tensor]:
        if not self.is_encoder_decoder:
            return [self.model.embed(target_ids)]
        out = [self.model.embed(source_ids)]
        if self.attribute_target:
            out.append(self.model.embed(target_ids, as_targets=True))
        return out

    def decoder_embeddings(self) -> torch.Tensor:
        """Target-side embeddings fed as-is (not attributed), computed once per batch."""
        if self._decoder_embeds is None:
            self._decoder_embeds = self.model.embed(self.batch.target_ids, as_targets=True).detach()
        return self._decoder_embeds

    def input_ids(self) -> list[torch.Tensor]:
        b = self.batch
        return [b.source_ids] if self.is_encoder_decoder else [b.target_ids]

    def baseline_ids(self) -> list[torch.Tensor]:
        b = self.batch
        return [b.source_baseline_ids] if self.is_encoder_decoder else [b.target_baseline_ids]

    # ---- forward --------------------------------------------------------------------------
    @contextlib.contextmanager
    def _recording_head_input(self) -> Iterator[None]:
        """Keep the input of the output projection of the coming forward (see the module doc).

        Not on sharded models: a backward that stops at the head runs FSDP's end-of-backward
        callback, which reshards the root's parameters that the rest of the backward still needs."""
        if not torch.is_grad_enabled():  # e.g. a step function's extra forwards: keep what was recorded
            yield
            return
        self._head_inputs = []
        head = self.model.model.get_output_embeddings()
        # A Linear maps each row on its own, which is what makes the split exact.
        if not isinstance(head, torch.nn.Linear) or self.sharded:
            yield
            return
        handle = head.register_forward_hook(lambda module, args, output: self._head_inputs.append(args[0]))
        try:
            yield
        finally:
            handle.remove()

    def forward(self, inputs: Sequence[torch.Tensor], repeat: int = 1, **kwargs) -> ModelOutput:
        """Run the model on attributed embeddings ``inputs`` (as returned by :meth:`embeddings`,
        possibly interpolated), whose batch is ``repeat`` stacked copies of the batch."""
        with self._recording_head_input():
            return self._forward(inputs, repeat, **{**self._forward_kwargs, **kwargs})

    def _forward(self, inputs: Sequence[torch.Tensor], repeat: int = 1, **kwargs) -> ModelOutput:
        b = self.batch
        if self.is_encoder_decoder:
            source = inputs[0]
            target = inputs[1] if self.attribute_target else self.decoder_embeddings()
            if target.shape[0] != source.shape[0]:
                target = target.repeat(repeat, 1, 1)
            return self.model.model(
                inputs_embeds=source,
                attention_mask=b.source_mask.repeat(repeat, 1),
                decoder_inputs_embeds=self.model.decoder_input(target),
                decoder_attention_mask=b.target_mask.repeat(repeat, 1),
                **kwargs,
            )
        return self.model.model(inputs_embeds=inputs[0], attention_mask=b.target_mask.repeat(repeat, 1), **kwargs)

    def forward_ids_with_layer(self, layer_output: torch.Tensor, repeat: int = 1, **kwargs) -> ModelOutput:
        """Run the model from token ids, replacing the embedding layer's output (the one that
        embeds the attributed side) with ``layer_output``."""
        b = self.batch
        # Decoder embeddings are computed before the hook exists: the layer may be shared.
        decoder_embeds = self.decoder_embeddings() if self.is_encoder_decoder else None
        layer = self.model.model.get_input_embeddings()
        handle = layer.register_forward_hook(lambda module, args, output: layer_output)
        kwargs = {**self._forward_kwargs, **kwargs}
        try:
            with self._recording_head_input():
                if self.is_encoder_decoder:
                    return self.model.model(
                        input_ids=b.source_ids.repeat(repeat, 1),
                        attention_mask=b.source_mask.repeat(repeat, 1),
                        decoder_inputs_embeds=self.model.decoder_input(decoder_embeds.repeat(repeat, 1, 1)),
                        decoder_attention_mask=b.target_mask.repeat(repeat, 1),
                        **kwargs,
                    )
                return self.model.model(
                    input_ids=b.target_ids.repeat(repeat, 1), attention_mask=b.target_mask.repeat(repeat, 1), **kwargs
                )
        finally:
            handle.remove()

    # ---- scores ---------------------------------------------------------------------------
    def step_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """``[R*B, T', V]`` logits of the last ``T'`` positions (all ``T``, or what
        ``logits_to_keep`` kept) -> ``[R*B, N, V]`` logits that predict each attributed step."""
        repeat = logits.shape[0] // self.batch.size
        offset = self.batch.target_ids.shape[1] - logits.shape[1]
        # Padding steps point before the kept positions: clamped into range, their values are masked.
        index = (self.positions - 1 - offset).clamp(min=0).repeat(repeat, 1)
        return logits.gather(1, index.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))

    def step_target_ids(self, repeat: int = 1) -> torch.Tensor:
        return self.batch.target_ids.gather(1, self.positions).repeat(repeat, 1)

    def step_function_args(
        self, step_logits: torch.Tensor, is_attributed_fn: bool, forward_again: Callable | None = None
    ) -> StepFunctionArgs:
        """Flatten ``[R*B, N, V]`` step logits into the ``[M, 1, V]`` view step functions read."""
        rows, n, vocab = step_logits.shape
        repeat = rows // self.batch.size
        b = self.batch

        def expand(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.repeat(repeat, 1).repeat_interleave(n, 0)

        return StepFunctionArgs(
            attribution_model=self.model,
            forward_output=ModelOutput(logits=step_logits.reshape(rows * n, 1, vocab)),
            target_ids=self.step_target_ids(repeat).reshape(-1),
            decoder_input_ids=expand(b.target_ids),
            decoder_attention_mask=expand(b.target_mask),
            encoder_input_ids=expand(b.source_ids),
            encoder_attention_mask=expand(b.source_mask),
            is_attributed_fn=is_attributed_fn,
            forward_again=forward_again,
        )

    def attributed_scores(self, output: ModelOutput, at_real_inputs: bool = False) -> torch.Tensor:
        """The attributed function's scores of a forward (see :meth:`scores`). A forward on the
        real (unperturbed, unrepeated) inputs also gives the step scores, computed here at once.

        Nothing outlives this call but the scores' graph: the graph does not save the full
        ``[R*B, T, V]`` logits nor, once the step scores are taken, their step rows, so both are
        freed before the backward (with a 50k vocabulary that is most of a small model's peak)."""
        logits = self.step_logits(output.logits)
        if at_real_inputs:
            self.record_step_scores(logits)
        return self.scores(logits)

    def real_step_logits(self) -> torch.Tensor:
        """``[B, N, V]`` step logits of a fresh forward on the real inputs (for step scores when the
        method never ran one, and for step functions that forward again)."""
        return self.step_logits(self.forward(self.embeddings()).logits)

    def record_step_scores(self, step_logits: torch.Tensor) -> None:
        """Step scores from ``[B, N, V]`` step logits at the real inputs (the first such call wins)."""
        if self.step_scorer is not None and self.step_score_values is None:
            with torch.no_grad():
                self.step_score_values = self.step_scorer(self, step_logits.detach())

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """``[R*B, N]`` values of the attributed function for every step (0 on padding steps), from
        the ``[R*B, N, V]`` step logits (:meth:`step_logits`)."""
        args = self.step_function_args(logits, is_attributed_fn=True)
        values = self.score_fn(args, **self._score_kwargs)
        values = values.reshape(logits.shape[0], logits.shape[1]).to(logits.dtype)
        valid = self.valid.repeat(values.shape[0] // self.batch.size, 1)
        return torch.where(valid, values, torch.zeros_like(values))

    # ---- gradients ------------------------------------------------------------------------
    def step_chunk(self, rows: int, length: int) -> int:
        """How many steps one vectorised backward may cover within the memory budget."""
        config = self.model.model.config
        hidden = getattr(config, "hidden_size", None) or getattr(config, "d_model", 512)
        layers = getattr(config, "num_hidden_layers", None) or getattr(config, "num_layers", 12)
        per_step = rows * length * hidden * max(layers, 1) * 4 * 24  # activations touched per backward
        return max(1, min(self.num_steps, int(self.memory_budget_bytes // max(per_step, 1))))

    def step_gradients(
        self, scores: torch.Tensor, inputs: Sequence[torch.Tensor], retain_graph: bool = False,
        row_weights: Sequence[torch.Tensor | float] | None = None,
    ) -> list[torch.Tensor]:
        """Gradients of each step's score w.r.t. each input: ``[rows, L, N, ...]`` per input.

        ``row_weights`` (one per input, broadcastable to it, e.g. ``[R*B, 1, 1]``, or a number): the rows are
        ``R`` stacked copies of the batch (integration points, samples) and each chunk's gradients
        are weighted and summed over the copies as they come, giving ``[B, L, N, ...]``. Only the
        sum is ever held: with 50 integration points the per-point gradients would be 50 times
        the result."""
        rows, n = scores.shape
        chunk = self.step_chunk(rows, max(t.shape[1] for t in inputs))
        head = self._split_point(rows)
        if head is not None:
            # Every step's gradient at the output projection's input, in one ordinary backward.
            # Without retain_graph this frees what only the part above the head saved (the
            # softmax over the vocabulary); the part below is not run, so it keeps its buffers.
            (head_grad,) = torch.autograd.grad(scores.sum(), head, retain_graph=retain_graph)
            seeds_of = self._head_seeds(head_grad)
            outputs = head
        else:
            seeds_of = self._score_seeds(rows, n, scores)
            outputs = scores
        # Each chunk's gradients go straight into the result, allocated once up front: the heap
        # then reuses one hole for every chunk's temporary instead of stacking them up beside the
        # graph's buffers, and there is no join (a second copy) at the end.
        out_rows = self.batch.size if row_weights is not None else rows
        # Sums over integration points accumulate in float32 even for half-precision models.
        dtypes = [torch.promote_types(x.dtype, torch.float32) if row_weights is not None else x.dtype for x in inputs]
        results = [x.new_empty((out_rows, x.shape[1], n, *x.shape[2:]), dtype=d) for x, d in zip(inputs, dtypes)]
        for start in range(0, n, chunk):
            steps = range(start, min(start + chunk, n))
            keep = retain_graph or steps.stop < n
            grads = _batched_grad(outputs, inputs, seeds_of(steps), keep)
            for i, (result, g) in enumerate(zip(results, grads)):
                if g is None:  # an input the scores do not depend on: zero gradient
                    result[:, :, steps.start : steps.stop].zero_()
                    continue
                if row_weights is not None:  # [steps, R*B, L, D] -> [steps, B, L, D], weighted sum over R
                    g = (g.to(result.dtype) * row_weights[i]).view(len(steps), -1, out_rows, *g.shape[2:]).sum(1)
                result[:, :, steps.start : steps.stop] = g.movedim(0, 2)  # [steps, rows, L, D] -> [rows, L, steps, D]
            del grads
            self.report_steps_done(steps)
        self._head_inputs = []
        return results

    def _split_point(self, rows: int) -> torch.Tensor | None:
        """The output projection's input of the last forward, when the backward can split there:
        exactly one call, on ``[rows, T', hidden]`` (the last ``T' <= T`` positions), inside the graph."""
        if len(self._head_inputs) != 1:
            return None
        head = self._head_inputs[0]
        # The last T' <= T positions when logits_to_keep trimmed the prompt's.
        if head.ndim != 3 or not head.requires_grad or head.shape[0] != rows or head.shape[1] > self.batch.target_ids.shape[1]:
            return None
        return head

    def _head_seeds(self, head_grad: torch.Tensor) -> Callable[[range], torch.Tensor]:
        """Per-step seeds ``[steps, rows, T, hidden]``: step k keeps only the row that predicts it."""
        rows, length, _ = head_grad.shape
        repeat = rows // self.batch.size
        predicting = (self.positions - 1).repeat(repeat, 1).T  # [N, rows]
        valid = self.valid.repeat(repeat, 1).T
        # absolute position of each row of the head's input (the last ``length`` of T)
        time = torch.arange(length, device=head_grad.device) + (self.batch.target_ids.shape[1] - length)
        # [N, rows, T, 1]: which row of the head's input predicts each (valid) step
        pick = ((predicting.unsqueeze(-1) == time) & valid.unsqueeze(-1)).unsqueeze(-1).to(head_grad.dtype)
        return lambda steps: pick[steps.start : steps.stop] * head_grad

    @staticmethod
    def _score_seeds(rows: int, n: int, scores: torch.Tensor) -> Callable[[range], torch.Tensor]:
        """One-hot seeds ``[steps, rows, N]`` on the scores themselves (no split point found)."""

        def seeds(steps: range) -> torch.Tensor:
            eye = torch.zeros(len(steps), rows, n, dtype=scores.dtype, device=scores.device)
            for j, k in enumerate(steps):
                eye[j, :, k] = 1.0
            return eye

        return seeds


def _batched_grad(
    scores: torch.Tensor, inputs: Sequence[torch.Tensor], grad_outputs: torch.Tensor, retain_graph: bool
) -> tuple[torch.Tensor, ...]:
    """Vectorised backward (one pass for many steps); a plain loop where vmap cannot batch an op."""
    if grad_outputs.shape[0] == 1:  # one step: a plain backward is faster than vmap's batching rules
        grads = torch.autograd.grad(scores, list(inputs), grad_outputs=grad_outputs[0], retain_graph=retain_graph,
                                    allow_unused=True)
        return tuple(None if g is None else g.unsqueeze(0) for g in grads)
    try:
        return torch.autograd.grad(
            scores, list(inputs), grad_outputs=grad_outputs, is_grads_batched=True, retain_graph=retain_graph,
            allow_unused=True,
        )
    except RuntimeError:
        outs = [
            torch.autograd.grad(scores, list(inputs), grad_outputs=g, retain_graph=True, allow_unused=True)
            for g in grad_outputs
        ]
        return tuple(torch.stack(parts) for parts in zip(*outs))


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
