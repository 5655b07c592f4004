"""Faithfulness of a probe's attribution map: does removing what the map ranks first change the prediction?

For one probe and one pass, with the attributed (teacher-forced, or generated in generate mode)
tokens ``y_1..y_N``, ``p_j(x)`` the probability of ``y_j`` at its step given the context ``x`` and
the tokens before it, and the drop ``d(x') = mean_j [p_j(x) - p_j(x')]``:

- **comprehensiveness**: ``d`` with the top ``k`` context tokens by attribution removed;
- **sufficiency**: ``d`` with only those kept (every other context token removed);

each averaged over the fractions ``k`` (default 10%, 20%, 50% of the context tokens, rounded up:
AOPC). Their **soft** variants move every context token towards the baseline by its normalized
importance ``w_i = |a_i| / max_l |a_l|`` (``1 - w_i`` for soft sufficiency) instead of removing a
hard top-k. The **random** baseline applies the same top-k masks to a random ranking, seeded per
probe and pass.

A token is removed by replacing its input embedding with the embedding of the baseline token the
attribution uses (``AttributionModel.special_ids.unk``; EOS stays EOS unless the attribution ran with
``include_eos_baseline``), embedded by the architecture adapter exactly as attribution embeds its
inputs. Positions are kept: the model sees a sequence of the same length, so positional encodings
do not shift. Only context tokens (the prompt, or an encoder-decoder's source) are removed, never
the attributed tokens; a context token whose baseline is itself (an EOS) cannot be removed and is
left out of the rankings.

Which context tokens may be removed: every one by default; the monitor passes a chat probe's message
content only (``faithfulness_scope="content"``), so that the template's role headers, default
system prompt and end-of-turn markers stay as the model was trained to see them, and the fractions
count the words a user wrote.

Cost: every probability of a probe comes from one teacher-forced, batched forward of all its masked
rows (the unmasked row, the two soft rows, and per fraction the comprehensiveness, sufficiency and
their two random rows: 15 at the defaults, 14 when the caller has the unmasked probabilities; ``N``
rows per mask with a per-step ranking), split only when the rows exceed the memory budget. On a
decoder-only model with a plain key/value cache the positions before the first one any row changes
(a chat template's system prompt and role header) run once, for one row, and the rows run the rest.
"""

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..data.outputs import FeatureAttributionSequenceOutput
from ..models.attribution_model import AttributionModel
from ..models.batch import Batch
from ..models.tokenization import baseline_ids
from ..utils.kv_cache import expanded, prefix_cache
from ..utils.model_dims import model_dims
from ..utils.model_state import preserve_model_state
from ..utils.sharding import has_sharded_parameters
from .drift import AttributionMap
from .values import FAITHFULNESS_VALUES

DEFAULT_FRACTIONS = (0.1, 0.2, 0.5)
RANKINGS = ("aggregated", "per_step")
SCOPES = ("content", "context")


def check_fractions(fractions: Sequence[float]) -> tuple[float, ...]:
    """The removal fractions as a tuple; each must lie in (0, 1]."""
    out = tuple(float(f) for f in fractions)
    if not out or any(not 0 < f <= 1 for f in out):
        raise ValueError(f"faithfulness_fractions must be fractions in (0, 1], e.g. (0.1, 0.2, 0.5); got {fractions!r}")
    return out


def check_ranking(ranking: str) -> str:
    if ranking not in RANKINGS:
        raise ValueError(f"faithfulness_ranking must be one of {RANKINGS}, got {ranking!r}")
    return ranking


def check_scope(scope: str) -> str:
    if scope not in SCOPES:
        raise ValueError(f"faithfulness_scope must be one of {SCOPES}, got {scope!r}")
    return scope


def removal_count(fraction: float, candidates: int) -> int:
    """Tokens in the top ``fraction`` of ``candidates``: rounded up, at least one."""
    return min(candidates, max(1, math.ceil(fraction * candidates - 1e-9)))


def faithfulness_seed(probe: str, step: int) -> int:
    """The random ranking's seed: the same for a probe at a pass on every rank and every run."""
    return zlib.crc32(f"{probe}\0{step}".encode())


