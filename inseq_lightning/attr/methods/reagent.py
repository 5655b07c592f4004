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
stopped).

Replacement tokens (``replacement=``):

- ``"uniform"`` (default): uniform draws from the vocabulary without special tokens.
- ``"unk"``: the UNK baseline.
- ``"pos_tag"``: like inseq's ``POSTagTokenSampler``, a replaced token is swapped for a token with its
  part-of-speech tag, drawn uniformly among the *other* non-special vocabulary tokens with that tag
  (inseq draws among every id with the tag, the token itself and special tokens included, and tags
  ``decode([id])`` over ``vocab_size``: a replacement here always changes the token). Every non-special vocabulary token's
  text (the tokenizer's ``convert_tokens_to_string`` of that token alone, stripped) is tagged on its
  own by ``tagger`` (a callable: list of strings -> list of tags, one per string), or, with
  ``tagger=None``, by nltk's ``pos_tag`` (its English perceptron tagger, one token at a time as inseq
  does) when ``nltk`` and its ``averaged_perceptron_tagger_eng`` data are installed; nothing is ever
  downloaded: without them the call is refused with a typed error (install them, or pass ``tagger=``).
  The tags are computed once per (tokenizer, tagger) and cached (pass the same callable object to reuse
  them). A token without a group to draw from (a special token, or the only vocabulary token with its
  tag) gets a uniform draw from the non-special vocabulary instead, as with ``"uniform"``.

Batching: one update forward per round covers every probe and every step (the replaced subset of a
probe is shared by all its steps: each step's context gets its own Bernoulli subset, restricted to its
prefix); the stopping checks of a round, one replaced sequence per (probe, step) still running, share
batched forwards. Draws come from the method's own generator (``seed``).
"""

import functools
import math
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ...errors import InvalidInputError
from ...utils.model_dims import model_dims
from ..engine import EngineContext
from .base import AttributionMethod, MethodResult, register_method

__all__ = ["PosTagTable", "Reagent", "pos_tag_replacements", "pos_tag_table"]

REPLACEMENTS = ("uniform", "unk", "pos_tag")
LOGIT_EPS = 1e-6  # logit(0.5 + delta / 2) is clamped to +-13.8 when |delta| reaches 1


def _check(keep_top_n, keep_ratio, stopping_condition_top_k, replacing_ratio, max_probe_steps, num_probes,
           replacement, rows_per_forward, tagger=None) -> None:
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
    if tagger is not None:
        if replacement != "pos_tag":
            raise InvalidInputError(f"reagent: tagger= is only used with replacement='pos_tag', got replacement="
                                    f"{replacement!r}; drop tagger= or pass replacement='pos_tag'")
        if not callable(tagger):
            raise InvalidInputError(f"reagent: tagger must be a callable mapping a list of strings to a list of tags, "
                                    f"got {type(tagger).__name__}")


# ---- part-of-speech replacement -----------------------------------------------------------------
NLTK_DATA = "averaged_perceptron_tagger_eng"
MISSING_TAGGER = (
    "reagent: replacement='pos_tag' needs a tagger: install nltk and its tagger data (pip install nltk, then "
    f"python -c \"import nltk; nltk.download('{NLTK_DATA}')\"; nothing is downloaded at run time), or pass "
    "tagger= (a callable mapping a list of token strings to a list of tags), or use replacement='uniform'"
)


class _NltkTagger:
    """nltk's ``pos_tag`` of each string alone (as inseq tags its vocabulary), with one English perceptron
    tagger loaded once (``pos_tag`` loads it again at every call)."""

    def __init__(self, tagger):
        self.tagger = tagger

    def __call__(self, words: Sequence[str]) -> list[str]:
        return [self.tagger.tag([word])[0][1] for word in words]


_nltk_tagger: _NltkTagger | None = None


def default_tagger() -> _NltkTagger:
    """nltk's tagger when nltk and its ``averaged_perceptron_tagger_eng`` data are installed (looked up
    locally, never downloaded); otherwise :class:`InvalidInputError` saying what to do. One object per
    process, so that the vocabulary's tags are cached across calls."""
    global _nltk_tagger
    if _nltk_tagger is None:
        try:
            import nltk
            from nltk.tag.perceptron import PerceptronTagger
        except ImportError as error:
            raise InvalidInputError(f"{MISSING_TAGGER} (nltk is not installed)") from error
        try:
            nltk.data.find(f"taggers/{NLTK_DATA}/")
            tagger = PerceptronTagger()  # loads the local data only; raises LookupError when it is absent
        except (LookupError, OSError) as error:
            raise InvalidInputError(f"{MISSING_TAGGER} (nltk's {NLTK_DATA} data is not installed)") from error
        _nltk_tagger = _NltkTagger(tagger)
    return _nltk_tagger


