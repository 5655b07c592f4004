"""The step scorer: every score of one batch, from the logits of one forward.

It owns the per-step logits (gathered from a forward over whole sequences), the packing of
step-function arguments, the attributed function's scores (what the backward differentiates), the
step scores (read once at the real inputs) and the contrastive forward (one per batch).
"""

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from transformers.utils import ModelOutput

from .step_functions import ContrastView, StepFunctionArgs, is_vectorized, step_function_kwargs, uses_contrast

if TYPE_CHECKING:
    from ..models.batch import Batch
    from .contrast import ContrastBatch
    from .request import AttributionRequest


class StepScorer:
    """Scores of one batch.

    Args:
        wrapper: the :class:`~inseq_lightning.models.AttributionModel` (given to step functions as
            ``args.attribution_model``).
        batch: the batch.
        request: the validated request (attributed function, step functions and their arguments).
        forward_real: runs a fresh forward on the real inputs (for step scores when the method never
            ran one, and for step functions that forward again).
        contrast: the batch's contrast inputs, when the call has any.
    """

    def __init__(self, wrapper, batch: "Batch", request: "AttributionRequest",
                 forward_real: Callable[[], ModelOutput], contrast: "ContrastBatch | None" = None):
        self.wrapper, self.batch, self.request = wrapper, batch, request
        self.positions, self.valid = batch.step_index()
        self.forward_real = forward_real
        self.contrast = contrast
        self.step_score_values: dict[str, torch.Tensor] | None = None
        self._attributed_kwargs = step_function_kwargs(request.attributed_fn, request.attributed_fn_kwargs)
        self._contrast_logits: torch.Tensor | None = None

    @property
    def has_step_scores(self) -> bool:
        return bool(self.request.step_functions)

    # ---- logits ---------------------------------------------------------------------------
    def step_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """``[R*B, T', V]`` logits of the last ``T'`` positions (all ``T``, or what ``logits_to_keep``
        kept) -> ``[R*B, N, V]`` logits that predict each attributed step."""
        repeat = logits.shape[0] // self.batch.size
        offset = self.batch.target_ids.shape[1] - logits.shape[1]
        # Padding steps point before the kept positions: clamped into range, their values are masked.
        index = (self.positions - 1 - offset).clamp(min=0).repeat(repeat, 1)
        return logits.gather(1, index.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))

    def step_target_ids(self, repeat: int = 1) -> torch.Tensor:
        return self.batch.target_ids.gather(1, self.positions).repeat(repeat, 1)

    def real_step_logits(self) -> torch.Tensor:
        """``[B, N, V]`` step logits of a fresh forward on the real inputs."""
        return self.step_logits(self.forward_real().logits)

    def contrast_step_logits(self) -> torch.Tensor:
        """``[B, N, V]`` logits of the contrast forward that predict each step's contrast token: one
        forward over the whole contrast inputs per batch, computed on first use."""
        if self._contrast_logits is None:
            c = self.contrast
            with torch.no_grad():
                output = self.wrapper.architecture.forward_ids(c.target_ids, c.target_mask, c.source_ids, c.source_mask,
                                                               **self.wrapper.forward_defaults)
            index = (c.aligned - 1).unsqueeze(-1).expand(-1, -1, output.logits.shape[-1])
            self._contrast_logits = output.logits.gather(1, index)
        return self._contrast_logits

    # ---- step-function arguments ----------------------------------------------------------
    def function_args(self, step_logits: torch.Tensor, is_attributed_fn: bool,
                      forward_again: Callable | None = None) -> StepFunctionArgs:
        """Flatten ``[R*B, N, V]`` step logits into the ``[M, 1, V]`` rows step functions read
        (row ``(r * B + b) * N + n``: copy ``r``, sequence ``b``, step ``n``)."""
        rows, n, vocab = step_logits.shape
        repeat = rows // self.batch.size
        b = self.batch

        def expand(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.repeat(repeat, *([1] * (t.ndim - 1))).repeat_interleave(n, 0)

        contrast = None
        if self.contrast is not None:
            ids = self.contrast.step_target_ids().repeat(repeat, 1).reshape(-1)

            def contrast_logits() -> torch.Tensor:
                logits = self.contrast_step_logits()
                return logits.repeat(repeat, 1, 1).reshape(-1, logits.shape[-1])

            contrast = ContrastView(ids, contrast_logits, self.request.contrast.force_inputs)
        return StepFunctionArgs(
            attribution_model=self.wrapper,
            forward_output=ModelOutput(logits=step_logits.reshape(rows * n, 1, vocab)),
            target_ids=self.step_target_ids(repeat).reshape(-1),
            decoder_input_ids=expand(b.target_ids),
            decoder_attention_mask=expand(b.target_mask),
            encoder_input_ids=expand(b.source_ids),
            encoder_attention_mask=expand(b.source_mask),
            is_attributed_fn=is_attributed_fn,
            forward_again=forward_again,
            contrast=contrast,
        )

    def call(self, fn, args: StepFunctionArgs, kwargs: dict[str, Any]) -> torch.Tensor:
        """``fn(args, **kwargs)`` as ``[M]``: built-ins at once, registered functions per step with
        inseq's per-step arguments (the prefix before each predicted token), rows grouped by prefix length."""
        if is_vectorized(fn):
            return fn(args, **kwargs).reshape(-1)
        if self.contrast is not None and uses_contrast(fn):
            # inseq hands contrastive functions the alignments it filled in (one list per sequence).
            kwargs = {**kwargs, "contrast_targets_alignments": [
                list(zip(positions, aligned)) for positions, aligned in
                zip(self.batch.step_positions, self.contrast.aligned_lists)]}
        n = self.positions.shape[1]
        prefix = self.positions.repeat(args.target_ids.shape[0] // (self.batch.size * n), 1).reshape(-1)
        rows_valid = self.valid.repeat(args.target_ids.shape[0] // (self.batch.size * n), 1).reshape(-1)
        out = None
        for length in sorted(set(prefix[rows_valid].tolist())):
            rows = ((prefix == length) & rows_valid).nonzero().squeeze(-1)
            values = fn(self._per_step_args(args, rows, length), **kwargs).reshape(-1)
            if out is None:
                out = torch.zeros(prefix.shape[0], dtype=values.dtype, device=values.device)
            out = out.index_copy(0, rows.to(values.device), values)
        return out

    def _per_step_args(self, args: StepFunctionArgs, rows: torch.Tensor, length: int) -> StepFunctionArgs:
        """The rows ``rows`` of ``args`` as inseq passes one step: decoder inputs cut to the prefix."""
        take = lambda t: None if t is None else t.index_select(0, rows)
        decoder_ids = args.decoder_input_ids.index_select(0, rows)[:, :length]
        encoder_ids = take(args.encoder_input_ids)
        adapter = self.wrapper.architecture
        with torch.no_grad():
            decoder_embeds = adapter.embed(decoder_ids, as_targets=True)
            encoder_embeds = adapter.embed(encoder_ids) if encoder_ids is not None else None
        contrast = None
        if args.contrast is not None:
            c = args.contrast
            contrast = ContrastView(c.target_ids.index_select(0, rows), lambda: c.logits().index_select(0, rows),
                                    c.force_inputs)
        return StepFunctionArgs(
            attribution_model=args.attribution_model,
            forward_output=ModelOutput(logits=args.forward_output.logits.index_select(0, rows)),
            target_ids=args.target_ids.index_select(0, rows),
            decoder_input_ids=decoder_ids,
            decoder_attention_mask=args.decoder_attention_mask.index_select(0, rows)[:, :length],
            decoder_input_embeds=decoder_embeds,
            encoder_input_ids=encoder_ids,
            encoder_attention_mask=take(args.encoder_attention_mask),
            encoder_input_embeds=encoder_embeds,
            is_attributed_fn=args.is_attributed_fn,
            forward_again=None if args.forward_again is None else (lambda: args.forward_again().index_select(0, rows)),
            contrast=contrast,
        )

    # ---- scores ---------------------------------------------------------------------------
    def scores(self, step_logits: torch.Tensor) -> torch.Tensor:
        """``[R*B, N]`` values of the attributed function for every step (0 on padding steps)."""
        repeat = step_logits.shape[0] // self.batch.size

        def forward_again() -> torch.Tensor:
            # noisy forwards (mc_dropout_prob_avg) of the real inputs, without gradient: the attributed
            # value's gradient flows through the scored forward only, on every architecture (inseq 0.7.1
            # does so on decoder-only models, whose noisy forwards read ids, but differentiates an
            # encoder-decoder's, which read the attributed embeddings)
            with torch.no_grad():
                fresh = self.real_step_logits()
            return fresh.repeat(repeat, 1, 1).reshape(-1, fresh.shape[-1])

        args = self.function_args(step_logits, is_attributed_fn=True, forward_again=forward_again)
        values = self.call(self.request.attributed_fn, args, self._attributed_kwargs)
        values = values.reshape(step_logits.shape[0], step_logits.shape[1]).to(step_logits.dtype)
        valid = self.valid.repeat(values.shape[0] // self.batch.size, 1)
        return torch.where(valid, values, torch.zeros_like(values))

    def attributed_scores(self, output: ModelOutput, at_real_inputs: bool = False) -> torch.Tensor:
        """The attributed function's scores of a forward. A forward on the real (unperturbed,
        unrepeated) inputs also gives the step scores, computed here at once.

        Nothing outlives this call but the scores' graph: the graph does not save the full
        ``[R*B, T, V]`` logits nor, once the step scores are taken, their step rows, so both are
        freed before the backward (with a 50k vocabulary that is most of a small model's peak)."""
        logits = self.step_logits(output.logits)
        if at_real_inputs:
            self.record_step_scores(logits)
        return self.scores(logits)

    def record_step_scores(self, step_logits: torch.Tensor) -> None:
        """Step scores from ``[B, N, V]`` step logits at the real inputs (the first call wins)."""
        if not self.has_step_scores or self.step_score_values is not None:
            return
        with torch.no_grad():
            self.step_score_values = self._step_scores(step_logits.detach())

    def _step_scores(self, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        def forward_again() -> torch.Tensor:
            fresh = self.real_step_logits()
            return fresh.reshape(-1, fresh.shape[-1])

        args = self.function_args(logits, is_attributed_fn=False, forward_again=forward_again)
        kwargs = self.request.step_function_kwargs
        scores = {}
        for name, fn in self.request.step_functions.items():
            values = self.call(fn, args, step_function_kwargs(fn, kwargs))
            scores[name] = values.reshape(logits.shape[0], logits.shape[1]).detach().float().cpu()  # like attributions
        return scores

    def ensure_step_scores(self) -> dict[str, torch.Tensor]:
        """The step scores, from a fresh forward when the method never ran the real inputs (one
        forward with the contrast inputs when a step function compares with them)."""
        if self.has_step_scores and self.step_score_values is None:
            with torch.no_grad():
                contrastive = any(uses_contrast(fn) for fn in self.request.step_functions.values())
                if (contrastive and self.contrast is not None and self._contrast_logits is None
                        and (self.batch.source_ids is None) == (self.contrast.source_ids is None)):
                    self.record_step_scores(self._real_and_contrast_step_logits())
                else:
                    self.record_step_scores(self.real_step_logits())
        return self.step_score_values or {}

    def _real_and_contrast_step_logits(self) -> torch.Tensor:
        """``[B, N, V]`` real step logits from one forward over the real and the contrast inputs side
        by side (right-padded to a common length), which also sets the contrast step logits: a
        step-scores-only call (context attribution's context sensitivity) runs the model once."""
        b, c = self.batch, self.contrast
        pad = self.wrapper.special_ids.pad

        def stacked(real: torch.Tensor | None, other: torch.Tensor | None, value: int) -> torch.Tensor | None:
            if real is None or other is None:
                return None
            length = max(real.shape[1], other.shape[1])
            return torch.cat([torch.nn.functional.pad(t, (0, length - t.shape[1]), value=value) for t in (real, other)])

        source_ids = stacked(b.source_ids, c.source_ids, pad)
        output = self.wrapper.architecture.forward_ids(
            stacked(b.target_ids, c.target_ids, pad), stacked(b.target_mask, c.target_mask, 0),
            source_ids, stacked(b.source_mask, c.source_mask, 0) if source_ids is not None else None,
            **self.wrapper.forward_defaults)
        logits = output.logits
        real, other = logits[: b.size, : b.target_ids.shape[1]], logits[b.size :, : c.target_ids.shape[1]]
        index = (c.aligned - 1).unsqueeze(-1).expand(-1, -1, other.shape[-1])
        self._contrast_logits = other.gather(1, index)
        return self.step_logits(real)
