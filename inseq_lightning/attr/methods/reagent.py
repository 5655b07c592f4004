"""ReAGent (Zhao & Shan, 2024, "ReAGent: a model-agnostic feature attribution method for generative
language models"), with no run-time download.

Each step keeps ``num_probes`` independent estimates (probes) of its context tokens' importance,
logits initialised uniformly in ``[0, 1)``. A probing round:

1. **Update.** A random subset ``R`` of the context (each token with probability ``replacing_ratio``)
   is replaced by replacement tokens; with ``delta = f(x) - f(x with R replaced)`` (``f``: the
   attributed function, the target's probability by default, as in ReAGent), every token in ``R``
   gets ``logit(0.5 + delta / 2)`` added to its logit, every other context token
   ``logit(0.5 - delta / 2)``.
2. **Stopping condition.** The probe's ``keep_top_n`` most important tokens (or the top
   ``ceil(keep_ratio * context)``) are kept and every other context token is replaced (the top ones
   are replaced instead with ``invert_keep``); when the step's target is then among the model's
   ``stopping_condition_top_k`` predictions the probe stops and its scores are frozen.

Rounds run until every probe of every step stopped or ``max_probe_steps`` rounds. A step's scores are
the mean over its stopped probes of ``softmax(logits)`` over its context (over every probe if none
stopped). Replacement tokens are uniform draws from the vocabulary without special tokens
(``replacement="uniform"``; inseq draws from tokens with the original's part-of-speech tag, which needs
a tagger downloaded at run time) or the UNK baseline (``replacement="unk"``).

Batching: one update forward per round covers every probe and every step (the replaced subset of a
probe is shared by all its steps: each step's context gets its own Bernoulli subset, restricted to its
prefix); the stopping checks of a round, one replaced sequence per (probe, step) still running, share
batched forwards. Draws come from the method's own generator (``seed``).
"""

import functools
import math

import torch

from ...errors import InvalidInputError
from ...utils.model_dims import model_dims
from ..engine import EngineContext
from .base import AttributionMethod, MethodResult, register_method

__all__ = ["Reagent"]

REPLACEMENTS = ("uniform", "unk")
LOGIT_EPS = 1e-6  # logit(0.5 + delta / 2) is clamped to +-13.8 when |delta| reaches 1


def _check(keep_top_n, keep_ratio, stopping_condition_top_k, replacing_ratio, max_probe_steps, num_probes,
           replacement, rows_per_forward) -> None:
    def positive_int(value, name):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidInputError(f"reagent: {name} must be a positive int, got {value!r}")

    if keep_top_n is None or keep_top_n == 0:
        if keep_ratio is None or not 0 < keep_ratio <= 1:
            raise InvalidInputError("reagent: with keep_top_n=0 (or None) keep_ratio must be in (0, 1], got "
                                    f"{keep_ratio!r}")
    else:
        positive_int(keep_top_n, "keep_top_n")
    positive_int(stopping_condition_top_k, "stopping_condition_top_k")
    positive_int(max_probe_steps, "max_probe_steps")
    positive_int(num_probes, "num_probes")
    if rows_per_forward is not None:
        positive_int(rows_per_forward, "rows_per_forward")
    if not isinstance(replacing_ratio, int | float) or not 0 < replacing_ratio <= 1:
        raise InvalidInputError(f"reagent: replacing_ratio must be in (0, 1], got {replacing_ratio!r}")
    if replacement not in REPLACEMENTS:
        raise InvalidInputError(f"reagent: replacement must be one of {', '.join(REPLACEMENTS)}, got {replacement!r}")


@register_method
class Reagent(AttributionMethod):
    """ReAGent: ``[B, tokens, N]`` importance of each context token for each step (a probability
    distribution over the step's context; no further aggregation).

    Args:
        ctx: the engine context of one batch.
        keep_top_n: tokens kept (the most important) in the stopping check; 0 or None: use ``keep_ratio``.
        keep_ratio: with ``keep_top_n=0``, the share of the step's context kept (rounded up).
        invert_keep: replace the top tokens instead of keeping them in the stopping check.
        stopping_condition_top_k: a probe stops once the step's target is among this many top predictions.
        replacing_ratio: probability that a context token is replaced in an update.
        max_probe_steps: most probing rounds.
        num_probes: independent probes per step, averaged.
        replacement: ``"uniform"`` (random non-special vocabulary tokens) or ``"unk"`` (the UNK baseline).
        seed: seed of the method's generator (None: drawn from torch's global RNG).
        rows_per_forward: rows per batched forward (None: from the memory budget).

    The attributed side is the decoder-only model's sequence (prompt and prefix), an encoder-decoder's
    source, plus its target prefix with ``attribute_target=True`` (one distribution over both).
    """

    name = "reagent"
    granularity = "coarse"

    def attribute(self, ctx: EngineContext, keep_top_n: int | None = 5, keep_ratio: float | None = None,
                  invert_keep: bool = False, stopping_condition_top_k: int = 3, replacing_ratio: float = 0.3,
                  max_probe_steps: int = 3000, num_probes: int = 16, replacement: str = "uniform",
                  seed: int | None = None, rows_per_forward: int | None = None, **kwargs) -> MethodResult:
        _check(keep_top_n, keep_ratio, stopping_condition_top_k, replacing_ratio, max_probe_steps, num_probes,
               replacement, rows_per_forward)
        generator = torch.Generator()
        generator.manual_seed(seed if seed is not None else int(torch.randint(0, 2**31 - 1, (1,)).item()))
        probe = _Probing(ctx, num_probes, replacement, generator, rows_per_forward)
        scores = probe.run(keep_top_n or 0, keep_ratio, invert_keep, stopping_condition_top_k, replacing_ratio,
                           max_probe_steps)  # [B, N, C]
        return MethodResult(*ctx.split(probe.sides(scores)))