@dataclass(frozen=True)
class PosTagTable:
    """The vocabulary grouped by tag, for :func:`pos_tag_replacements` (CPU tensors; ``rows``: the input
    embedding's rows, every id a model reads).

    Attributes:
        candidates: ``[K]`` the non-special vocabulary ids (the uniform fallback's pool).
        members: ``[K]`` the same ids ordered by tag group.
        offsets: ``[G]`` where each group starts in ``members``.
        sizes: ``[G]`` each group's size.
        group: ``[rows]`` each id's group (-1: special or out of the vocabulary).
        rank: ``[rows]`` each id's place in its group (0 where ``group`` is -1).
        tags: ``[G]`` the tag of each group.
    """

    candidates: torch.Tensor
    members: torch.Tensor
    offsets: torch.Tensor
    sizes: torch.Tensor
    group: torch.Tensor
    rank: torch.Tensor
    tags: tuple

    def to(self, device) -> "PosTagTable":
        move = lambda t: t.to(device)
        return PosTagTable(move(self.candidates), move(self.members), move(self.offsets), move(self.sizes),
                           move(self.group), move(self.rank), self.tags)


def _candidates(tokenizer, rows: int) -> list[int]:
    """The non-special vocabulary ids an embedding of ``rows`` rows reads."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    candidates = [i for i in range(min(len(tokenizer), rows)) if i not in special]
    if not candidates:
        raise InvalidInputError("reagent: the vocabulary has no non-special token to replace with; use "
                                "replacement='unk'")
    return candidates


def _token_texts(tokenizer, ids: list[int]) -> list[str]:
    """Each token's text alone (``convert_tokens_to_string`` of that token), stripped."""
    from ...models.tokenization import token_text  # (models imports the methods)

    texts = []
    for token in tokenizer.convert_ids_to_tokens(ids):
        text = token_text(tokenizer, token)  # None: a token the tokenizer cannot read back, its own string
        texts.append((str(token or "") if text is None else text).strip())
    return texts


_TABLES: "weakref.WeakKeyDictionary[object, OrderedDict]" = weakref.WeakKeyDictionary()
TABLES_PER_TOKENIZER = 4  # (tagger, sizes) entries kept per tokenizer, least recently used dropped


