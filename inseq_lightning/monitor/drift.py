"""Attribution drift: how a probe's attribution map moves against the first and the previous checkpoint.

A map is a probe's aggregated, normalized attributions laid out as ``[rows, steps]``: rows are
the context tokens (source tokens, then target-prefix tokens when they were attributed), columns
are the attributed target tokens; NaN marks a token that did not exist yet at that step. Every
metric is computed per column over the rows valid in both maps, then averaged over the columns
where it is defined.

Two maps are compared over the longest common prefix of their attributed tokens (all of them for
teacher-forced probes; in generate mode, the steps before the continuations part): a step is
compared only when every token it could see is the same in both maps. How much was compared is
reported beside the metrics (:data:`DRIFT_COVERAGE`), so that a mean is never read as covering
more than it does.
"""

import math
from dataclasses import dataclass

import numpy as np

from ..data.outputs import FeatureAttributionSequenceOutput
from ..utils.sequences import common_prefix_length

DRIFT_METRICS = ("cosine", "js_divergence", "top1_agreement", "top3_agreement", "spearman")
# What a drift comparison covered: attributed tokens (columns) compared, compared tokens where some
# metric is undefined (an all-zero column has no direction and no ranking), and whether the
# attributed continuation differs from the one compared with (generate mode).
DRIFT_COVERAGE = ("tokens_compared", "tokens_undefined", "continuation_changed")


@dataclass
class AttributionMap:
    """The comparable part of one aggregated attribution: scores, the ids they belong to, the source rows."""

    scores: np.ndarray  # [R, N]
    row_ids: tuple[int, ...]
    column_ids: tuple[int, ...]
    n_source: int  # the first n_source rows are source (decoder-only: prompt) tokens

    @classmethod
    def from_sequence(cls, seq: FeatureAttributionSequenceOutput) -> "AttributionMap":
        if seq.source_attributions is not None and seq.source_attributions.ndim != 2:
            raise ValueError("Drift needs aggregated attributions ([tokens, steps]); call aggregate() first")
        blocks, rows = [], []
        if seq.source_attributions is not None:  # encoder-decoder
            blocks.append(seq.source_attributions.detach().float().cpu().numpy())
            rows += [t.id for t in seq.source]
            n_source = len(seq.source)
            if seq.target_attributions is not None:
                blocks.append(seq.target_attributions.detach().float().cpu().numpy())
                rows += [t.id for t in seq.target[: blocks[-1].shape[0]]]
        else:  # decoder-only: the prompt tokens are the first target rows
            blocks.append(seq.target_attributions.detach().float().cpu().numpy())
            # Tokens after the last attributed step (a chat template's closing tokens) have no row.
            rows += [t.id for t in seq.target[: blocks[-1].shape[0]]]
            n_source = len(seq.source)
        scores = np.concatenate(blocks, axis=0) if len(blocks) > 1 else blocks[0]
        return cls(scores, tuple(rows), tuple(t.id for t in seq.generated), n_source)

    def comparable(self, other: "AttributionMap") -> bool:
        """Same tokens in the same places (always true for teacher-forced probes)."""
        return self.row_ids == other.row_ids and self.column_ids == other.column_ids

    def common_columns(self, other: "AttributionMap") -> tuple[int, int]:
        """``(rows, columns)``: the leading rows and columns the two maps can be compared on.

        The columns are the longest common prefix of the attributed tokens whose valid rows (the
        tokens that step could see) all lie in the common prefix of the rows; the rows are that
        common prefix. ``(0, 0)`` when the source tokens differ.
        """
        if self.n_source != other.n_source or self.row_ids[: self.n_source] != other.row_ids[: other.n_source]:
            return 0, 0
        rows = common_prefix_length(self.row_ids, other.row_ids)
        columns = common_prefix_length(self.column_ids, other.column_ids)
        for j in range(columns):
            if _last_valid_row(self.scores[:, j]) >= rows or _last_valid_row(other.scores[:, j]) >= rows:
                return rows, j
        return rows, columns

    def to_state(self) -> dict:
        return {"scores": [[None if math.isnan(v) else round(float(v), 6) for v in row] for row in self.scores],
                "row_ids": list(self.row_ids), "column_ids": list(self.column_ids), "n_source": self.n_source}

    @classmethod
    def from_state(cls, state: dict) -> "AttributionMap":
        scores = np.array([[np.nan if v is None else v for v in row] for row in state["scores"]], dtype=float)
        return cls(scores.reshape(len(state["row_ids"]), len(state["column_ids"])), tuple(state["row_ids"]),
                   tuple(state["column_ids"]), int(state["n_source"]))


