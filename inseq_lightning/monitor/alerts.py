"""Alerts over the logged values, and the stabilization point of the maps.

An :class:`AlertRule` watches one logged value (a name of :mod:`.values`, e.g. ``"evidence_mass"``,
``"drift_prev/cosine"``, ``"cue_mass"``, or a user value) on each probe (``probe="*"``), on one probe,
or on the mean over probes (``probe="mean"``). Its condition is checked after every training pass:

* ``kind="below"`` / ``"above"``: the value is below / above ``threshold`` or, with ``other=``, below /
  above another value of the same probe (``AlertRule("cue_mass", "above", other="evidence_mass")``);
* ``kind="change"``: the value moved by more than ``threshold`` (absolute) from its value at the
  reference (first) pass (``against="reference"``) or at the previous pass (``against="previous"``).

A rule fires once per target (probe or mean) when its condition held for ``patience`` consecutive
passes (a pass where the value is undefined, NaN, neither counts nor resets). Firing: an
:class:`AttributionAlertWarning`, the alert in ``report.alerts`` (the TensorBoard sink writes it to
``<prefix>/alerts`` in the Text tab), ``wandb.alert`` when a W&B run is active, and with
``stop_training=True`` the callbacks stop training (Lightning ``trainer.should_stop``, HF
``control.should_training_stop``). Counters and fired alerts are part of the monitor's state, so a
resumed run keeps its patience counters and never fires an alert twice.

The **stabilization point** (:class:`Stabilization`): the first pass after which
``mean/drift_prev/<metric>`` stayed within ``tolerance`` at every later pass so far (``>= 1 -
tolerance`` for similarities, ``<= tolerance`` for divergences); ``None`` while the latest pass is
not. It is recomputed every pass, so it can move later when the maps move again.
"""

import math
import sys
import warnings
from dataclasses import asdict, dataclass, field

from .values import HIGHER, definition

KINDS = ("below", "above", "change")
AGAINST = ("reference", "previous")
CANARY = "canary"


class AttributionAlertWarning(UserWarning):
    """An :class:`AlertRule` fired."""


@dataclass(frozen=True)
class AlertRule:
    """A condition on a logged value; see the module docstring.

    Args:
        value: the logged value's relative name (``"evidence_mass"``, ``"drift_prev/cosine"``, ...).
        kind: ``"below"``, ``"above"`` or ``"change"``.
        threshold: the bound (below/above), or the largest allowed absolute change (change).
        probe: a probe name, ``"*"`` (each probe on its own) or ``"mean"`` (the mean over probes).
        other: below/above only: compare with this value of the same target instead of a threshold
            (plus ``threshold`` as a margin when given: ``value > other + threshold``).
        against: change only: ``"reference"`` (the first pass where the value was defined) or ``"previous"``.
        patience: passes in a row the condition must hold before the rule fires.
        stop_training: stop training when the rule fires.
        name: a label (default: a description of the rule); rules are told apart by it in the state.
    """

    value: str
    kind: str = "below"
    threshold: float | None = None
    probe: str = "*"
    other: str | None = None
    against: str = "reference"
    patience: int = 1
    stop_training: bool = False
    name: str | None = None

    def __post_init__(self):
        if not isinstance(self.value, str) or not self.value:
            raise ValueError(f"AlertRule.value must be a logged value's name, got {self.value!r}")
        if self.kind not in KINDS:
            raise ValueError(f"AlertRule.kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "change":
            if self.other is not None:
                raise ValueError("AlertRule(kind='change') compares a value with its own past: other= is not allowed")
            if self.against not in AGAINST:
                raise ValueError(f"AlertRule.against must be one of {AGAINST}, got {self.against!r}")
            if self.threshold is None or not self.threshold >= 0:
                raise ValueError(f"AlertRule(kind='change') needs threshold= (an amount >= 0), got {self.threshold!r}")
        elif self.other is None and (self.threshold is None or math.isnan(self.threshold)):
            raise ValueError(f"AlertRule(kind={self.kind!r}) needs threshold= or other=")
        if not isinstance(self.patience, int) or isinstance(self.patience, bool) or self.patience < 1:
            raise ValueError(f"AlertRule.patience must be a positive integer, got {self.patience!r}")
        if not isinstance(self.probe, str) or not self.probe:
            raise ValueError(f"AlertRule.probe must be a probe name, '*' or 'mean', got {self.probe!r}")

    @property
    def key(self) -> str:
        """The rule's label: its ``name``, else a description (``"cue_mass above evidence_mass on *"``)."""
        if self.name:
            return self.name
        if self.kind == "change":
            condition = f"changes by more than {self.threshold:g} against the {self.against} pass"
        elif self.other is not None:
            margin = f" + {self.threshold:g}" if self.threshold else ""
            condition = f"{self.kind} {self.other}{margin}"
        else:
            condition = f"{self.kind} {self.threshold:g}"
        return f"{self.value} {condition} on {self.probe}"

    def to_state(self) -> dict:
        """JSON-safe dict (the HF callback's arguments are stored as JSON)."""
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict) -> "AlertRule":
        return cls(**state)

    @classmethod
    def coerce(cls, rule) -> "AlertRule":
        if isinstance(rule, AlertRule):
            return rule
        if isinstance(rule, dict):
            return cls.from_state(rule)
        raise TypeError(f"alerts must hold AlertRule objects (or their to_state() dicts), got {type(rule).__name__}")

    def condition(self, value: float, other: float | None, past: float | None) -> bool | None:
        """Whether the condition holds; None when it cannot be evaluated (an undefined value)."""
        if value is None or math.isnan(value):
            return None
        if self.kind == "change":
            if past is None or math.isnan(past):
                return None
            return abs(value - past) > self.threshold
        if self.other is not None:
            if other is None or math.isnan(other):
                return None
            bound = other + (self.threshold or 0.0)
        else:
            bound = self.threshold
        return value < bound if self.kind == "below" else value > bound


