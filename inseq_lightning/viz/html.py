"""Self-contained HTML heatmaps: inline styles only, no scripts, every token escaped."""

import html
import math

from ..data.outputs import FeatureAttributionSequenceOutput
from .colors import rgb, score_range, text_color
from .layout import build_grid

_CELL = "padding:2px 6px;border:1px solid #ddd;text-align:center;font-family:monospace;font-size:12px"
_CONTINUATION = ";color:#aaa;font-weight:normal"  # a token that continues the character before it


def _token(text: str) -> str:
    return html.escape(text, quote=True) or "&nbsp;"


def sequence_html(seq: FeatureAttributionSequenceOutput, min_val: float | None = None, max_val: float | None = None) -> str:
    grid = build_grid(seq)
    flat = [v for row in grid.scores for v in row]
    lo, hi = score_range(flat, min_val, max_val)
    head = "".join(f'<th style="{_CELL};background:#f4f4f4{_CONTINUATION if continues else ""}">{_token(c)}</th>'
                   for c, continues in zip(grid.column_labels, grid.column_continues))
    lines = [f'<table style="border-collapse:collapse;margin:8px 0"><thead><tr><th style="{_CELL}"></th>{head}</tr></thead><tbody>']
    previous_group = None
    for label, group, continues, row in zip(grid.row_labels, grid.row_groups, grid.row_continues, grid.scores):
        if group != previous_group:
            title = "Source" if group == "source" else "Target prefix"
            lines.append(f'<tr><td colspan="{len(grid.column_labels) + 1}" style="{_CELL};text-align:left;'
                         f'font-weight:bold;background:#fafafa">{title}</td></tr>')
            previous_group = group
        cells = []
        for v in row:
            bg = rgb(v, lo, hi)
            text = "" if math.isnan(v) else f"{v:.3f}"
            cells.append(f'<td style="{_CELL};background:rgb{bg};color:{text_color(bg)}">{text}</td>')
        faint = _CONTINUATION if continues else ""
        lines.append(f'<tr><th style="{_CELL};text-align:right;background:#f4f4f4{faint}">{_token(label)}</th>'
                     f'{"".join(cells)}</tr>')
    for name, values in grid.step_scores.items():
        s_lo, s_hi = score_range(values, None, None)
        cells = []
        for v in values:
            bg = rgb(v, s_lo, s_hi)
            cells.append(f'<td style="{_CELL};background:rgb{bg};color:{text_color(bg)}">{v:.3f}</td>')
        lines.append(f'<tr><th style="{_CELL};text-align:right;font-style:italic">{html.escape(name)}</th>{"".join(cells)}</tr>')
    lines.append("</tbody></table>")
    return "".join(lines)


def attributions_html(sequences: list[FeatureAttributionSequenceOutput], min_val=None, max_val=None,
                      title: str | None = None) -> str:
    """A complete HTML document with one heatmap table per sequence."""
    body = []
    for i, seq in enumerate(sequences):
        body.append(f'<h3 style="font-family:sans-serif;font-size:14px">Sequence {i}</h3>')
        body.append(sequence_html(seq, min_val, max_val))
    heading = f'<h2 style="font-family:sans-serif">{html.escape(title)}</h2>' if title else ""
    return ('<!DOCTYPE html><html><head><meta charset="utf-8"><title>inseq-lightning attributions</title></head>'
            f'<body style="background:#ffffff">{heading}{"".join(body)}</body></html>')