def _last_valid_row(column: np.ndarray) -> int:
    valid = np.flatnonzero(~np.isnan(column))
    return int(valid[-1]) if len(valid) else -1


def _ranks(values: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean rank), as Spearman's coefficient needs; O(n log n)."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)  # one past the last 0-based rank of each distinct value
    return ((ends - counts + ends - 1) / 2.0)[inverse]


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    denom = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denom) if denom > 0 else math.nan


def _js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence in bits (0 = same distribution, 1 = disjoint)."""
    p, q = p / p.sum(), q / q.sum()
    m = 0.5 * (p + q)

    def kl(x: np.ndarray) -> float:
        nz = x > 0
        return float((x[nz] * np.log2(x[nz] / m[nz])).sum())

    return 0.5 * kl(p) + 0.5 * kl(q)


def _top_k(values: np.ndarray, k: int) -> set[int]:
    return set(np.argsort(-values, kind="mergesort")[:k].tolist())


def column_drift(a: np.ndarray, b: np.ndarray, n_source: int) -> dict[str, float]:
    """Metrics between two columns (NaN = row not valid)."""
    valid = ~np.isnan(a) & ~np.isnan(b)
    x, y = a[valid], b[valid]
    out = dict.fromkeys(DRIFT_METRICS, math.nan)
    if len(x) == 0:
        return out
    norm = float(np.linalg.norm(x) * np.linalg.norm(y))
    out["cosine"] = float(x @ y / norm) if norm > 0 else math.nan
    px, py = np.abs(x), np.abs(y)
    if px.sum() > 0 and py.sum() > 0:
        out["js_divergence"] = _js_divergence(px, py)
    if len(x) >= 2:
        out["spearman"] = _pearson(_ranks(x), _ranks(y))
    src = valid[:n_source]
    sa, sb = np.abs(a[:n_source][src]), np.abs(b[:n_source][src])
    # An all-zero column ranks nothing: agreement with it is undefined, not perfect (ties by index).
    if src.any() and sa.sum() > 0 and sb.sum() > 0:
        out["top1_agreement"] = float(_top_k(sa, 1) == _top_k(sb, 1))
        k = min(3, len(sa))
        out["top3_agreement"] = len(_top_k(sa, k) & _top_k(sb, k)) / k
    return out


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def map_drift(current: AttributionMap, other: AttributionMap) -> dict[str, float]:
    """Drift metrics averaged over the compared columns (see :meth:`AttributionMap.common_columns`),
    each over the columns where it is defined, and the :data:`DRIFT_COVERAGE` counts.

    Metrics are NaN when no column could be compared or none defines them.
    """
    rows, columns = current.common_columns(other)
    per_column = [column_drift(current.scores[:rows, j], other.scores[:rows, j], current.n_source)
                  for j in range(columns)]
    out = {name: _nanmean([c[name] for c in per_column]) for name in DRIFT_METRICS}
    out["tokens_compared"] = float(columns)
    out["tokens_undefined"] = float(sum(any(math.isnan(v) for v in c.values()) for c in per_column))
    out["continuation_changed"] = float(current.column_ids != other.column_ids)
    return out


def evidence_mass(attribution_map: AttributionMap, evidence_rows: list[int]) -> float:
    """Share of absolute attribution on the evidence rows, averaged over steps (columns)."""
    if not evidence_rows:
        return math.nan
    shares = []
    for j in range(attribution_map.scores.shape[1]):
        column = attribution_map.scores[:, j]
        valid = ~np.isnan(column)
        total = float(np.abs(column[valid]).sum())
        if total > 0:
            on_evidence = float(np.nansum(np.abs(column[evidence_rows])))
            shares.append(on_evidence / total)
    return _nanmean(shares)