@dataclass
class Faithfulness:
    """One probe's faithfulness at one pass.

    Attributes:
        values: the logged values (:data:`~inseq_lightning.monitor.values.FAITHFULNESS_VALUES`).
        per_fraction: ``{fraction: {"comprehensiveness", "sufficiency", "comprehensiveness_random",
            "sufficiency_random"}}`` before the average over fractions.
        probability: mean probability of the attributed tokens on the unmasked input.
        removed: ``{fraction: tokens removed (comprehensiveness) / kept (sufficiency)}``.
        forwards: model forwards run.
    """

    values: dict[str, float]
    per_fraction: dict[float, dict[str, float]] = field(default_factory=dict)
    probability: float = math.nan
    removed: dict[float, int] = field(default_factory=dict)
    forwards: int = 0


def context_scores(seq: FeatureAttributionSequenceOutput) -> np.ndarray:
    """``[context tokens, steps]`` absolute scores of the aggregated, per-step normalized map (the
    monitor's map): the rows of the context (prompt or source) tokens, NaN read as 0."""
    attribution_map = AttributionMap.from_sequence(seq.aggregate())
    return np.nan_to_num(np.abs(attribution_map.scores[: attribution_map.n_source]), nan=0.0)


def _probe_batch(wrapper: AttributionModel, seq: FeatureAttributionSequenceOutput, include_eos_baseline: bool) -> Batch:
    """The probe's own ids as one batch, cut before its last attributed token (the last position
    predicts nothing attributed), so that the last ``N`` positions predict the ``N`` steps. Both
    sides are filled; the adapter reads the ones its architecture has."""
    special = wrapper.special_ids
    target = [t.id for t in seq.target[: seq.attr_pos_end - 1]]
    source = [t.id for t in seq.source]

    def ids(values: list[int]) -> torch.Tensor:
        return torch.tensor([values], dtype=torch.long, device=wrapper.device)

    return Batch(
        target_ids=ids(target), target_mask=torch.ones_like(ids(target)),
        target_baseline_ids=ids(baseline_ids(target, special, include_eos_baseline)),
        target_tokens=[[t.token for t in seq.target[: len(target)]]],
        step_positions=[list(range(seq.attr_pos_start, seq.attr_pos_end))],
        source_ids=ids(source), source_mask=torch.ones_like(ids(source)),
        source_baseline_ids=ids(baseline_ids(source, special, include_eos_baseline)),
        source_tokens=[[t.token for t in seq.source]], prompt_lengths=[seq.attr_pos_start],
    )


class PrefixCaches:
    """Key/value caches of unchanged prefixes, shared by the probes of one batch of a monitoring pass
    (chat probes rendered with one template start with the same system prompt). Keyed by the prefix's
    token ids; valid for one model state only (the monitor makes one per batch and drops it before the
    next batch is attributed). Holds the ``size`` most recently used."""

    def __init__(self, size: int = 2):
        self.size, self.entries, self.forwards = size, {}, 0
        self.unsupported = False  # the model's cache is not a plain one: no prefix is tried again

    def get(self, ids: tuple[int, ...], compute):
        """The cache of prefix ``ids``; ``compute()`` makes it when it is not held (least recently used
        dropped); None, without a forward, once a model's cache proved not to be a plain one."""
        if self.unsupported:
            return None
        if ids in self.entries:
            self.entries[ids] = self.entries.pop(ids)  # most recently used last
        else:
            self.forwards += 1
            cache = compute()
            if cache is None:
                self.unsupported = True
                return None
            self.entries[ids] = cache
            while len(self.entries) > self.size:
                self.entries.pop(next(iter(self.entries)))
        return self.entries[ids]


