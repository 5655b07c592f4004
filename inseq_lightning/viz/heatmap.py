"""Heatmap pixels for experiment trackers: the grid coloured as an array, labelled in a bitmap font.

Trackers take ``[H, W, 3]`` uint8 pixels (TensorBoard ``add_image``, ``wandb.Image``), so nothing
here builds a figure: cells are painted with numpy in the HTML view's colours (:func:`.colors.rgb`)
and labels stamped from Pillow's built-in bitmap font, each label drawn once per process and
cached (tokens recur in every pass). A map costs about its pixels, a millisecond or two where a
matplotlib figure (:mod:`.figure`, kept for notebooks) takes ~0.2 s, more than a monitor drawing
every probe on every pass can afford.

Layout, top to bottom: the title; the generated tokens (columns), written upwards; the grid with
the source and prefix tokens (rows) on its left, evidence rows marked by a green bar; one row per
step score, each on its own scale as in the HTML view; the colour scale, lowest to highest score;
what the green bar means. NaN cells (tokens not generated yet) are left blank; a token that continues
the character before it is labelled "+" in grey (:func:`.tokens.readable_labels`). Nothing is wider
than it must be: a map's cost is its pixels, mostly spent by the tracker encoding them.
"""

import functools
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..data.outputs import FeatureAttributionSequenceOutput
from .colors import rgb, score_range
from .layout import build_grid

CELL_WIDTH, CELL_HEIGHT = 16, 11  # pixels between grid lines; a row fits one line of the bitmap font
MAX_LABEL_CHARS = 18
BACKGROUND = (255, 255, 255)  # the HTML page's; rgb() gives it to NaN too
_INK, _MUTED, _LINE, _SEPARATOR, _EVIDENCE = (0, 0, 0), (90, 90, 90), (221, 221, 221), (120, 120, 120), (0, 150, 60)
_PAD, _GAP, _MARK_WIDTH, _SCALE_LENGTH = 6, 4, 4, 96


@dataclass
class Heatmap:
    """A drawn heatmap and where its grid lies.

    Attributes:
        pixels: ``[H, W, 3]`` uint8.
        grid_origin: ``(y, x)`` of the grid's top-left corner (its outer line).
        shape: ``(rows, columns)`` of the grid.
    """

    pixels: np.ndarray
    grid_origin: tuple[int, int]
    shape: tuple[int, int]

    def cell_center(self, row: int, column: int) -> tuple[int, int]:
        """``(y, x)`` of the middle of a cell, to read its colour back."""
        y, x = self.grid_origin
        return y + row * CELL_HEIGHT + CELL_HEIGHT // 2, x + column * CELL_WIDTH + CELL_WIDTH // 2


def attribution_heatmap(seq: FeatureAttributionSequenceOutput, min_val: float | None = None,
                        max_val: float | None = None, title: str | None = None,
                        evidence_rows: tuple[int, ...] = ()) -> Heatmap:
    """Draw one sequence's attribution grid (rows: source/prefix tokens, columns: generated tokens).

    Args:
        seq: an attribution sequence (aggregated here if it is not yet).
        min_val, max_val: colour-scale bounds (default: from the data, as in the HTML view).
        title: a line above the map (the monitor writes ``probe · method · step N``).
        evidence_rows: grid rows to mark as evidence.
    """
    grid = build_grid(seq)
    n_rows, n_cols = len(grid.row_labels), len(grid.column_labels)
    scores = np.array(grid.scores, dtype=float).reshape(n_rows, n_cols)
    lo, hi = score_range(scores.ravel().tolist(), min_val, max_val)
    cells = _cells(scores, lo, hi)
    score_rows = [_cells(np.array([v], dtype=float), *score_range(v, None, None)) for v in grid.step_scores.values()]
    rows = [_text(_label(t)) for t in grid.row_labels]
    columns = [np.rot90(_text(_label(t))) for t in grid.column_labels]  # read upwards
    row_ink = [_MUTED if faint else _INK for faint in grid.row_continues]
    column_ink = [_MUTED if faint else _INK for faint in grid.column_continues]
    names = [_text(_label(name)) for name in grid.step_scores]
    heading, low, high = _text(_drawable(title or "")), _text(f"{lo:.3g}"), _text(f"{hi:.3g}")
    legend = _text("evidence tokens" if evidence_rows else "")

    line = _text_height()
    grid_y = _PAD + (line + _GAP if title else 0) + max((c.shape[0] for c in columns), default=0) + _GAP
    grid_x = _PAD + max((t.shape[1] for t in rows + names), default=0) + _GAP + _MARK_WIDTH + 2
    scores_y = grid_y + cells.shape[0] + _GAP
    scale_y = scores_y + sum(r.shape[0] for r in score_rows) + _GAP
    legend_y = scale_y + line + _GAP
    scale_x = _PAD + low.shape[1] + _GAP
    width = max(grid_x + cells.shape[1], _PAD + heading.shape[1], scale_x + _SCALE_LENGTH + _GAP + high.shape[1],
                _PAD + 2 * _MARK_WIDTH + legend.shape[1]) + _PAD
    height = (legend_y + line if evidence_rows else scale_y + line) + _PAD
    canvas = np.full((height, width, 3), BACKGROUND[0], np.uint8)

    _paste(canvas, cells, grid_y, grid_x)
    if "source" in grid.row_groups and "target" in grid.row_groups:  # where the target prefix begins
        canvas[grid_y + grid.row_groups.index("target") * CELL_HEIGHT, grid_x : grid_x + cells.shape[1]] = _SEPARATOR
    for row in evidence_rows:
        if 0 <= row < n_rows:
            top = grid_y + row * CELL_HEIGHT + 1
            canvas[top : top + CELL_HEIGHT - 1, grid_x - _MARK_WIDTH - 2 : grid_x - 2] = _EVIDENCE
    for i, block in enumerate(score_rows):
        _paste(canvas, block, scores_y + i * CELL_HEIGHT, grid_x)
    canvas[scale_y + 1 : scale_y + line - 1, scale_x : scale_x + _SCALE_LENGTH] = _scale(lo, hi, _SCALE_LENGTH)

    label_right, text_dy = grid_x - _MARK_WIDTH - _GAP, (CELL_HEIGHT - line + 1) // 2
    _write(canvas, heading, _PAD, _PAD, _INK)
    for i, mask in enumerate(rows):
        _write(canvas, mask, grid_y + i * CELL_HEIGHT + text_dy, label_right - mask.shape[1], row_ink[i])
    for j, mask in enumerate(columns):
        _write(canvas, mask, grid_y - _GAP - mask.shape[0], grid_x + j * CELL_WIDTH + (CELL_WIDTH - line) // 2 + 1,
               column_ink[j])
    for i, mask in enumerate(names):
        _write(canvas, mask, scores_y + i * CELL_HEIGHT + text_dy, label_right - mask.shape[1], _MUTED)
    _write(canvas, low, scale_y, _PAD, _MUTED)
    _write(canvas, high, scale_y, scale_x + _SCALE_LENGTH + _GAP, _MUTED)
    if evidence_rows:
        canvas[legend_y + 1 : legend_y + line - 1, _PAD : _PAD + _MARK_WIDTH] = _EVIDENCE
        _write(canvas, legend, legend_y, _PAD + 2 * _MARK_WIDTH, _MUTED)
    return Heatmap(canvas, (grid_y, grid_x), (n_rows, n_cols))


