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

Cost: every probability of a probe comes from teacher-forced forwards over its whole sequence,
one batched forward per fraction (the comprehensiveness, sufficiency and their two random rows;
``N`` rows each with a per-step ranking) and one for the unmasked and soft rows.
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
from ..utils.model_state import preserve_model_state
from .drift import AttributionMap
from .values import FAITHFULNESS_VALUES

DEFAULT_FRACTIONS = (0.1, 0.2, 0.5)
RANKINGS = ("aggregated", "per_step")


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


class _Forward:
    """Step probabilities of masked copies of one probe: ``removal[r, i]`` in [0, 1] moves context token
    ``i`` of row ``r`` from its embedding (0) to the baseline's (1)."""

    def __init__(self, wrapper: AttributionModel, seq: FeatureAttributionSequenceOutput, include_eos_baseline: bool):
        self.wrapper, self.adapter = wrapper, wrapper.architecture
        self.batch = _probe_batch(wrapper, seq, include_eos_baseline)
        self.steps = seq.attr_pos_end - seq.attr_pos_start
        self.n_context = len(seq.source)
        # The attributed side (decoder-only: the whole sequence, the context first; encoder-decoder:
        # the source), as attribution embeds it, and its baseline.
        self.embeds = self.adapter.attributed_embeddings(self.batch, False)[0]
        self.baseline = self.adapter.attributed_embeddings(self.batch, False, baseline=True)[0]
        ids = self.adapter.attributed_ids(self.batch)[0, : self.n_context]
        base = self.adapter.attributed_ids(self.batch, baseline=True)[0, : self.n_context]
        self.removable = (ids != base).cpu().numpy()
        self.targets = torch.tensor([[t.id for t in seq.generated]], device=wrapper.device)
        self.count = 0

    def __call__(self, removal: np.ndarray) -> np.ndarray:
        rows, length = removal.shape[0], self.embeds.shape[1]
        weights = torch.zeros(rows, length, 1, dtype=self.embeds.dtype, device=self.embeds.device)
        weights[:, : self.n_context, 0] = torch.as_tensor(removal, dtype=self.embeds.dtype, device=self.embeds.device)
        inputs = self.embeds + weights * (self.baseline - self.embeds)
        kwargs = dict(self.wrapper.forward_defaults)
        if self.wrapper.can_skip_logits:
            kwargs["logits_to_keep"] = self.steps
        output = self.adapter.forward_embeddings(
            self.batch, [inputs], lambda: self.adapter.embed(self.batch.target_ids, as_targets=True), repeat=rows,
            **kwargs)
        self.count += 1
        logits = output.logits[:, -self.steps :, :].float()
        chosen = logits.log_softmax(-1).gather(-1, self.targets.expand(rows, -1).unsqueeze(-1)).squeeze(-1)
        return chosen.exp().cpu().numpy().astype(float)


def _top(order: np.ndarray, n: int, size: int) -> np.ndarray:
    mask = np.zeros(size)
    mask[order[:n]] = 1.0
    return mask


def probe_faithfulness(wrapper: AttributionModel, seq: FeatureAttributionSequenceOutput,
                       fractions: Sequence[float] = DEFAULT_FRACTIONS, ranking: str = "aggregated", seed: int = 0,
                       include_eos_baseline: bool = False) -> Faithfulness:
    """Comprehensiveness, sufficiency, their soft variants and a random baseline for one attributed
    sequence (see the module docstring for the formulas).

    Args:
        wrapper: the :class:`AttributionModel` that attributed ``seq`` (its model as it is now).
        seq: one sequence of the attribution (raw or aggregated).
        fractions: the top-k fractions of the context tokens averaged over (AOPC).
        ranking: ``"aggregated"`` ranks the context tokens once, by their scores summed over the
            attributed tokens; ``"per_step"`` ranks them for each attributed token by its own column
            (``N`` rows per forward instead of one).
        seed: seed of the random ranking.
        include_eos_baseline: whether the attribution's baseline replaced EOS tokens too.

    The model's modes, gradients and RNG streams are left as they were (the random ranking uses its
    own generator).
    """
    fractions, ranking = check_fractions(fractions), check_ranking(ranking)
    scores = context_scores(seq)
    model = wrapper.model
    with preserve_model_state(model), torch.no_grad():
        if any(module.training for module in model.modules()):
            model.eval()  # the deterministic model, as attribution sees it; modes restored on exit
        forward = _Forward(wrapper, seq, include_eos_baseline)
        return _measure(forward, scores, fractions, ranking, seed)


def _measure(forward: _Forward, scores: np.ndarray, fractions: tuple[float, ...], ranking: str,
             seed: int) -> Faithfulness:
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

    def read(probabilities: np.ndarray, first: int) -> np.ndarray:
        block = probabilities[first : first + len(columns)]
        return np.diagonal(block).copy() if per_step else block[0]

    # The unmasked row and the soft rows: one forward.
    peaks = [column[candidates].max() for column in columns]
    soft = [np.where(forward.removable, column / peak, 0.0) if peak > 0 else None for column, peak in zip(columns, peaks)]
    defined = all(w is not None for w in soft)
    rows = [np.zeros(n_context)]
    if defined:
        rows += [*soft, *(removable * (1.0 - w) for w in soft)]
    probabilities = forward(np.stack(rows))
    full = probabilities[0]
    values = dict(nan)
    if defined:
        values["soft_comprehensiveness"] = float(np.mean(full - read(probabilities, 1)))
        values["soft_sufficiency"] = float(np.mean(full - read(probabilities, 1 + len(columns))))

    kinds = ("comprehensiveness", "sufficiency", "comprehensiveness_random", "sufficiency_random")
    per_fraction, removed = {}, {}
    for fraction in fractions:
        n = removal_count(fraction, len(candidates))
        removed[fraction] = n
        rows = []
        for ranked in (orders, random_orders):
            top = [_top(order, n, n_context) for order in ranked]
            rows += [top, [removable * (1.0 - t) for t in top]]  # remove the top / keep only it
        # Row blocks in ``kinds`` order: (ranked remove, ranked keep, random remove, random keep).
        probabilities = forward(np.stack([row for block in rows for row in block]))
        per_fraction[fraction] = {kind: float(np.mean(full - read(probabilities, i * len(columns))))
                                  for i, kind in enumerate(kinds)}
    for kind in kinds:
        values[kind] = float(np.mean([per_fraction[f][kind] for f in fractions]))
    values["comprehensiveness_vs_random"] = values["comprehensiveness"] - values["comprehensiveness_random"]
    values["sufficiency_vs_random"] = values["sufficiency"] - values["sufficiency_random"]
    return Faithfulness(values, per_fraction, float(np.mean(full)), removed, forward.count)


__all__ = ["DEFAULT_FRACTIONS", "RANKINGS", "Faithfulness", "context_scores", "faithfulness_seed",
           "probe_faithfulness", "removal_count"]