def canary_rule() -> AlertRule:
    """The default rule when a probe has a cue: its cue mass overtakes its evidence mass."""
    return AlertRule("cue_mass", "above", other="evidence_mass", probe="*", name=CANARY)


@dataclass
class Alert:
    """One fired alert."""

    rule: str
    probe: str  # the probe's name, or "mean"
    value_name: str
    value: float
    step: int
    message: str
    stop_training: bool = False

    def to_state(self) -> dict:
        return {**asdict(self), "value": None if math.isnan(self.value) else self.value}

    @classmethod
    def from_state(cls, state: dict) -> "Alert":
        return cls(**{**state, "value": math.nan if state.get("value") is None else state["value"]})


@dataclass
class Stabilization:
    """The stabilization point of ``mean/drift_prev/<metric>``; see the module docstring."""

    metric: str = "cosine"
    tolerance: float = 0.05
    passes: list[tuple[int, float | None]] = field(default_factory=list)  # (step, mean drift or None)

    def __post_init__(self):
        if not 0 <= self.tolerance <= 1:
            raise ValueError(f"stabilization_tolerance must be in [0, 1], got {self.tolerance!r}")
        from .drift import DRIFT_METRICS

        if self.metric not in DRIFT_METRICS:
            raise ValueError(f"stabilization_metric must be one of {DRIFT_METRICS}, got {self.metric!r}")

    @property
    def value_name(self) -> str:
        return f"drift_prev/{self.metric}"

    def within(self, value: float | None) -> bool:
        if value is None or math.isnan(value):
            return False
        if definition(self.value_name).better == HIGHER:
            return value >= 1 - self.tolerance
        return value <= self.tolerance

    def add(self, step: int, means: dict[str, float]) -> int | None:
        """Record one pass's means; the stabilization step after it."""
        value = means.get(self.value_name)
        self.passes.append((int(step), None if value is None or math.isnan(value) else float(value)))
        return self.step

    @property
    def step(self) -> int | None:
        """The first pass after which the drift stayed within tolerance (None: not stable at the latest pass)."""
        first = len(self.passes)
        while first > 0 and self.within(self.passes[first - 1][1]):
            first -= 1
        if first == len(self.passes) or first == 0:  # unstable now (a first pass has no drift: never within)
            return None
        return self.passes[first - 1][0]

    def describe(self) -> str:
        bound = f">= {1 - self.tolerance:g}" if definition(self.value_name).better == HIGHER else \
            f"<= {self.tolerance:g}"
        return f"mean/{self.value_name} {bound}"

    def state_dict(self) -> dict:
        return {"metric": self.metric, "tolerance": self.tolerance, "passes": [list(p) for p in self.passes]}

    def load_state_dict(self, state: dict) -> None:
        self.passes = [(int(s), v) for s, v in state.get("passes", [])]


