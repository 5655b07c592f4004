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
