"""Matplotlib heatmaps for people: ``fig.savefig``, notebooks, ``show(...)``.

Trackers get :func:`.heatmap.attribution_heatmap`'s pixels instead: the same grid drawn in
milliseconds, where a figure takes ~0.2 s, too slow for every probe on every monitoring pass.

Figures are plain ``matplotlib.figure.Figure`` objects on an Agg canvas, never pyplot's: importing
this package leaves the process's backend alone (a notebook keeps its inline plots), nothing is
registered in pyplot's global figure list (nothing to close, nothing leaks), and a callback
drawing in a training loop touches no shared pyplot state.
"""

import math

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..data.outputs import FeatureAttributionSequenceOutput
from .colors import score_range
from .layout import build_grid

# Cell values are written into small heatmaps only: each label is a matplotlib artist, and a
# 35 x 5 map spends most of its drawing time on them (trackers show the colours anyway).
ANNOTATE_MAX_CELLS = 100
_CONTINUATION_COLOR = "#aaaaaa"  # a token that continues the character before it


def attribution_figure(seq: FeatureAttributionSequenceOutput, min_val=None, max_val=None, title: str | None = None):
    """A heatmap figure (rows: source/prefix tokens, columns: generated tokens) on an Agg canvas;
    ``fig.savefig(path)`` writes it, :func:`figure_to_rgb` gives its pixels."""
    grid = build_grid(seq)
    data = np.array(grid.scores, dtype=float) if grid.scores else np.zeros((0, len(grid.column_labels)))
    lo, hi = score_range([v for v in data.ravel().tolist()], min_val, max_val)
    signed = lo < 0 < hi
    bound = max(abs(lo), abs(hi))
    width = max(4.0, 0.6 * len(grid.column_labels) + 2)
    height = max(3.0, 0.35 * len(grid.row_labels) + 1.5)
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)  # attaches itself as fig.canvas
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(data), cmap="bwr" if signed else "Reds", aspect="auto",
                      vmin=-bound if signed else lo, vmax=bound if signed else hi)
    ax.set_xticks(range(len(grid.column_labels)), grid.column_labels, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(grid.row_labels)), grid.row_labels, fontsize=8)
    for ticks, continues in ((ax.get_xticklabels(), grid.column_continues), (ax.get_yticklabels(), grid.row_continues)):
        for tick, faint in zip(ticks, continues):
            if faint:
                tick.set_color(_CONTINUATION_COLOR)
    for (r, c), v in np.ndenumerate(data):
        if not math.isnan(v) and data.shape[0] * data.shape[1] <= ANNOTATE_MAX_CELLS:
            ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=6)
    ax.set_xlabel("generated tokens")
    if title:
        ax.set_title(title, fontsize=10)
    # Margins from the label lengths (tight_layout measures every tick label and costs ~0.3 s);
    # set before the colorbar, which takes its room from the axes as they are then.
    row_chars = max((len(r) for r in grid.row_labels), default=1)
    col_chars = max((len(c) for c in grid.column_labels), default=1)
    fig.subplots_adjust(left=min(0.45, (0.3 + 0.07 * row_chars) / width),
                        bottom=min(0.45, (0.7 + 0.06 * col_chars) / height),
                        top=1 - 0.5 / height, right=1 - 0.8 / width)
    fig.colorbar(image, ax=ax, fraction=0.06, pad=0.04)
    return fig


def figure_to_rgb(fig) -> np.ndarray:
    """``[H, W, 3]`` uint8 pixels of a figure."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def panels_figure(panels: list, min_val=None, max_val=None, title: str | None = None):
    """Granular panels (:class:`.granular.Panel`) side by side in one figure, one colour scale."""
    values = [v for p in panels for v in p.scores.reshape(-1).tolist()]
    lo, hi = score_range(values, min_val, max_val)
    signed = lo < 0 < hi
    bound = max(abs(lo), abs(hi))
    n = max(len(panels), 1)
    width = max(4.0, 0.5 * max((len(p.column_labels) for p in panels), default=1) + 2)
    height = max(3.0, 0.3 * max((len(p.row_labels) for p in panels), default=1) + 1.5)
    fig = Figure(figsize=(width * min(n, 4), height * math.ceil(n / 4)))
    FigureCanvasAgg(fig)
    image = None
    for i, panel in enumerate(panels):
        ax = fig.add_subplot(math.ceil(n / 4), min(n, 4), i + 1)
        data = panel.scores.numpy().astype(float)
        image = ax.imshow(np.ma.masked_invalid(data), cmap="bwr" if signed else "Reds", aspect="auto",
                          vmin=-bound if signed else lo, vmax=bound if signed else hi)
        ax.set_xticks(range(len(panel.column_labels)), panel.column_labels, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(panel.row_labels)), panel.row_labels, fontsize=7)
        ax.set_title(panel.title, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    if image is not None:
        fig.colorbar(image, ax=fig.axes, fraction=0.03, pad=0.02)
    return fig