class _Probing:
    """The state of one batch's probing: ids on one joint context axis ``C`` (decoder-only: the sequence;
    encoder-decoder: the source, then the target when it is attributed)."""

    def __init__(self, ctx: EngineContext, num_probes: int, replacement: str, generator: torch.Generator,
                 rows_per_forward: int | None):
        self.ctx, self.probes, self.generator = ctx, num_probes, generator
        batch = ctx.batch
        encdec = ctx.adapter.is_encoder_decoder
        device = batch.target_ids.device
        positions, valid = ctx.positions, ctx.valid
        tokens_of = lambda length: torch.arange(length, device=device).view(1, 1, -1)
        if encdec:
            parts = [(batch.source_ids, batch.source_baseline_ids,
                      (tokens_of(batch.source_ids.shape[1]) < ctx.visible_lengths(0).unsqueeze(-1)))]
            if ctx.attribute_target:
                parts.append((batch.target_ids, batch.target_baseline_ids,
                              tokens_of(batch.target_ids.shape[1]) < positions.unsqueeze(-1)))
        else:
            parts = [(batch.target_ids, batch.target_baseline_ids,
                      tokens_of(batch.target_ids.shape[1]) < positions.unsqueeze(-1))]
        self.lengths = [ids.shape[1] for ids, _, _ in parts]
        self.ids = torch.cat([ids for ids, _, _ in parts], 1)  # [B, C]
        self.baseline = torch.cat([base for _, base, _ in parts], 1)
        self.context = torch.cat([seen for _, _, seen in parts], 2) & valid.unsqueeze(-1)  # [B, N, C]
        self.replaceable = self.context.any(1)  # [B, C]: in some step's context
        self.targets = batch.target_ids.gather(1, positions)  # [B, N]
        self.replacement = replacement
        if replacement == "uniform":
            tokenizer = ctx.model.tokenizer
            layer = ctx.adapter.input_layer()
            rows = getattr(layer, "num_embeddings", None) or layer.weight.shape[0]
            special = set(getattr(tokenizer, "all_special_ids", []) or [])
            candidates = [i for i in range(min(len(tokenizer), rows)) if i not in special]
            if not candidates:
                raise InvalidInputError("reagent: the vocabulary has no non-special token to replace with; use "
                                        "replacement='unk'")
            self.candidates = torch.tensor(candidates, device=device)
        self.rows_per_forward = rows_per_forward or self._default_rows()

    def _default_rows(self) -> int:
        ctx = self.ctx
        dims = model_dims(ctx.model.model.config)
        hidden, vocab = dims.hidden, dims.vocab or 32000
        length = self.ids.shape[1] + (ctx.batch.target_ids.shape[1] if ctx.adapter.is_encoder_decoder else 0)
        # activations, the kept logits (at most every position) and the update's [rows, N, vocab] step logits
        per_row = (length * 16 * hidden + (ctx.batch.target_ids.shape[1] + ctx.num_steps) * vocab) * 4
        return max(ctx.batch.size, int(ctx.memory_budget_bytes // per_row))

    # ---- draws and forwards ---------------------------------------------------------------------
    def _tokens(self, shape: tuple[int, ...]) -> torch.Tensor:
        """Replacement tokens for ids of shape ``[..., B, C]``."""
        if self.replacement == "unk":
            return self.baseline.expand(*shape)
        index = torch.randint(0, len(self.candidates), shape, generator=self.generator)
        return self.candidates[index.to(self.candidates.device)]

    def _embed(self, ids: torch.Tensor) -> list[torch.Tensor]:
        """``[R*B, C]`` ids on the joint axis -> the attributed embeddings ``ctx.forward`` takes."""
        adapter = self.ctx.adapter
        pieces = ids.split(self.lengths, 1)
        out = [adapter.embed(pieces[0])]
        if len(pieces) > 1:
            out.append(adapter.embed(pieces[1], as_targets=True))
        return out

    def _forward(self, ids: torch.Tensor, read) -> torch.Tensor:
        """Run ``[R, B, C]`` ids as stacked copies of the batch, ``rows_per_forward`` rows at a time;
        ``read(output, start, copies)`` turns the forward of copies ``start:start + copies`` into per-copy
        results, concatenated along dim 0."""
        copies, batch = ids.shape[0], ids.shape[1]
        per_forward = max(1, self.rows_per_forward // batch)
        results = []
        with torch.no_grad():
            for start in range(0, copies, per_forward):
                chunk = ids[start : start + per_forward]
                output = self.ctx.forward(self._embed(chunk.reshape(-1, chunk.shape[-1])), repeat=chunk.shape[0])
                results.append(read(output, start, chunk.shape[0]))
        return torch.cat(results, 0)

    # ---- the algorithm --------------------------------------------------------------------------
    def run(self, keep_top_n: int, keep_ratio: float | None, invert_keep: bool, top_k: int, ratio: float,
            max_rounds: int) -> torch.Tensor:
        ctx = self.ctx
        with torch.no_grad():
            real = ctx.attributed_scores(ctx.forward(self._embed(self.ids)), at_real_inputs=True).float()  # [B, N]
        probes, (batch, steps, length) = self.probes, self.context.shape
        device = self.ids.device
        logits = torch.rand(probes, batch, steps, length, generator=self.generator).to(device)
        context = self.context.unsqueeze(0)  # [1, B, N, C]
        stopped = (~ctx.valid).unsqueeze(0).expand(probes, -1, -1).clone()  # [P, B, N]
        hit = torch.zeros_like(stopped)
        seen = self.context.sum(-1)  # [B, N]
        top_n = torch.full_like(seen, keep_top_n) if keep_top_n else torch.ceil(keep_ratio * seen.float()).long()
        for _ in range(max_rounds):
            # 1. update: one random subset per probe, shared by its steps
            subset = (torch.rand(probes, batch, length, generator=self.generator).to(device) < ratio) & self.replaceable
            replaced = torch.where(subset, self._tokens((probes, batch, length)), self.ids)
            scores = self._forward(replaced, lambda output, start, copies: ctx.attributed_scores(output).float().view(
                copies, batch, steps))  # [P, B, N]
            delta = (real.unsqueeze(0) - scores).unsqueeze(-1)  # [P, B, N, 1]
            signed = torch.where(subset.unsqueeze(2), delta, -delta)
            step = torch.logit(0.5 + 0.5 * signed, eps=LOGIT_EPS)
            logits = logits + torch.where((~stopped).unsqueeze(-1) & context, step, torch.zeros_like(step))
            # 2. stopping condition: keep (or replace) each running probe's top tokens, replace the rest
            masked = logits.masked_fill(~context, -math.inf)
            rank = masked.argsort(-1, descending=True).argsort(-1)  # [P, B, N, C]
            keep = rank < top_n.view(1, batch, steps, 1)
            swap = context & (keep if invert_keep else ~keep)
            sampled = self._tokens((probes, steps, batch, length))  # drawn every round: chunking changes nothing
            running = (~stopped).any(1)  # [P, N]: copies with a running probe
            pairs = running.nonzero()  # [K, 2] (probe, step)
            if len(pairs) == 0:
                break
            p, n = pairs[:, 0], pairs[:, 1]
            ids = torch.where(swap[p, :, n], sampled[p, n], self.ids.unsqueeze(0))  # [K, B, C]
            hits = self._forward(ids, functools.partial(self._hits, steps=n, top_k=top_k))  # [K, B]
            newly = hits & ~stopped[p, :, n]
            hit[p, :, n] |= newly
            stopped[p, :, n] |= newly
            if bool(stopped.all()):
                break
        importance = torch.softmax(logits.masked_fill(~context, -math.inf), -1).nan_to_num(0.0)
        weights = hit.float()
        none = weights.sum(0, keepdim=True) == 0
        weights = torch.where(none, torch.ones_like(weights), weights)  # no probe stopped: every probe
        mean = (importance * weights.unsqueeze(-1)).sum(0) / weights.sum(0).unsqueeze(-1)
        return mean  # [B, N, C]

    def _hits(self, output, start: int, copies: int, steps: torch.Tensor, top_k: int) -> torch.Tensor:
        """``[copies, B]``: whether copy ``c``'s step (``steps[start + c]``) target is among its top ``top_k``
        predictions (the logits of each row's one predicting position, not ``[rows, N, vocab]``)."""
        steps, batch = steps[start : start + copies], self.ids.shape[0]
        logits = output.logits.view(copies, batch, *output.logits.shape[1:])  # [copies, B, T', V]
        offset = self.ctx.batch.target_ids.shape[1] - logits.shape[2]
        where = (self.ctx.positions.T[steps] - 1 - offset).clamp(min=0)  # [copies, B]
        chosen = logits[torch.arange(copies, device=steps.device).unsqueeze(1),
                        torch.arange(batch, device=steps.device).unsqueeze(0), where]  # [copies, B, V]
        top = chosen.topk(min(top_k, chosen.shape[-1]), dim=-1).indices
        return (top == self.targets.T[steps].unsqueeze(-1)).any(-1)

    def sides(self, scores: torch.Tensor) -> list[torch.Tensor]:
        """``[B, N, C]`` -> per attributed input ``[B, L, N]``."""
        return [part.transpose(1, 2) for part in scores.split(self.lengths, -1)]
