"""The compact per-probe history behind drift: the reference map, the previous map and one row of
scalars per pass. It is what a callback's ``state_dict`` stores, so a resumed run continues it."""

import math
from dataclasses import dataclass, field

from .drift import AttributionMap


@dataclass
class ProbeHistory:
    reference: AttributionMap | None = None
    reference_step: int | None = None
    reference_scores: dict[str, float] = field(default_factory=dict)
    previous: AttributionMap | None = None
    previous_step: int | None = None
    previous_scores: dict[str, float] = field(default_factory=dict)
    rows: list[dict[str, float]] = field(default_factory=list)  # {"step": ..., scalar name: value}

    def to_state(self) -> dict:
        return {
            "reference": self.reference.to_state() if self.reference is not None else None,
            "reference_step": self.reference_step,
            "reference_scores": dict(self.reference_scores),
            "previous": self.previous.to_state() if self.previous is not None else None,
            "previous_step": self.previous_step,
            "previous_scores": dict(self.previous_scores),
            "rows": [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
                     for row in self.rows],
        }

    @classmethod
    def from_state(cls, state: dict) -> "ProbeHistory":
        return cls(
            reference=AttributionMap.from_state(state["reference"]) if state.get("reference") else None,
            reference_step=state.get("reference_step"),
            reference_scores=dict(state.get("reference_scores", {})),
            previous=AttributionMap.from_state(state["previous"]) if state.get("previous") else None,
            previous_step=state.get("previous_step"),
            previous_scores=dict(state.get("previous_scores", {})),
            rows=[dict(row) for row in state.get("rows", [])],
        )


@dataclass
class DriftHistory:
    """``{probe name: ProbeHistory}`` plus the last step logged per stage (to never log a step twice)."""

    probes: dict[str, ProbeHistory] = field(default_factory=dict)
    last_step: dict[str, int] = field(default_factory=dict)

    def probe(self, name: str) -> ProbeHistory:
        return self.probes.setdefault(name, ProbeHistory())

    def state_dict(self) -> dict:
        return {"version": 1, "probes": {name: h.to_state() for name, h in self.probes.items()},
                "last_step": dict(self.last_step)}

    @classmethod
    def from_state_dict(cls, state: dict) -> "DriftHistory":
        if state.get("version") != 1:
            raise ValueError(f"Unknown drift history version {state.get('version')!r}")
        return cls({name: ProbeHistory.from_state(s) for name, s in state["probes"].items()},
                   {k: int(v) for k, v in state.get("last_step", {}).items()})
