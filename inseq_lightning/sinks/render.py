"""What sinks show: a Markdown table, an HTML page, a heatmap image; the last two rendered once per
result and pass, inside :func:`shared_renderings`, and shared by every sink."""

import html as html_lib
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import numpy as np

from ..monitor.drift import DRIFT_METRICS
from ..monitor.report import MonitorReport, ProbeResult
from ..monitor.values import FAITHFULNESS_VALUES, definition, mean_only_names
from ..viz.heatmap import attribution_heatmap
from ..viz.html import attributions_html
from ..viz.layout import build_grid
from ..viz.tokens import readable_labels

_MARKDOWN_SPECIAL = "\\`*_{}[]()#+-.!|<>"
TOP_K = 3


def markdown_token(token: str) -> str:
    """A token as Markdown text: decoded (:func:`.viz.tokens.readable_labels`), visible spaces, every
    Markdown/HTML character escaped.

    TensorBoard's text plugin renders Markdown and sanitises the HTML; escaping keeps a token like
    ``<script>`` or ``|`` as text and keeps the table intact.
    """
    return _markdown_text(readable_labels([token])[0])


def _markdown_text(text: str) -> str:
    out = []
    for ch in text.replace(" ", "␣") or "∅":
        if ch in "<>&":
            out.append(html_lib.escape(ch))
        elif ch in _MARKDOWN_SPECIAL:
            out.append("\\" + ch)
        else:
            out.append(ch)
    return "".join(out)


def _grid_label(label: str, continues: bool) -> str:
    """A grid label (already readable text) as Markdown; a continuation in italics."""
    return f"*{_markdown_text(label)}*" if continues else _markdown_text(label)


def markdown_table(result: ProbeResult, step: int) -> str:
    """Rows: context tokens; columns: generated tokens; the top-3 cells of each column in bold;
    then one row per step score, and a drift summary line (without a map, ``method="dummy"``: the
    step-score rows only)."""
    grid = build_grid(result.aggregated)
    header = "| token | " + " | ".join(map(_grid_label, grid.column_labels, grid.column_continues)) + " |"
    lines = [f"**{markdown_token(result.probe.name)}** at step {step}", "", header,
             "|---|" + "---:|" * len(grid.column_labels)]
    tops = []
    for j in range(len(grid.column_labels)):
        column = [(abs(row[j]), i) for i, row in enumerate(grid.scores) if not math.isnan(row[j])]
        tops.append({i for _, i in sorted(column, reverse=True)[:TOP_K]})
    for i, (label, row) in enumerate(zip(grid.row_labels, grid.scores)):
        cells = []
        for j, value in enumerate(row):
            if math.isnan(value):
                cells.append("")
            else:
                cells.append(f"**{value:.3f}**" if i in tops[j] else f"{value:.3f}")
        marker = "▸ " if i in result.evidence_rows else ""
        lines.append(f"| {marker}{_grid_label(label, grid.row_continues[i])} | " + " | ".join(cells) + " |")
    for name, values in grid.step_scores.items():
        lines.append(f"| *{markdown_token(name)}* | " + " | ".join(f"{v:.3f}" for v in values) + " |")
    summary = [f"{name} {result.drift_reference[name]:.3f}" for name in DRIFT_METRICS
               if not math.isnan(result.drift_reference.get(name, math.nan))]
    if summary:
        compared = result.drift_reference.get("tokens_compared", math.nan)
        total = len(grid.column_labels)
        coverage = f" (over the first {compared:.0f} of {total} tokens)" if compared < total else ""
        lines += ["", f"Drift against step {result.reference_step}{coverage}: " + ", ".join(summary)]
    if not math.isnan(result.evidence_mass):
        lines += ["", f"Evidence mass: {result.evidence_mass:.3f}"]
    if result.message_mass:  # a conversation: which message the answer comes from
        shares = ", ".join(f"{markdown_token(label)} {value:.3f}" for label, value in result.message_mass.items())
        lines += ["", f"Attribution per message: {shares}"]
    if grid.row_labels:  # method="dummy" has no map: the table is the step-score rows alone
        legend = f"Bold: the top {TOP_K} tokens of each column."
        if result.evidence_rows:
            legend += " ▸: the probe's evidence tokens."
        lines += ["", legend]
    return "\n".join(lines)


# The renderings of the pass being published ({key: rendering}); None outside a pass.
_RENDERINGS: ContextVar[dict | None] = ContextVar("inseq_lightning_renderings", default=None)


