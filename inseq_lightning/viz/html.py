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


def attributions_fragment(sequences: list[FeatureAttributionSequenceOutput], min_val=None, max_val=None) -> str:
    """The heatmap tables of ``sequences`` as an HTML fragment (what a notebook cell shows)."""
    body = []
    for i, seq in enumerate(sequences):
        body.append(f'<h3 style="font-family:sans-serif;font-size:14px">Sequence {i}</h3>')
        body.append(sequence_html(seq, min_val, max_val))
    return f'<div class="inseq-lightning" style="background:#ffffff;color:#000000">{"".join(body)}</div>'


def html_document(fragment: str, title: str | None = None) -> str:
    """A complete HTML page around ``fragment`` (inline styles, no scripts)."""
    heading = f'<h2 style="font-family:sans-serif">{html.escape(title)}</h2>' if title else ""
    return ('<!DOCTYPE html><html><head><meta charset="utf-8"><title>inseq-lightning attributions</title></head>'
            f'<body style="background:#ffffff">{heading}{fragment}</body></html>')


def attributions_html(sequences: list[FeatureAttributionSequenceOutput], min_val=None, max_val=None,
                      title: str | None = None) -> str:
    """A complete HTML document with one heatmap table per sequence."""
    return html_document(attributions_fragment(sequences, min_val, max_val), title)


def panel_html(panel, min_val=None, max_val=None) -> str:
    """One granular panel (:class:`.granular.Panel`) as a heatmap table under its title."""
    values = panel.scores.reshape(-1).tolist()
    lo, hi = score_range(values, min_val, max_val)
    head = "".join(f'<th style="{_CELL};background:#f4f4f4">{_token(c)}</th>' for c in panel.column_labels)
    title = (f'<div style="font-family:sans-serif;font-size:13px;font-weight:bold;margin-top:8px">'
             f'{html.escape(panel.title)}</div>')
    table = (f'<table style="border-collapse:collapse;margin:4px 0"><thead><tr><th style="{_CELL}"></th>{head}</tr>'
             '</thead><tbody>')
    lines = [title, table]
    for label, row in zip(panel.row_labels, panel.scores.tolist()):
        cells = []
        for v in row:
            bg = rgb(v, lo, hi)
            text = "" if math.isnan(v) else f"{v:.3f}"
            cells.append(f'<td style="{_CELL};background:rgb{bg};color:{text_color(bg)}">{text}</td>')
        lines.append(f'<tr><th style="{_CELL};text-align:right;background:#f4f4f4">{_token(label)}</th>'
                     f'{"".join(cells)}</tr>')
    lines.append("</tbody></table>")
    return "".join(lines)


def granular_fragment(panels_per_sequence: list[list], min_val=None, max_val=None) -> str:
    """The granular panels of each sequence as an HTML fragment."""
    body = []
    for i, panels in enumerate(panels_per_sequence):
        body.append(f'<h3 style="font-family:sans-serif;font-size:14px">Sequence {i}</h3>')
        body.extend(panel_html(p, min_val, max_val) for p in panels)
    return f'<div class="inseq-lightning" style="background:#ffffff;color:#000000">{"".join(body)}</div>'


def _wraps_after(token: str, index: int, wrap_after) -> bool:
    if wrap_after is None:
        return False
    if isinstance(wrap_after, int) and not isinstance(wrap_after, bool):
        return wrap_after > 0 and (index + 1) % wrap_after == 0
    if isinstance(wrap_after, str):
        return token == wrap_after or (len(wrap_after) > 1 and token in tuple(wrap_after))
    return token in wrap_after


def _token_spans(tokens: list[str], scores: list[float], lo: float, hi: float, wrap_after=None) -> str:
    parts = []
    for i, (token, value) in enumerate(zip(tokens, scores)):
        bg = rgb(value, lo, hi)
        tip = "" if math.isnan(value) else f' title="{value:.4f}"'
        parts.append(f'<span style="background:rgb{bg};color:{text_color(bg)};padding:0 1px"{tip}>'
                     f'{_token(token)}</span>')
        if _wraps_after(token, i, wrap_after):
            parts.append("<br>")
    return "".join(parts)


def tokens_fragment(sequences: list[FeatureAttributionSequenceOutput], min_val=None, max_val=None,
                    replace_char: dict[str, str] | None = None, wrap_after=None,
                    step_score_highlight: str | None = None) -> str:
    """inseq's token view without scripts: the generated text, each token a ``<details>`` element that unfolds
    into the source and prefix tokens coloured by their scores for that step."""
    from .tokens import readable_labels

    def clean(tokens: list[str]) -> list[str]:
        out = []
        for token in tokens:
            for old, new in (replace_char or {}).items():
                token = token.replace(old, new)
            out.append(token)
        return out

    values = [v for s in sequences for t in (s.source_attributions, s.target_attributions) if t is not None
              for v in t.reshape(-1).tolist()]
    lo, hi = score_range(values, min_val, max_val)
    body = []
    for seq in sequences:
        source = clean(readable_labels([t.token for t in seq.source]))
        target = clean(readable_labels([t.token for t in seq.target]))
        highlight = None
        if step_score_highlight is not None:
            highlight = seq.step_scores[step_score_highlight].tolist()
            h_lo, h_hi = score_range(highlight, None, None)
        title = f"Generated text with {step_score_highlight} highlights:" if highlight else "Generated text:"
        items = [f'<div style="font-weight:bold;margin:6px 0">{html.escape(title)}</div>']
        for k, position in enumerate(range(seq.attr_pos_start, seq.attr_pos_end)):
            token = target[position]
            if highlight is not None:
                bg = rgb(highlight[k], h_lo, h_hi)
                label = (f'<span style="background:rgb{bg};color:{text_color(bg)}" title="{highlight[k]:.4f}">'
                         f'{_token(token)}</span>')
            else:
                label = _token(token)
            inner = []
            for side, tokens, scores in (("Source", source, seq.source_attributions),
                                         ("Target", target, seq.target_attributions)):
                if scores is None or scores.ndim != 2:
                    continue
                shown = tokens[: position] if side == "Target" else tokens
                column = scores[: len(shown), k].tolist()
                inner.append(f'<div style="color:#888;font-style:italic">{side} attributions for '
                             f'"{_token(token)}":</div><div>{_token_spans(shown, column, lo, hi, wrap_after)}</div>')
            items.append(f'<details style="display:inline-block;vertical-align:top"><summary style="cursor:pointer">'
                         f'{label}</summary><div style="margin:4px 12px;padding:4px;border-left:2px solid #ddd">'
                         f'{"".join(inner)}</div></details>')
            if _wraps_after(token, k, wrap_after):
                items.append("<br>")
        body.append(f'<div style="font-family:monospace;font-size:13px;margin:8px 0">{"".join(items)}</div>')
    return f'<div class="inseq-lightning" style="background:#ffffff;color:#000000">{"".join(body)}</div>'
