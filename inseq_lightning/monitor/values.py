"""What a monitoring pass logs, defined once: each value's name, meaning, better direction and pooling.

Every tracker is a projection of these definitions: TensorBoard and W&B scalars, the W&B table,
``drift.csv``, the ``drift`` command's table, the demo's summary, Lightning's
``trainer.callback_metrics`` and the HF Trainer's evaluation metrics all use the same names
(relative to ``<prefix>/<probe>/`` and ``<prefix>/mean/``) and the same means over probes.
A new value is added here (and computed in :class:`~inseq_lightning.monitor.ProbeMonitor`), or
per monitor with ``ProbeMonitor(extra_values={...})``; every sink then carries it.

A value read off the attribution map (drift, evidence, cue and message mass, faithfulness, the
stabilization point) is marked ``needs_map``: a monitor whose method computes no map
(``method="dummy"``: step scores only) neither declares nor logs it.
"""

import math
from collections.abc import Iterable
from dataclasses import dataclass, replace

from .drift import DRIFT_COVERAGE, DRIFT_METRICS

HIGHER, LOWER = "higher", "lower"
STABILIZATION_STEP = "stabilization_step"


@dataclass(frozen=True)
class LoggedValue:
    """One logged value.

    Attributes:
        name: its name relative to ``<prefix>/<probe>/``; a family ends in ``/*`` (``step_score/*``).
        meaning: one line for a reader of the dashboard.
        better: ``"higher"``, ``"lower"`` or None (a count, or a value whose good direction depends on
            the run): the ``mode`` to give ``EarlyStopping`` / ``greater_is_better`` to the HF Trainer.
        pooling: how ``mean/<name>`` combines the probes: ``"mean"`` over the probes where the value
            is defined, ``"sum"`` for counts, ``"none"`` for a value of the pass itself (mean row only).
        needs_map: computed from the attribution map, so absent when the method computes none
            (``method="dummy"``); step scores and their changes need only the forward pass.
    """

    name: str
    meaning: str
    better: str | None = None
    pooling: str = "mean"
    needs_map: bool = False


_DRIFT_MEANINGS = {
    "cosine": ("cosine similarity of each attributed token's column, averaged over tokens", HIGHER),
    "js_divergence": ("Jensen-Shannon divergence (bits) of the absolute columns, averaged over tokens", LOWER),
    "top1_agreement": ("share of tokens whose most attributed source token is the same", HIGHER),
    "top3_agreement": ("overlap of the top-3 source tokens, divided by 3, averaged over tokens", HIGHER),
    "spearman": ("Spearman rank correlation of each column, averaged over tokens", HIGHER),
    "tokens_compared": ("attributed tokens compared (the common prefix of the two continuations)", None),
    "tokens_undefined": ("compared tokens where a metric is undefined (an all-zero column), left out of its mean",
                         None),
    "continuation_changed": ("1 when the generated continuation differs from the one compared with (generate mode)",
                             None),
}
_AGAINST = {"drift_ref": "the first pass", "drift_prev": "the previous pass"}
_COUNTS = ("tokens_compared", "tokens_undefined")
# Step functions whose good direction is known (the rest depend on what the user attributes).
_STEP_SCORE_BETTER = {"probability": HIGHER, "logit": HIGHER, "entropy": LOWER, "crossentropy": LOWER,
                      "perplexity": LOWER}
# Faithfulness of the maps (computed in :mod:`.faithfulness`; formulas in docs/monitoring.md): drops of
# the attributed tokens' mean probability when context tokens are removed (replaced by the baseline
# token's embedding), AOPC over the removal fractions.
_DROP = "drop of the attributed tokens' mean probability when"
FAITHFULNESS_VALUES = {
    "comprehensiveness": (f"{_DROP} the top-k% context tokens by attribution are removed, averaged over k (AOPC)",
                          HIGHER),
    "sufficiency": (f"{_DROP} only the top-k% context tokens by attribution are kept, averaged over k (AOPC)", LOWER),
    "soft_comprehensiveness": (f"{_DROP} each context token moves to the baseline by its normalized importance",
                               HIGHER),
    "soft_sufficiency": (f"{_DROP} each context token moves to the baseline by 1 - its normalized importance", LOWER),
    "comprehensiveness_random": ("comprehensiveness of a random ranking (seeded per probe and pass): chance level",
                                 None),
    "sufficiency_random": ("sufficiency of a random ranking (seeded per probe and pass): chance level", None),
    "comprehensiveness_vs_random": ("comprehensiveness minus comprehensiveness_random", HIGHER),
    "sufficiency_vs_random": ("sufficiency minus sufficiency_random", LOWER),
}