class AlertTracker:
    """Evaluates the rules after each training pass and keeps their counters and fired alerts.

    Args:
        rules: the :class:`AlertRule` objects (or their ``to_state()`` dicts).
        canary: add :func:`canary_rule` (the callers pass ``canary and any probe has a cue``).
    """

    def __init__(self, rules=(), canary: bool = False):
        self.rules = [AlertRule.coerce(r) for r in rules]
        if canary and not any(r.key == CANARY for r in self.rules):
            self.rules.append(canary_rule())
        keys = [r.key for r in self.rules]
        if len(set(keys)) != len(keys):
            raise ValueError(f"Two alert rules share a name: {keys}; give them distinct name=")
        # {rule key: {target: {"count": n, "fired": bool, "reference": v, "previous": v}}}
        self.counters: dict[str, dict[str, dict]] = {}
        self.fired: list[Alert] = []

    def evaluate(self, report, means: dict[str, float] | None = None) -> list[Alert]:
        """Update the counters with a report's values; the alerts that fire now (also kept in :attr:`fired`)."""
        targets = {r.probe.name: r.scalars() for r in report.results}
        targets["mean"] = dict(report.means() if means is None else means)
        new: list[Alert] = []
        for rule in self.rules:
            names = list(report_probe_names(report)) if rule.probe == "*" else [rule.probe]
            for target in names:
                values = targets.get(target)
                if values is None:
                    continue
                alert = self._update(rule, target, values, report)
                if alert is not None:
                    new.append(alert)
        self.fired.extend(new)
        return new

    def _update(self, rule: AlertRule, target: str, values: dict[str, float], report) -> Alert | None:
        state = self.counters.setdefault(rule.key, {}).setdefault(
            target, {"count": 0, "fired": False, "reference": None, "previous": None})
        value = values.get(rule.value, math.nan)
        past = state["reference"] if rule.against == "reference" else state["previous"]
        holds = rule.condition(value, values.get(rule.other, math.nan) if rule.other else None, past)
        if not math.isnan(value):
            if state["reference"] is None:
                state["reference"] = value
            state["previous"] = value
        if holds is None:
            return None
        state["count"] = state["count"] + 1 if holds else 0
        if state["fired"] or state["count"] < rule.patience:
            return None
        state["fired"] = True
        passes = f" for {rule.patience} passes" if rule.patience > 1 else ""
        compared = f" ({rule.other} = {values[rule.other]:.4g})" if rule.other else ""
        if rule.kind == "change":
            compared = f" ({rule.against} pass: {past:.4g})"
        message = (f"Attribution alert [{report.prefix}] {rule.key}: {target} {rule.value} = {value:.4g}{compared} "
                   f"at step {report.step}{passes}" + ("; stopping training" if rule.stop_training else ""))
        return Alert(rule.key, target, rule.value, float(value), int(report.step), message, rule.stop_training)

    def state_dict(self) -> dict:
        return {"version": 1, "counters": {k: {t: dict(s) for t, s in v.items()} for k, v in self.counters.items()},
                "fired": [a.to_state() for a in self.fired]}

    def load_state_dict(self, state: dict) -> None:
        self.counters = {k: {t: dict(s) for t, s in v.items()} for k, v in state.get("counters", {}).items()}
        self.fired = [Alert.from_state(a) for a in state.get("fired", [])]


def report_probe_names(report) -> list[str]:
    return [r.probe.name for r in report.results]


def announce(alerts: list[Alert], prefix: str) -> None:
    """A warning per alert and, when a W&B run is active, ``wandb.alert`` (recorded in offline runs too)."""
    for alert in alerts:
        warnings.warn(alert.message, AttributionAlertWarning, stacklevel=4)
    wandb = sys.modules.get("wandb")  # never imported here: a run can only be active if the user imported it
    run = getattr(wandb, "run", None) if wandb is not None else None
    if run is None:
        return
    for alert in alerts:
        # The title names the rule and target: W&B rate-limits alerts that share a title (wait_duration).
        run.alert(title=f"{prefix}: {alert.rule} ({alert.probe})", text=alert.message,
                  level=wandb.AlertLevel.WARN, wait_duration=1)


__all__ = ["Alert", "AlertRule", "AlertTracker", "AttributionAlertWarning", "Stabilization", "canary_rule"]