def pos_tag_table(tokenizer, rows: int, tagger: Callable[[list[str]], Sequence]) -> PosTagTable:
    """The vocabulary's tag groups, tagged once per (tokenizer, tagger, vocabulary size, ``rows``) and
    cached while the tokenizer lives (the same tagger object hits the cache)."""
    try:
        per_tokenizer = _TABLES.setdefault(tokenizer, OrderedDict())
    except TypeError:  # a tokenizer that cannot be weakly referenced: not cached
        per_tokenizer = OrderedDict()
    # By identity (a tagger need not be hashable); the entry holds the tagger, so its id is not reused.
    key = (id(tagger), len(tokenizer), rows)
    cached = per_tokenizer.get(key)
    if cached is not None and cached[0] is tagger:
        per_tokenizer.move_to_end(key)
        return cached[1]
    candidates = _candidates(tokenizer, rows)
    texts = _token_texts(tokenizer, candidates)
    tags = tagger(texts)
    try:
        tags = list(tags)
        index: dict = {}
        groups = [index.setdefault(tag, len(index)) for tag in tags]
    except TypeError as error:
        raise InvalidInputError(f"reagent: tagger must return a list of hashable tags, got {type(tags).__name__} "
                                f"({error})") from error
    if len(groups) != len(texts):
        raise InvalidInputError(f"reagent: tagger returned {len(groups)} tags for {len(texts)} token strings; it "
                                "must return one tag per string")
    ids = torch.tensor(candidates, dtype=torch.long)
    group_of = torch.tensor(groups, dtype=torch.long)
    order = torch.argsort(group_of, stable=True)
    sizes = torch.bincount(group_of, minlength=len(index))
    offsets = torch.cumsum(sizes, 0) - sizes
    group = torch.full((rows,), -1, dtype=torch.long)
    group[ids] = group_of
    rank = torch.zeros(rows, dtype=torch.long)
    rank[ids[order]] = torch.arange(len(candidates)) - offsets[group_of[order]]
    table = PosTagTable(ids, ids[order], offsets, sizes, group, rank, tuple(index))
    per_tokenizer[key] = (tagger, table)
    while len(per_tokenizer) > TABLES_PER_TOKENIZER:
        per_tokenizer.popitem(last=False)
    return table