def _cells(scores: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """``[rows * CELL_HEIGHT + 1, columns * CELL_WIDTH + 1, 3]``: each scored cell framed by grey lines;
    NaN cells, and the lines that touch no scored cell, blank."""
    n_rows, n_cols = scores.shape
    defined = ~np.isnan(scores)
    # A small plan first: cells at odd indices, the lines and corners around them at even ones.
    plan = np.full((2 * n_rows + 1, 2 * n_cols + 1, 3), BACKGROUND[0], dtype=np.uint8)
    touched = np.zeros(plan.shape[:2], dtype=bool)
    for dy in range(3):
        for dx in range(3):
            touched[dy : dy + 2 * n_rows - 1 : 2, dx : dx + 2 * n_cols - 1 : 2] |= defined
    plan[touched] = _LINE
    colours = [rgb(v, lo, hi) for v in scores.ravel().tolist()]
    plan[1::2, 1::2] = np.array(colours, dtype=np.uint8).reshape(n_rows, n_cols, 3)
    plan[1::2, 1::2][~defined] = BACKGROUND
    # Then to pixels: a line is one pixel wide, a cell ``size - 1``.
    return plan.repeat(_widths(n_rows, CELL_HEIGHT), 0).repeat(_widths(n_cols, CELL_WIDTH), 1)


def _widths(n: int, size: int) -> np.ndarray:
    widths = np.ones(2 * n + 1, dtype=np.intp)
    widths[1::2] = size - 1
    return widths


def _scale(lo: float, hi: float, length: int) -> np.ndarray:
    """``[length, 3]`` colours from ``lo`` to ``hi``."""
    return np.array([rgb(v, lo, hi) for v in np.linspace(lo, hi, length).tolist()], dtype=np.uint8)


def _paste(canvas: np.ndarray, block: np.ndarray, y: int, x: int) -> None:
    canvas[y : y + block.shape[0], x : x + block.shape[1]] = block


def _write(canvas: np.ndarray, mask: np.ndarray, y: int, x: int, colour: tuple[int, int, int]) -> None:
    canvas[y : y + mask.shape[0], x : x + mask.shape[1]][mask] = colour


@functools.lru_cache(maxsize=8192)
def _text(text: str) -> np.ndarray:
    """``[line height, width]`` bool, where the bitmap font inks ``text``."""
    width = _font().getbbox(text)[2] if text else 0
    image = Image.new("L", (max(width, 1), _text_height()), 0)
    ImageDraw.Draw(image).text((0, 0), text, fill=255, font=_font())
    mask = np.asarray(image)[:, :width] > 127
    mask.flags.writeable = False  # shared by every map that writes this label
    return mask


@functools.cache
def _font() -> ImageFont.ImageFont:
    # Pillow >= 10.1 gives a FreeType font from load_default(); the bitmap one is smaller and faster.
    return getattr(ImageFont, "load_default_imagefont", ImageFont.load_default)()


@functools.cache
def _text_height() -> int:
    return _font().getbbox("Ag")[3]


def _label(label: str) -> str:
    """A label as one the bitmap font can draw (long ones cut)."""
    text = _drawable(label)
    return text[: MAX_LABEL_CHARS - 2] + ".." if len(text) > MAX_LABEL_CHARS else text


def _drawable(text: str) -> str:
    """The bitmap font draws Latin-1 only: other characters become ``?``."""
    return text.encode("latin-1", "replace").decode("latin-1")
