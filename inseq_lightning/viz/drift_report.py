"""The ``drift`` command's report: one self-contained HTML file with the curves over checkpoints (mean
and per probe), each checkpoint's map per probe and the difference maps of consecutive checkpoints.

Inline SVG and inline styles only: no script, no stylesheet, no image file, no external reference,
so the file can be mailed or attached as it is. Every token, probe name and path is escaped.
The numbers are the reports' own (``MonitorReport.rows()``, what ``drift.csv`` holds); each value
is also written in full in a ``data-value`` attribute.
"""

import html
import math
from collections.abc import Mapping, Sequence
from itertools import pairwise
from pathlib import Path

from ..monitor.drift import DRIFT_METRICS
from ..monitor.report import MonitorReport, ProbeResult
from ..monitor.values import FAITHFULNESS_VALUES, definition
from ..sinks.render import map_record
from ..tensorboard_plugin.maps import compare_maps
from .colors import rgb, score_range, text_color
from .html import sequence_html

_CELL = "padding:2px 6px;border:1px solid #ddd;text-align:center;font-family:monospace;font-size:12px"
_PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#7f7f7f")
_MEAN = "mean"


def write_drift_report(path: str | Path, reports: Sequence[MonitorReport],
                       checkpoints: Mapping[int, str] | None = None) -> Path:
    """Write :func:`drift_report_html` to ``path`` (its folder is created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(drift_report_html(reports, checkpoints), encoding="utf-8")
    return path


def drift_report_html(reports: Sequence[MonitorReport], checkpoints: Mapping[int, str] | None = None) -> str:
    """The report of the passes ``reports`` (one per checkpoint, oldest first) as an HTML document.

    ``checkpoints``: ``{step: checkpoint name}`` shown beside each step.
    """
    checkpoints = dict(checkpoints or {})
    rows = [row for report in reports for row in report.rows()]
    names = _curve_names(reports, rows)
    probes = list(dict.fromkeys(r.probe.name for report in reports for r in report.results))
    method = reports[0].method if reports else ""
    parts = [f"<h1>Attribution drift across checkpoints ({_text(method)})</h1>", _checkpoint_list(reports, checkpoints),
             "<h2>Curves</h2>", _legend(probes), '<div style="display:flex;flex-wrap:wrap;gap:16px">',
             *(_chart(name, rows, probes) for name in names), "</div>",
             "<h2>Values</h2><p>One row per probe and checkpoint and a mean row, as in <code>drift.csv</code>.</p>",
             _values_table(rows, names), "<h2>Maps</h2>"]
    for probe in probes:
        parts.append(_probe_maps(probe, reports, checkpoints))
    body = "".join(parts)
    return ('<!DOCTYPE html><html><head><meta charset="utf-8"><title>inseq-lightning drift report</title></head>'
            f'<body style="font-family:sans-serif;background:#ffffff;color:#000000;margin:16px">{body}</body></html>')


# ---- curves --------------------------------------------------------------------------------------------------------
def _curve_names(reports: Sequence[MonitorReport], rows: list[dict]) -> list[str]:
    """Drift against the first and the previous checkpoint, step scores, evidence mass, faithfulness:
    those with at least one defined value."""
    logged = [n for report in reports for n in report.value_names]
    wanted = [f"{drift}/{metric}" for drift in ("drift_ref", "drift_prev") for metric in DRIFT_METRICS]
    wanted += [n for n in dict.fromkeys(logged) if n.startswith("step_score/")]
    wanted += ["evidence_mass", *FAITHFULNESS_VALUES]
    return [n for n in wanted if any(_defined(row.get(n)) for row in rows)]


def _chart(name: str, rows: list[dict], probes: list[str]) -> str:
    width, height, left, right, top, bottom = 300, 170, 50, 12, 10, 24
    steps = sorted({row["step"] for row in rows})
    values = [row[name] for row in rows if _defined(row.get(name))]
    lo, hi = min(values), max(values)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    first, last = steps[0], steps[-1]

    def x(step: int) -> float:
        return left + (0.5 if last == first else (step - first) / (last - first)) * (width - left - right)

    def y(value: float) -> float:
        return top + (1 - (value - lo) / (hi - lo)) * (height - top - bottom)

    svg = [f'<svg width="{width}" height="{height}" role="img" data-name="{_text(name)}">',
           (f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" '
            'fill="#fafafa" stroke="#ddd"/>')]
    for probe, colour, stroke in [*((p, _PALETTE[i % len(_PALETTE)], 1.2) for i, p in enumerate(probes)),
                                  (_MEAN, "#000000", 2.5)]:
        points = [(row["step"], row[name]) for row in rows if row["probe"] == probe and _defined(row.get(name))]
        if not points:
            continue
        line = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in points)
        svg.append(f'<polyline points="{line}" fill="none" stroke="{colour}" stroke-width="{stroke}"/>')
        for step, value in points:
            svg.append(f'<circle cx="{x(step):.1f}" cy="{y(value):.1f}" r="{stroke + 1.5}" fill="{colour}" '
                       f'data-probe="{_text(probe)}" data-step="{step}" data-value="{_full(value)}">'
                       f'<title>{_text(probe)} at step {step}: {value:.4f}</title></circle>')
    for value, anchor in ((hi, top + 9), (lo, height - bottom)):
        svg.append(f'<text x="{left - 4}" y="{anchor}" text-anchor="end" font-size="10">{value:.3f}</text>')
    for step in steps:
        svg.append(f'<text x="{x(step):.1f}" y="{height - 8}" text-anchor="middle" font-size="10">{step}</text>')
    svg.append("</svg>")
    better = definition(name).better
    caption = _text(name) + (f" ({better} is better)" if better else "")
    return f'<figure style="margin:0"><figcaption style="font-size:13px">{caption}</figcaption>{"".join(svg)}</figure>'


def _legend(probes: list[str]) -> str:
    items = [f'<span style="color:{_PALETTE[i % len(_PALETTE)]}">&#9632; {_text(p)}</span>' for i, p in enumerate(probes)]
    items.append('<span style="color:#000000;font-weight:bold">&#9632; mean over probes</span>')
    return f'<p style="display:flex;gap:16px;flex-wrap:wrap">{"".join(items)}</p>'


def _values_table(rows: list[dict], names: list[str]) -> str:
    head = "".join(f'<th style="{_CELL}">{_text(n)}</th>' for n in ["step", "probe", *names])
    lines = [(f'<div style="overflow-x:auto"><table style="border-collapse:collapse" id="values"><thead><tr>{head}'
              "</tr></thead><tbody>")]
    for row in rows:
        cells = [f'<td style="{_CELL}">{row["step"]}</td>', f'<td style="{_CELL}">{_text(row["probe"])}</td>']
        for name in names:
            value = row.get(name)
            shown, attribute = (f"{value:.4f}", f' data-value="{_full(value)}"') if _defined(value) else ("–", "")
            cells.append(f'<td style="{_CELL}" data-step="{row["step"]}" data-probe="{_text(row["probe"])}" '
                         f'data-name="{_text(name)}"{attribute}>{shown}</td>')
        lines.append(f"<tr>{''.join(cells)}</tr>")
    lines.append("</tbody></table></div>")
    return "".join(lines)


def _checkpoint_list(reports: Sequence[MonitorReport], checkpoints: Mapping[int, str]) -> str:
    items = "".join(f"<li>step {r.step}: <code>{_text(checkpoints.get(r.step, ''))}</code> "
                    f"({len(r.results)} probes{', skipped: ' + _text(', '.join(r.skipped)) if r.skipped else ''})</li>"
                    for r in reports)
    reference = f" The first, step {reports[0].step}, is the drift reference." if reports else ""
    return f"<p>{len(reports)} checkpoints, oldest first.{reference}</p><ul>{items}</ul>"


# ---- maps ----------------------------------------------------------------------------------------------------------
def _probe_maps(probe: str, reports: Sequence[MonitorReport], checkpoints: Mapping[int, str]) -> str:
    passes: list[tuple[MonitorReport, ProbeResult]] = [
        (report, result) for report in reports for result in report.results if result.probe.name == probe]
    records = [map_record(result, report) for report, result in passes]
    scores = [v for record in records for row in record["scores"] for v in row if v is not None]
    lo, hi = score_range(scores, None, None)  # one scale for every checkpoint of the probe
    parts = [f'<section data-probe="{_text(probe)}"><h3>{_text(probe)}</h3>']
    if passes:
        parts.append(f"<p>Prompt: <code>{_text(passes[0][1].probe.display_prompt)}</code></p>")
    for (report, result), record in zip(passes, records):
        name = checkpoints.get(report.step, "")
        parts.append(f'<div data-map="{report.step}"><h4>step {report.step} <code>{_text(name)}</code></h4>'
                     f"{sequence_html(result.aggregated, lo, hi)}</div>")
    for before, after in pairwise(records):
        parts.append(_difference(before, after))
    parts.append("</section>")
    return "".join(parts)


def _difference(a: dict, b: dict) -> str:
    """B minus A as a table in blue (lost) - white - red (gained), with the tokens that moved most."""
    comparison = compare_maps(a, b)
    title = f"<h4>Difference: step {b['step']} &minus; step {a['step']}</h4>"
    if comparison["mismatch"]:
        return f'<div data-difference="{a["step"]}-{b["step"]}">{title}<p style="color:#a00">' \
               f'{_text(comparison["mismatch"])}</p></div>'
    limit = comparison["limit"] or 1e-12
    head = "".join(f'<th style="{_CELL};background:#f4f4f4">{_text(c)}</th>' for c in a["columns"])
    lines = [(f'<table style="border-collapse:collapse;margin:8px 0"><thead><tr><th style="{_CELL}"></th>{head}'
              "</tr></thead><tbody>")]
    for i, (label, row) in enumerate(zip(a["rows"], comparison["difference"])):
        cells = []
        for j, value in enumerate(row):
            if value is None:
                cells.append(f'<td style="{_CELL}"></td>')
                continue
            background = rgb(value, -limit, limit)
            cells.append(f'<td style="{_CELL};background:rgb{background};color:{text_color(background)}" '
                         f'data-row="{i}" data-column="{j}" data-value="{_full(value)}">{value:+.3f}</td>')
        lines.append(f'<tr><th style="{_CELL};text-align:right;background:#f4f4f4">{_text(label)}</th>'
                     f'{"".join(cells)}</tr>')
    lines.append("</tbody></table>")
    scale = (f'<div style="display:flex;align-items:center;gap:8px;font-size:12px">&minus;{comparison["limit"]:.3f}'
             f'<span style="display:inline-block;width:200px;height:12px;border:1px solid #ccc;'
             f'background:linear-gradient(to right, rgb(0,0,255), rgb(255,255,255), rgb(255,0,0))"></span>'
             f'+{comparison["limit"]:.3f} (blue: less attribution at step {b["step"]}, red: more)</div>')
    moved = "".join(_moved(title_, comparison[key]) for key, title_ in (("gained", "Gained most"),
                                                                       ("lost", "Lost most")))
    return (f'<div data-difference="{a["step"]}-{b["step"]}">{title}{"".join(lines)}{scale}'
            f'<div style="display:flex;gap:32px">{moved}</div></div>')


def _moved(title: str, tokens: list[dict]) -> str:
    items = "".join(f'<li data-row="{t["row"]}" data-value="{_full(t["change"])}"><code>{_text(t["token"])}</code> '
                    f'{t["change"]:+.3f} ({t["a"]:.3f} &rarr; {t["b"]:.3f})</li>' for t in tokens) or "<li>none</li>"
    return f'<div><h5 style="margin:4px 0">{title} (summed over the attributed tokens)</h5><ol>{items}</ol></div>'


def _defined(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _full(value: float) -> str:
    """A value in full (the digits ``drift.csv`` holds)."""
    return repr(float(value))


def _text(value) -> str:
    return html.escape(str(value), quote=True)