def _definitions() -> dict[str, LoggedValue]:
    scores = [
        LoggedValue("step_score/*", "mean of a step function over the attributed tokens"),
        LoggedValue("step_score_change_ref/*", "change of that mean since the first pass"),
        LoggedValue("step_score_change_prev/*", "change of that mean since the previous pass"),
    ]
    on_map = [
        LoggedValue("evidence_mass", "share of absolute attribution on the probe's evidence tokens", HIGHER),
        LoggedValue("evidence_average_precision", "area under the precision-recall curve (average precision) of the "
                                                  "context tokens' attribution, summed over attributed tokens, "
                                                  "against the evidence tokens", HIGHER),
        LoggedValue("evidence_reciprocal_rank", "1 / rank of the best-ranked evidence token among the context "
                                                "tokens (ties rank it last)", HIGHER),
        LoggedValue("cue_mass", "share of absolute attribution on the probe's cue tokens (tokens that must not carry "
                                "the answer)", LOWER),
        *(LoggedValue(name, meaning, better) for name, (meaning, better) in FAITHFULNESS_VALUES.items()),
        LoggedValue("message_mass/*", "share of absolute attribution on one message's content tokens (conversations: "
                                      "<index>_<role>), averaged over attributed tokens"),
    ]
    for drift, against in _AGAINST.items():
        for metric in (*DRIFT_METRICS, *DRIFT_COVERAGE):
            meaning, better = _DRIFT_MEANINGS[metric]
            on_map.append(LoggedValue(f"{drift}/{metric}", f"{meaning}; against {against}", better,
                                      "sum" if metric in _COUNTS else "mean"))
        on_map.append(LoggedValue(f"{drift}/probes_compared",
                                  f"probes with at least one token compared against {against} (mean row only)",
                                  None, "sum"))
    on_map.append(LoggedValue(STABILIZATION_STEP, "the step of the first pass after which the mean drift against "
                                                  "the previous pass stayed within tolerance (mean row only; see "
                                                  "monitor.alerts.Stabilization)", None, "none"))
    values = [*scores, *(replace(v, needs_map=True) for v in on_map)]
    return {v.name: v for v in values}


LOGGED_VALUES: dict[str, LoggedValue] = _definitions()
SECONDS = LoggedValue("seconds", "wall time of the pass (attribution and sinks), per pass", LOWER)


def definition(name: str) -> LoggedValue:
    """The definition of a logged value (relative name); names nobody defined are user values."""
    if name in LOGGED_VALUES:
        return LOGGED_VALUES[name]
    family, _, leaf = name.rpartition("/")
    if f"{family}/*" in LOGGED_VALUES:
        base = LOGGED_VALUES[f"{family}/*"]
        better = _STEP_SCORE_BETTER.get(leaf) if family == "step_score" else None
        return LoggedValue(name, base.meaning.replace("a step function", f"step function {leaf!r}"), better,
                           needs_map=base.needs_map)
    if name == SECONDS.name:
        return SECONDS
    return LoggedValue(name, "user value (ProbeMonitor(extra_values=...))")


def pool(name: str, values: Iterable[float]) -> float:
    """Combine one value over probes as its definition says (NaN values are left out)."""
    defined = [v for v in values if v is not None and not math.isnan(v)]
    if definition(name).pooling == "sum":
        return float(sum(defined))
    return sum(defined) / len(defined) if defined else math.nan


def needs_map(name: str) -> bool:
    """Whether a logged value (relative name) is read off the attribution map (see :class:`LoggedValue`)."""
    return definition(name).needs_map


def value_names(step_scores: Iterable[str], generate: bool, extra: Iterable[str] = (),
                messages: Iterable[str] = (), faithfulness: bool = False, cue: bool = False,
                maps: bool = True) -> list[str]:
    """Every per-probe value a monitor with these step scores (conversations with these message
    labels, faithfulness on or off, probes with a cue or not, a method that computes maps or not) can
    log, in a stable order (the columns of ``drift.csv`` and of the W&B table). ``maps=False``
    (``method="dummy"``) leaves out every value that needs a map, rather than declaring columns that
    would never be filled."""
    names = [f"step_score/{s}" for s in step_scores]
    for drift in _AGAINST:
        names += [f"{drift}/{m}" for m in DRIFT_METRICS]
        names += [f"{drift}/{m}" for m in DRIFT_COVERAGE if generate or m != "continuation_changed"]
    names += [f"step_score_change_{kind}/{s}" for kind in ("ref", "prev") for s in step_scores]
    names += ["evidence_mass", "evidence_average_precision", "evidence_reciprocal_rank"]
    if cue:
        names.append("cue_mass")
    names += [f"message_mass/{label}" for label in messages]
    if faithfulness:
        names += list(FAITHFULNESS_VALUES)
    if not maps:
        names = [n for n in names if not needs_map(n)]
    names += [n for n in extra if n not in names]  # user values: whatever their function reads
    return names


def mean_only_names(maps: bool = True) -> list[str]:
    """Values that exist only on the mean row (counts over probes); with ``maps=False`` none (they
    all count or summarise drift)."""
    names = [*(f"{drift}/probes_compared" for drift in _AGAINST), STABILIZATION_STEP]
    return names if maps else [n for n in names if not needs_map(n)]
