"""Rich console tables: one coloured grid per sequence."""

import math

from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..data.outputs import FeatureAttributionSequenceOutput
from .colors import rgb, score_range, text_color
from .layout import build_grid

_CONTINUATION_STYLE = "dim"


def sequence_table(seq: FeatureAttributionSequenceOutput, min_val=None, max_val=None, title: str | None = None) -> Table:
    grid = build_grid(seq)
    lo, hi = score_range([v for row in grid.scores for v in row], min_val, max_val)
    table = Table(title=title, show_lines=False)
    table.add_column("", justify="right", style="bold")
    for column, continues in zip(grid.column_labels, grid.column_continues):
        table.add_column(Text(column, style=_CONTINUATION_STYLE if continues else ""), justify="center")
    for label, group, continues, row in zip(grid.row_labels, grid.row_groups, grid.row_continues, grid.scores):
        cells = []
        for v in row:
            r, g, b = rgb(v, lo, hi)
            style = f"{text_color((r, g, b))} on rgb({r},{g},{b})"
            cells.append(Text("" if math.isnan(v) else f"{v:.2f}", style=style))
        style = "cyan" if group == "source" else "magenta"
        table.add_row(Text(label, style=f"{style} {_CONTINUATION_STYLE}" if continues else style), *cells)
    for name, values in grid.step_scores.items():
        table.add_row(Text(name, style="italic"), *[Text(f"{v:.2f}") for v in values])
    return table


def default_console() -> Console:
    """Off a terminal rich assumes 80 columns; a wider page keeps the scores readable in logs."""
    probe = Console()
    return probe if probe.is_terminal else Console(width=200)


def print_attributions(sequences: list[FeatureAttributionSequenceOutput], min_val=None, max_val=None,
                       console: Console | None = None) -> None:
    console = console or default_console()
    for i, seq in enumerate(sequences):
        console.print(sequence_table(seq, min_val, max_val, title=f"Sequence {i}"))


def panel_table(panel, min_val=None, max_val=None) -> Table:
    """One granular panel (:class:`.granular.Panel`) as a coloured table."""
    lo, hi = score_range(panel.scores.reshape(-1).tolist(), min_val, max_val)
    table = Table(title=panel.title, show_lines=False)
    table.add_column("", justify="right", style="bold")
    for column in panel.column_labels:
        table.add_column(Text(column), justify="center")
    for label, row in zip(panel.row_labels, panel.scores.tolist()):
        cells = []
        for v in row:
            r, g, b = rgb(v, lo, hi)
            cells.append(Text("" if math.isnan(v) else f"{v:.2f}", style=f"{text_color((r, g, b))} on rgb({r},{g},{b})"))
        table.add_row(Text(label), *cells)
    return table


def print_panels(panels_per_sequence: list[list], min_val=None, max_val=None, console: Console | None = None) -> None:
    console = console or default_console()
    for i, panels in enumerate(panels_per_sequence):
        console.print(Text(f"Sequence {i}", style="bold"))
        for panel in panels:
            console.print(panel_table(panel, min_val, max_val))


def print_tokens(sequences: list[FeatureAttributionSequenceOutput], min_val=None, max_val=None,
                 console: Console | None = None) -> None:
    """The token view in a terminal: one line per generated token, its source and prefix tokens coloured."""
    from .tokens import readable_labels

    console = console or default_console()
    values = [v for s in sequences for t in (s.source_attributions, s.target_attributions) if t is not None
              for v in t.reshape(-1).tolist()]
    lo, hi = score_range(values, min_val, max_val)
    for i, seq in enumerate(sequences):
        console.print(Text(f"Sequence {i}", style="bold"))
        source = readable_labels([t.token for t in seq.source])
        target = readable_labels([t.token for t in seq.target])
        for k, position in enumerate(range(seq.attr_pos_start, seq.attr_pos_end)):
            line = Text(f"{target[position]!r} <- ", style="bold magenta")
            for tokens, scores in ((source, seq.source_attributions), (target[:position], seq.target_attributions)):
                if scores is None or scores.ndim != 2:
                    continue
                for token, v in zip(tokens, scores[: len(tokens), k].tolist()):
                    r, g, b = rgb(v, lo, hi)
                    line.append(token, style=f"{text_color((r, g, b))} on rgb({r},{g},{b})")
                line.append("  ")
            console.print(line)
