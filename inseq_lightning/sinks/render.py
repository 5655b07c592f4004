"""What sinks show, rendered once per result: a Markdown table, an HTML page, a heatmap figure."""

import html as html_lib
import math

import numpy as np

from ..monitor.drift import DRIFT_COVERAGE, DRIFT_METRICS
from ..monitor.report import MonitorReport, ProbeResult
from ..viz.figure import attribution_figure, figure_to_rgb
from ..viz.html import attributions_html
from ..viz.layout import build_grid
from ..viz.tokens import display_token

_MARKDOWN_SPECIAL = "\\`*_{}[]()#+-.!|<>"
TOP_K = 3


def markdown_token(token: str) -> str:
    """A token as Markdown text: visible spaces, every Markdown/HTML character escaped.

    TensorBoard's text plugin renders Markdown and sanitises the HTML; escaping keeps a token like
    ``<script>`` or ``|`` as text and keeps the table intact.
    """
    text = display_token(token).replace(" ", "␣") or "∅"
    out = []
    for ch in text:
        if ch in "<>&":
            out.append(html_lib.escape(ch))
        elif ch in _MARKDOWN_SPECIAL:
            out.append("\\" + ch)
        else:
            out.append(ch)
    return "".join(out)


def markdown_table(result: ProbeResult, step: int) -> str:
    """Rows: context tokens; columns: generated tokens; the top-3 cells of each column in bold;
    then one row per step score, and a drift summary line."""
    grid = build_grid(result.aggregated)
    header = "| token | " + " | ".join(markdown_token(c) for c in grid.column_labels) + " |"
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
        lines.append(f"| {marker}{markdown_token(label)} | " + " | ".join(cells) + " |")
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
    legend = f"Bold: the top {TOP_K} tokens of each column."
    if result.evidence_rows:
        legend += " ▸: the probe's evidence tokens."
    lines += ["", legend]
    return "\n".join(lines)


def result_html(result: ProbeResult, report: MonitorReport) -> str:
    """The ``show_attributions`` HTML document of one probe, titled with its step (rendered once per report)."""
    key = ("html", result.probe.name)
    if key not in report.cache:
        title = f"{result.probe.name} · {report.method} · step {report.step}"
        report.cache[key] = attributions_html([result.aggregated], title=title)
    return report.cache[key]


def result_image(result: ProbeResult, report: MonitorReport) -> np.ndarray:
    """The heatmap as ``[H, W, 3]`` uint8 pixels, drawn once per report and shared by the sinks."""
    key = ("image", result.probe.name)
    if key not in report.cache:
        figure = attribution_figure(result.aggregated,
                                    title=f"{result.probe.name} · {report.method} · step {report.step}")
        # Not a pyplot figure: it goes with its last reference, no close() needed.
        report.cache[key] = figure_to_rgb(figure)
    return report.cache[key]


def table_row(result: ProbeResult, report: MonitorReport, score_names, ) -> list:
    """One row of the probe x step table: step, probe, mean step scores, drift, evidence mass."""
    row = [report.step, report.stage, result.probe.name]
    row += [result.step_scores.get(name, math.nan) for name in score_names]
    row += [result.drift_reference.get(name, math.nan) for name in (*DRIFT_METRICS, *DRIFT_COVERAGE)]
    row.append(result.evidence_mass)
    return row


def table_columns(score_names) -> list[str]:
    return ["step", "stage", "probe", *score_names, *[f"drift_ref/{m}" for m in (*DRIFT_METRICS, *DRIFT_COVERAGE)],
            "evidence_mass"]