class _Forward:
    """Step probabilities of masked copies of one probe: ``removal[r, i]`` in [0, 1] moves context token
    ``i`` of row ``r`` from its embedding (0) to the baseline's (1).

    All rows run in as few forwards as the memory budget allows. On a decoder-only model with a plain
    key/value cache, the positions before the first one any row of a forward changes are the same in
    every row: their keys and values come from one forward of one row (shared through ``prefixes``
    by the probes of a batch), and the rows run only the positions after them."""

    def __init__(self, wrapper: AttributionModel, seq: FeatureAttributionSequenceOutput, include_eos_baseline: bool,
                 prefix_cache: bool = True, prefixes: PrefixCaches | None = None,
                 memory_budget_bytes: int | None = None):
        self.wrapper, self.adapter = wrapper, wrapper.architecture
        self.batch = _probe_batch(wrapper, seq, include_eos_baseline)
        self.steps = seq.attr_pos_end - seq.attr_pos_start
        self.n_context = len(seq.source)
        # The attributed side (decoder-only: the whole sequence, the context first; encoder-decoder:
        # the source), as attribution embeds it, and its baseline.
        self.embeds = self.adapter.attributed_embeddings(self.batch, False)[0]
        self.baseline = self.adapter.attributed_embeddings(self.batch, False, baseline=True)[0]
        self.ids = self.adapter.attributed_ids(self.batch)[0]
        base = self.adapter.attributed_ids(self.batch, baseline=True)[0, : self.n_context]
        self.removable = (self.ids[: self.n_context] != base).cpu().numpy()
        self.targets = torch.tensor([[t.id for t in seq.generated]], device=wrapper.device)
        self.count = 0
        # Sharded ranks keep whole sequences (the same collectives on every rank).
        cacheable = prefix_cache and not has_sharded_parameters(wrapper.model)
        self.cache_argument = self.adapter.prefix_cache_argument() if cacheable else None
        self.prefixes = prefixes if prefixes is not None else PrefixCaches(size=1)
        self.budget = memory_budget_bytes if memory_budget_bytes is not None else wrapper.default_memory_budget

    def __call__(self, removal: np.ndarray) -> np.ndarray:
        changed = removal != 0
        # The first position each row changes; rows sorted by it, so that a forward's shared prefix
        # is as long as its rows allow.
        first = np.where(changed.any(axis=1), changed.argmax(axis=1), self.n_context)
        order = np.argsort(first, kind="stable")
        out = np.empty((removal.shape[0], self.steps))
        cursor = 0
        while cursor < len(order):
            # (never past the first position that predicts a step: its logits are read)
            start = min(int(first[order[cursor]]), self.embeds.shape[1] - self.steps) if self.cache_argument else 0
            cache = self._prefix(start) if start > 0 else None
            if cache is None:  # whole sequences: the rows are sized for them
                start = 0
            rows = max(1, min(len(order) - cursor, self.budget // self._row_bytes(start)))
            chunk = order[cursor : cursor + rows]
            out[chunk] = self._run(removal[chunk], start, cache)
            cursor += rows
        return out

    def _row_bytes(self, start: int) -> int:
        """What one row adds to a forward without gradient: its key/value cache (every layer), one
        layer's activations at a time, the attention scores and the kept logits (with their float
        and log-softmax copies)."""
        dims = model_dims(self.wrapper.model.config)
        length = self.adapter.forward_length(self.batch)
        run = length - start
        # (the rows' full-length inputs, their baseline mix and eager attention's float copies included)
        values = (2 * dims.layers * length * dims.kv_dim + 2 * length * dims.hidden
                  + run * (6 * dims.hidden + 3 * dims.inner) + 2 * dims.heads * run * length)
        return max(4 * (values + 3 * self.steps * (dims.vocab or 0)), 1)

    def _prefix(self, start: int):
        """The one-row key/value cache of positions ``< start``, or None (no cached path, or not a plain cache)."""
        if self.cache_argument is None:
            return None
        key = tuple(self.ids[:start].tolist())
        mask = torch.ones(1, start, dtype=torch.long, device=self.embeds.device)

        def compute():
            self.count += 1
            return prefix_cache(self.adapter.model, self.embeds, mask, start, self.wrapper.forward_defaults,
                                self.wrapper.can_skip_logits)

        cache = self.prefixes.get(key, compute)
        if cache is None:
            self.cache_argument = None  # the model's cache cannot be reused: whole sequences from now on
        return cache

    def _run(self, removal: np.ndarray, start: int, cache) -> np.ndarray:
        rows, length = removal.shape[0], self.embeds.shape[1]
        weights = torch.zeros(rows, length, 1, dtype=self.embeds.dtype, device=self.embeds.device)
        weights[:, : self.n_context, 0] = torch.as_tensor(removal, dtype=self.embeds.dtype, device=self.embeds.device)
        inputs = self.embeds + weights * (self.baseline - self.embeds)
        kwargs = dict(self.wrapper.forward_defaults)
        if self.wrapper.can_skip_logits:
            kwargs["logits_to_keep"] = self.steps
        if cache is not None:
            index = torch.zeros(rows, dtype=torch.long, device=self.embeds.device)
            kwargs.update({"use_cache": True, self.cache_argument: expanded(cache, index)})
            mask = torch.ones(rows, length, dtype=torch.long, device=self.embeds.device)
            output = self.adapter.model(inputs_embeds=inputs[:, start:], attention_mask=mask, **kwargs)
        else:
            output = self.adapter.forward_embeddings(
                self.batch, [inputs], lambda: self.adapter.embed(self.batch.target_ids, as_targets=True), repeat=rows,
                **kwargs)
        self.count += 1
        logits = output.logits[:, -self.steps :, :].float()
        del output
        chosen = logits.log_softmax(-1).gather(-1, self.targets.expand(rows, -1).unsqueeze(-1)).squeeze(-1)
        return chosen.exp().cpu().numpy().astype(float)


def _top(order: np.ndarray, n: int, size: int) -> np.ndarray:
    mask = np.zeros(size)
    mask[order[:n]] = 1.0
    return mask


def probe_faithfulness(wrapper: AttributionModel, seq: FeatureAttributionSequenceOutput,
                       fractions: Sequence[float] = DEFAULT_FRACTIONS, ranking: str = "aggregated", seed: int = 0,
                       include_eos_baseline: bool = False, candidates: Sequence[int] | None = None,
                       probabilities: Sequence[float] | None = None, prefix_cache: bool = True,
                       prefixes: PrefixCaches | None = None, memory_budget_bytes: int | None = None) -> Faithfulness:
    """Comprehensiveness, sufficiency, their soft variants and a random baseline for one attributed
    sequence (see the module docstring for the formulas).

    Args:
        wrapper: the :class:`AttributionModel` that attributed ``seq`` (its model as it is now).
        seq: one sequence of the attribution (raw or aggregated).
        fractions: the top-k fractions of the context tokens averaged over (AOPC).
        ranking: ``"aggregated"`` ranks the context tokens once, by their scores summed over the
            attributed tokens; ``"per_step"`` ranks them for each attributed token by its own column
            (``N`` rows per mask instead of one).
        seed: seed of the random ranking.
        include_eos_baseline: whether the attribution's baseline replaced EOS tokens too.
        candidates: the context positions that may be removed (the fractions count them), e.g. a
            chat probe's message content without the template's own tokens; None: every context
            token whose baseline differs from it.
        probabilities: the attributed tokens' probabilities on the unmasked input when the caller
            has them (the attribution's ``probability`` step scores, the same model and inputs):
            saves one row. None computes them.
        prefix_cache: on decoder-only models with a plain key/value cache, run the positions before
            the first changed one once (same numbers within float rounding); False runs whole sequences.
        prefixes: prefix caches shared with the other probes of a pass (see :class:`PrefixCaches`).
        memory_budget_bytes: what a forward's rows may take; None: the model's default budget. Rows
            beyond it run in further forwards.

    The model's modes, gradients and RNG streams are left as they were (the random ranking uses its
    own generator).
    """
    fractions, ranking = check_fractions(fractions), check_ranking(ranking)
    scores = context_scores(seq)
    model = wrapper.model
    with preserve_model_state(model), torch.no_grad():
        if any(module.training for module in model.modules()):
            model.eval()  # the deterministic model, as attribution sees it; modes restored on exit
        forward = _Forward(wrapper, seq, include_eos_baseline, prefix_cache, prefixes, memory_budget_bytes)
        if candidates is not None:
            allowed = np.zeros(forward.n_context, dtype=bool)
            allowed[[i for i in candidates if 0 <= i < forward.n_context]] = True
            forward.removable = forward.removable & allowed
        full = None
        if probabilities is not None:
            full = np.asarray([float(p) for p in probabilities], dtype=float)
            if full.shape != (forward.steps,) or not np.isfinite(full).all():
                full = None  # not this sequence's probabilities: compute them
        return _measure(forward, scores, fractions, ranking, seed, full)


def _measure(forward: _Forward, scores: np.ndarray, fractions: tuple[float, ...], ranking: str,
             seed: int, full: np.ndarray | None) -> Faithfulness:
    n_context, steps = scores.shape
    removable = forward.removable.astype(float)
    candidates = np.flatnonzero(forward.removable)
    nan = dict.fromkeys(FAITHFULNESS_VALUES, math.nan)
    if len(candidates) == 0:
        return Faithfulness(nan)
    # One ranking (aggregated) or one per step; read every row (aggregated) or row j at step j.
    columns = [scores.sum(axis=1)] if ranking == "aggregated" else [scores[:, j] for j in range(steps)]
    per_step = ranking == "per_step"
    rng = np.random.default_rng(seed)
    orders = [candidates[np.argsort(-column[candidates], kind="stable")] for column in columns]
    random_orders = [rng.permutation(candidates) for _ in columns]

    # Every masked row of the probe, in blocks of ``len(columns)`` rows; all of them in one batched
    # forward (more only when the memory budget says so).
    blocks: dict[str, list[np.ndarray]] = {}
    if full is None:
        blocks["unmasked"] = [np.zeros(n_context)]
    peaks = [column[candidates].max() for column in columns]
    soft = [np.where(forward.removable, column / peak, 0.0) if peak > 0 else None for column, peak in zip(columns, peaks)]
    defined = all(w is not None for w in soft)
    if defined:
        blocks["soft_comprehensiveness"] = list(soft)
        blocks["soft_sufficiency"] = [removable * (1.0 - w) for w in soft]
    kinds = ("comprehensiveness", "sufficiency", "comprehensiveness_random", "sufficiency_random")
    removed = {}
    for fraction in fractions:
        n = removal_count(fraction, len(candidates))
        removed[fraction] = n
        for ranked, suffix in ((orders, ""), (random_orders, "_random")):
            top = [_top(order, n, n_context) for order in ranked]
            blocks[f"comprehensiveness{suffix}@{fraction}"] = top  # remove the top
            blocks[f"sufficiency{suffix}@{fraction}"] = [removable * (1.0 - t) for t in top]  # keep only it
    probabilities = forward(np.stack([row for block in blocks.values() for row in block]))
    read, first = {}, 0
    for name, block in blocks.items():
        rows = probabilities[first : first + len(block)]
        read[name] = np.diagonal(rows).copy() if per_step else rows[0]
        first += len(block)
    if full is None:
        full = read["unmasked"]

    values = dict(nan)
    if defined:
        values["soft_comprehensiveness"] = float(np.mean(full - read["soft_comprehensiveness"]))
        values["soft_sufficiency"] = float(np.mean(full - read["soft_sufficiency"]))
    per_fraction = {fraction: {kind: float(np.mean(full - read[f"{kind}@{fraction}"])) for kind in kinds}
                    for fraction in fractions}
    for kind in kinds:
        values[kind] = float(np.mean([per_fraction[f][kind] for f in fractions]))
    values["comprehensiveness_vs_random"] = values["comprehensiveness"] - values["comprehensiveness_random"]
    values["sufficiency_vs_random"] = values["sufficiency"] - values["sufficiency_random"]
    return Faithfulness(values, per_fraction, float(np.mean(full)), removed, forward.count)


__all__ = [
    "DEFAULT_FRACTIONS",
    "RANKINGS",
    "SCOPES",
    "Faithfulness",
    "PrefixCaches",
    "check_scope",
    "context_scores",
    "faithfulness_seed",
    "probe_faithfulness",
    "removal_count",
]
