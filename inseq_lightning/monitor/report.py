"""What one monitoring pass produced: per-probe results, ready for the sinks."""

import math
from dataclasses import dataclass, field

from ..data.outputs import FeatureAttributionOutput, FeatureAttributionSequenceOutput
from .drift import DRIFT_COVERAGE, DRIFT_METRICS
from .probes import Probe
from .values import STABILIZATION_STEP, pool


@dataclass
class ProbeResult:
    """One probe at one step.

    Attributes:
        probe: the probe.
        output: the raw attribution (one sequence), loadable with ``FeatureAttributionOutput.load``.
        aggregated: the aggregated, normalized sequence used for drift, tables, HTML and figures
            (with ``method="dummy"``: tokens and step scores, no attribution map).
        step_scores: mean of each step score over the attributed tokens.
        drift_reference, drift_previous: drift metrics against the first and the previous pass, and
            what they cover (``tokens_compared``, ``tokens_undefined``; in generate mode also
            ``continuation_changed``, 1.0 when the attributed continuation differs).
        score_change_reference, score_change_previous: change of each mean step score.
        evidence_mass: share of attribution on the evidence tokens (NaN without evidence).
        evidence_rows: the evidence tokens' rows in the attribution map.
        evidence_average_precision, evidence_reciprocal_rank: how well the map ranks the evidence
            among the context tokens (plausibility; NaN without evidence).
        cue_mass: share of attribution on the probe's cue tokens (NaN without a cue).
        cue_rows: the cue tokens' rows in the attribution map.
        faithfulness: comprehensiveness, sufficiency, their soft variants and random baselines
            (:data:`~.values.FAITHFULNESS_VALUES`; empty when the monitor does not measure them).
        reference_step, previous_step: the steps compared with (None on the first pass).
        extra_values: the values of ``ProbeMonitor(extra_values=...)``, logged like the others.
        message_mass: for a conversation, the share of attribution on each message's content
            (``"<index>_<role>"``): which message the answer comes from.
    """

    probe: Probe
    output: FeatureAttributionOutput
    aggregated: FeatureAttributionSequenceOutput
    step_scores: dict[str, float]
    drift_reference: dict[str, float] = field(default_factory=dict)
    drift_previous: dict[str, float] = field(default_factory=dict)
    score_change_reference: dict[str, float] = field(default_factory=dict)
    score_change_previous: dict[str, float] = field(default_factory=dict)
    evidence_mass: float = math.nan
    evidence_rows: tuple[int, ...] = ()  # rows of the map (and of the views' grids) that are evidence
    reference_step: int | None = None
    previous_step: int | None = None
    extra_values: dict[str, float] = field(default_factory=dict)  # ProbeMonitor(extra_values=...)
    message_mass: dict[str, float] = field(default_factory=dict)  # conversations: per message label
    evidence_average_precision: float = math.nan
    evidence_reciprocal_rank: float = math.nan
    cue_mass: float = math.nan
    cue_rows: tuple[int, ...] = ()
    faithfulness: dict[str, float] = field(default_factory=dict)

    def scalars(self) -> dict[str, float]:
        """Flat ``{name: value}`` of every finite number (names are relative: ``drift_ref/cosine``)."""
        values: dict[str, float] = {}
        for name, value in self.step_scores.items():
            values[f"step_score/{name}"] = value
        for name in (*DRIFT_METRICS, *DRIFT_COVERAGE):
            values[f"drift_ref/{name}"] = self.drift_reference.get(name, math.nan)
            values[f"drift_prev/{name}"] = self.drift_previous.get(name, math.nan)
        for name, value in self.score_change_reference.items():
            values[f"step_score_change_ref/{name}"] = value
        for name, value in self.score_change_previous.items():
            values[f"step_score_change_prev/{name}"] = value
        values["evidence_mass"] = self.evidence_mass
        values["evidence_average_precision"] = self.evidence_average_precision
        values["evidence_reciprocal_rank"] = self.evidence_reciprocal_rank
        values["cue_mass"] = self.cue_mass
        values.update({f"message_mass/{label}": v for label, v in self.message_mass.items()})
        values.update(self.faithfulness)
        values.update(self.extra_values)
        return {k: v for k, v in values.items() if v is not None and not math.isnan(v)}


@dataclass
class MonitorReport:
    """Everything a pass produced; sinks read it and never change it."""

    step: int
    epoch: int | None
    stage: str  # "fit", "validate" or "test"
    method: str
    prefix: str
    results: list[ProbeResult]
    skipped: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    # Every per-probe value the monitor can log, in a stable order (see values.value_names): the
    # columns of tables, which must exist before the first pass that fills them.
    value_names: tuple[str, ...] = ()
    # Training passes only (see monitor.alerts): the alerts fired at this pass, and the step of the
    # stabilization point so far (None: the maps are not stable at this pass), logged as mean/stabilization_step.
    alerts: list = field(default_factory=list)
    stabilization_step: int | None = None
    # False when the method computes no attribution map (``method="dummy"``): the results hold step
    # scores only, so the sinks draw no heatmap, write no map record and declare no map-based column.
    maps: bool = True

    def means(self) -> dict[str, float]:
        """Each value over probes (``mean/<name>``), pooled as :mod:`.values` defines it: a mean over
        the probes where it is defined, totals for counts; ``drift_*/probes_compared`` counts the
        probes with at least one compared token, so a mean drift always says how much it covers."""
        pooled: dict[str, list[float]] = {}
        for result in self.results:
            for name, value in result.scalars().items():
                pooled.setdefault(name, []).append(value)
        means = {name: pool(name, values) for name, values in pooled.items()}
        for drift in ("drift_ref", "drift_prev"):
            compared = pooled.get(f"{drift}/tokens_compared")
            if compared is not None:
                means[f"{drift}/probes_compared"] = float(sum(v > 0 for v in compared))
        if self.stabilization_step is not None and self.results:
            means[STABILIZATION_STEP] = float(self.stabilization_step)
        return means

    def rows(self) -> list[dict]:
        """One row per probe and one ``"mean"`` row: ``step, epoch, stage, method, probe`` and the values
        under the names the scalars use (what ``drift.csv`` and the W&B table hold)."""
        base = {"step": self.step, "epoch": self.epoch, "stage": self.stage, "method": self.method}
        rows = [{**base, "probe": r.probe.name, **r.scalars()} for r in self.results]
        if self.results:
            rows.append({**base, "probe": "mean", **self.means(), "seconds": self.seconds})
        return rows

    def scalars(self) -> dict[str, float]:
        """Every scalar under its full tag: ``<prefix>/<probe>/<name>``, ``<prefix>/mean/<name>`` and
        ``<prefix>/seconds`` (the projection of :meth:`rows` the trackers log)."""
        tags: dict[str, float] = {}
        for result in self.results:
            tags.update({f"{self.prefix}/{result.probe.name}/{name}": v for name, v in result.scalars().items()})
        tags.update({f"{self.prefix}/mean/{name}": v for name, v in self.means().items() if not math.isnan(v)})
        tags[f"{self.prefix}/seconds"] = self.seconds
        return tags

    def summary(self) -> str:
        """One line: the step, the probes, the stabilization point so far and the alerts of this pass."""
        stable = f"stable since step {self.stabilization_step}" if self.stabilization_step is not None else \
            "not stable yet"
        if not self.maps:  # step scores only: no map to be stable
            stable = "step scores only"
        alerts = "; ".join(a.message for a in self.alerts) if self.alerts else "no alert"
        return f"[{self.prefix}] step {self.step}: {len(self.results)} probes, {stable}, {alerts}"