def pos_tag_replacements(ids: torch.Tensor, table: PosTagTable, generator: torch.Generator) -> torch.Tensor:
    """A replacement for every id of ``ids`` (any shape; ``table`` on its device): a uniform draw among the
    other vocabulary ids with its tag, or from ``table.candidates`` when it has none (a special id, or the
    only one with its tag). One draw per element from ``generator`` whatever the tags."""
    draw = torch.randint(0, 2**62, ids.shape, generator=generator, dtype=torch.long).to(ids.device)
    group = table.group[ids]
    known = group >= 0
    group = group.clamp(min=0)
    others = torch.where(known, table.sizes[group] - 1, torch.zeros_like(group))  # same-tag ids but itself
    pick = draw % others.clamp(min=1)
    pick = pick + (pick >= table.rank[ids]).long()  # skip the id itself
    same = table.members[(table.offsets[group] + pick).clamp(max=len(table.members) - 1)]
    fallback = table.candidates[draw % len(table.candidates)]
    return torch.where(others > 0, same, fallback)


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
        replacement: ``"uniform"`` (random non-special vocabulary tokens), ``"unk"`` (the UNK baseline) or
            ``"pos_tag"`` (random vocabulary tokens with the replaced token's tag; see the module docstring).
        seed: seed of the method's generator (None: drawn from torch's global RNG).
        rows_per_forward: rows per batched forward (None: from the memory budget).
        tagger: with ``replacement="pos_tag"``, a callable mapping a list of token strings to a list of as many
            hashable tags (None: nltk's ``pos_tag``, when nltk and its ``averaged_perceptron_tagger_eng`` data
            are installed); an error with any other replacement.
        kwargs: the engine's other arguments (not used by this method).

    The attributed side is the decoder-only model's sequence (prompt and prefix), an encoder-decoder's
    source, plus its target prefix with ``attribute_target=True`` (one distribution over both).
    """

    name = "reagent"
    granularity = "coarse"

    def attribute(self, ctx: EngineContext, keep_top_n: int | None = 5, keep_ratio: float | None = None,
                  invert_keep: bool = False, stopping_condition_top_k: int = 3, replacing_ratio: float = 0.3,
                  max_probe_steps: int = 3000, num_probes: int = 16, replacement: str = "uniform",
                  seed: int | None = None, rows_per_forward: int | None = None,
                  tagger: Callable[[list[str]], Sequence] | None = None, **kwargs) -> MethodResult:
        _check(keep_top_n, keep_ratio, stopping_condition_top_k, replacing_ratio, max_probe_steps, num_probes,
               replacement, rows_per_forward, tagger)
        if replacement == "pos_tag" and tagger is None:
            tagger = default_tagger()  # refused here, before any forward, when nltk or its data is missing
        generator = torch.Generator()
        generator.manual_seed(seed if seed is not None else int(torch.randint(0, 2**31 - 1, (1,)).item()))
        probe = _Probing(ctx, num_probes, replacement, generator, rows_per_forward, tagger)
        scores = probe.run(keep_top_n or 0, keep_ratio, invert_keep, stopping_condition_top_k, replacing_ratio,
                           max_probe_steps)  # [B, N, C]
        return MethodResult(*ctx.split(probe.sides(scores)))


class _Probing:
    """The state of one batch's probing: ids on one joint context axis ``C`` (decoder-only: the sequence;
    encoder-decoder: the source, then the target when it is attributed)."""

    def __init__(self, ctx: EngineContext, num_probes: int, replacement: str, generator: torch.Generator,
                 rows_per_forward: int | None, tagger: Callable[[list[str]], Sequence] | None = None):
        self.ctx, self.probes, self.generator = ctx, num_probes, generator
        batch = ctx.batch
        device = batch.target_ids.device
        positions, valid = ctx.positions, ctx.valid
        tokens_of = lambda length: torch.arange(length, device=device).view(1, 1, -1)
        # each attributed side's ids, baseline ids and [B, N, length] mask of the tokens each step sees
        parts = [(ids, base, tokens_of(ids.shape[1]) < ctx.visible_lengths(which).unsqueeze(-1))
                 for which, (ids, base) in enumerate(ctx.adapter.attributed_token_ids(batch, ctx.attribute_target))]
        self.lengths = [ids.shape[1] for ids, _, _ in parts]
        self.ids = torch.cat([ids for ids, _, _ in parts], 1)  # [B, C]
        self.baseline = torch.cat([base for _, base, _ in parts], 1)
        self.context = torch.cat([seen for _, _, seen in parts], 2) & valid.unsqueeze(-1)  # [B, N, C]
        self.replaceable = self.context.any(1)  # [B, C]: in some step's context
        self.targets = batch.target_ids.gather(1, positions)  # [B, N]
        self.replacement = replacement
        if replacement != "unk":
            tokenizer = ctx.model.tokenizer
            layer = ctx.adapter.input_layer()
            rows = getattr(layer, "num_embeddings", None) or layer.weight.shape[0]
            if replacement == "pos_tag":
                self.table = pos_tag_table(tokenizer, rows, tagger).to(device)
            else:
                self.candidates = torch.tensor(_candidates(tokenizer, rows), device=device)
        self.rows_per_forward = rows_per_forward or self._default_rows()

    def _default_rows(self) -> int:
        ctx = self.ctx
        dims = model_dims(ctx.model.model.config)
        hidden, vocab = dims.hidden, dims.vocab or 32000
        length = ctx.adapter.forward_length(ctx.batch)
        # activations, the kept logits (at most every position) and the update's [rows, N, vocab] step logits
        per_row = (length * 16 * hidden + (ctx.batch.target_ids.shape[1] + ctx.num_steps) * vocab) * 4
        return max(ctx.batch.size, int(ctx.memory_budget_bytes // per_row))

    # ---- draws and forwards ---------------------------------------------------------------------
    def _tokens(self, shape: tuple[int, ...]) -> torch.Tensor:
        """Replacement tokens for ids of shape ``[..., B, C]``."""
        if self.replacement == "unk":
            return self.baseline.expand(*shape)
        if self.replacement == "pos_tag":
            return pos_tag_replacements(self.ids.expand(*shape), self.table, self.generator)
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