@contextmanager
def shared_renderings() -> Iterator[None]:
    """Within it, each result's HTML page and heatmap are rendered once and shared by every sink;
    they are dropped on exit. :meth:`ProbeMonitor.publish` enters it around its sinks; a sink called
    on its own renders what it needs."""
    token = _RENDERINGS.set({})
    try:
        yield
    finally:
        _RENDERINGS.reset(token)


def _shared(kind: str, result: ProbeResult, report: MonitorReport, render: Callable[[], object]):
    renderings = _RENDERINGS.get()
    if renderings is None:
        return render()
    key = (kind, id(report), id(result))
    if key not in renderings:
        # Kept with the objects it was made from: their ids cannot be reused before the pass ends.
        renderings[key] = (report, result, render())
    return renderings[key][2]


def _title(result: ProbeResult, report: MonitorReport) -> str:
    return f"{result.probe.name} · {report.method} · step {report.step}"


def result_html(result: ProbeResult, report: MonitorReport) -> str:
    """The ``show_attributions`` HTML document of one probe, titled with its step."""
    return _shared("html", result, report, lambda: attributions_html([result.aggregated], title=_title(result, report)))


def result_image(result: ProbeResult, report: MonitorReport) -> np.ndarray:
    """The heatmap as ``[H, W, 3]`` uint8 pixels (read-only: one array may go to every sink)."""
    def render() -> np.ndarray:
        pixels = attribution_heatmap(result.aggregated, title=_title(result, report),
                                     evidence_rows=result.evidence_rows).pixels
        pixels.flags.writeable = False
        return pixels

    return _shared("image", result, report, render)


# The values the compare view draws as curves, by group (names as in the scalars).
_CURVES = {"drift": [f"{drift}/{metric}" for drift in ("drift_ref", "drift_prev") for metric in DRIFT_METRICS],
           "faithfulness": list(FAITHFULNESS_VALUES)}


def map_record(result: ProbeResult, report: MonitorReport) -> dict:
    """One probe's map at one pass as plain JSON: what the Attributions tab's compare view and the
    ``drift`` report read (compared by :func:`~inseq_lightning.tensorboard_plugin.maps.compare_maps`).

    ``rows`` / ``columns``: the grid's readable labels (as on the page), ``row_tokens`` /
    ``column_tokens``: the raw tokens, ``scores``: ``[rows][columns]`` of the aggregated map (None
    where a token did not exist yet), ``step_scores``: ``{name: [columns]}``, ``values``: every value
    logged for the probe at this pass, ``curves``: the values the compare view plots
    (``{"name", "group", "better"}``), ``evidence_rows`` and ``cue_rows``.
    """
    seq = result.aggregated
    grid = build_grid(seq)
    row_tokens = [t.token for t in seq.source] if seq.source_attributions is not None else []
    if seq.target_attributions is not None:
        row_tokens += [t.token for t in seq.target[: seq.target_attributions.shape[0]]]
    logged = set(report.value_names) or set(result.scalars())
    curves = [{"name": name, "group": group, "better": definition(name).better}
              for group, names in _CURVES.items() for name in names if name in logged]
    return {
        "version": 1, "probe": result.probe.name, "step": report.step, "prefix": report.prefix,
        "method": report.method, "rows": grid.row_labels, "row_groups": grid.row_groups,
        "columns": grid.column_labels, "row_tokens": row_tokens, "column_tokens": [t.token for t in seq.generated],
        "scores": [[_finite(v) for v in row] for row in grid.scores],
        "step_scores": {name: [_finite(v) for v in values] for name, values in grid.step_scores.items()},
        "values": {name: v for name, v in result.scalars().items() if _finite(v) is not None}, "curves": curves,
        "evidence_rows": list(result.evidence_rows), "cue_rows": list(result.cue_rows),
    }


def _finite(value: float) -> float | None:
    """JSON has no NaN: an undefined score is None."""
    return None if math.isnan(value) or math.isinf(value) else float(value)


def table_columns(report: MonitorReport) -> list[str]:
    """The W&B table's columns: step, stage, probe and every value the monitor logs (names as in the scalars)."""
    return ["step", "stage", "probe", *report.value_names, *mean_only_names(report.maps), "seconds"]


def table_rows(report: MonitorReport, columns: list[str]) -> list[list]:
    """One row per probe and the ``mean`` row, in ``columns`` order (NaN where a value is undefined)."""
    return [[row.get(c, math.nan) for c in columns] for row in report.rows()]
