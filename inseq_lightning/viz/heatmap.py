"""Heatmap pixels for experiment trackers: the grid coloured as an array, labelled in a bitmap font.

Trackers take ``[H, W, 3]`` uint8 pixels (TensorBoard ``add_image``, ``wandb.Image``), so nothing
here builds a figure: cells are painted with numpy in the HTML view's colours (:func:`.colors.rgb`),
at a cost proportional to the pixels, and labels are drawn with Pillow's built-in bitmap font (a
few microseconds each). A map takes milliseconds where a matplotlib figure (:mod:`.figure`, kept
for notebooks) takes ~0.2 s, which a monitor drawing every probe on every pass cannot afford.

Layout, top to bottom: the title; the generated tokens (columns), written upwards; the grid with
the source and prefix tokens (rows) on its left, evidence rows marked by a green bar, and the colour
scale on its right; one row per step score (each on its own scale, as in the HTML view); a legend.
NaN cells (tokens not generated yet) are left blank.
"""

import functools
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..data.outputs import FeatureAttributionSequenceOutput
from .colors import rgb, score_range
from .layout import build_grid
from .tokens import display_token

CELL_WIDTH, CELL_HEIGHT = 16, 12  # pixels, grid lines included
MAX_LABEL_CHARS = 18
BACKGROUND = (255, 255, 255)  # white, as the HTML page; filled as one byte value (a colour triple is 100x slower)
_INK, _MUTED, _LINE, _SEPARATOR, _EVIDENCE = (0, 0, 0), (90, 90, 90), (221, 221, 221), (120, 120, 120), (0, 150, 60)
_PAD, _GAP, _BAR_WIDTH, _MARK_WIDTH, _SCALE_STEPS = 6, 4, 12, 4, 120


@dataclass
class Heatmap:
    """A drawn heatmap: ``pixels`` ``[H, W, 3]`` uint8 and where the grid lies in them.

    Attributes:
        pixels: the picture, ``[H, W, 3]`` uint8.
        grid_origin: ``(y, x)`` of the grid's top-left corner (its outer line).
        shape: ``(rows, columns)`` of the grid.
    """

    pixels: np.ndarray
    grid_origin: tuple[int, int]
    shape: tuple[int, int]

    def cell_center(self, row: int, column: int) -> tuple[int, int]:
        """``(y, x)`` of the middle of a cell, for reading its colour back."""
        y, x = self.grid_origin
        return y + row * CELL_HEIGHT + CELL_HEIGHT // 2, x + column * CELL_WIDTH + CELL_WIDTH // 2


def attribution_heatmap(seq: FeatureAttributionSequenceOutput, min_val: float | None = None,
                        max_val: float | None = None, title: str | None = None,
                        evidence_rows: tuple[int, ...] = ()) -> Heatmap:
    """Draw one sequence's attribution grid (rows: source/prefix tokens, columns: generated tokens).

    Args:
        seq: an attribution sequence (aggregated here if it is not yet).
        min_val, max_val: colour-scale bounds (default: from the data, as the HTML view).
        title: a line above the map (the monitor writes ``probe · method · step N``).
        evidence_rows: grid rows to mark as evidence.
    """
    grid = build_grid(seq)
    n_rows, n_cols = len(grid.row_labels), len(grid.column_labels)
    scores = np.array(grid.scores, dtype=float).reshape(n_rows, n_cols)
    lo, hi = score_range(scores.ravel().tolist(), min_val, max_val)
    font = _font()
    row_labels = [_label(t) for t in grid.row_labels]
    col_labels = [_label(t) for t in grid.column_labels]
    score_names = [_label(name) for name in grid.step_scores]
    title = _drawable(title) if title else ""
    char_height = _text_height(font)
    label_width = max((_text_width(font, t) for t in row_labels + score_names), default=0)
    header_height = max((_text_width(font, t) for t in col_labels), default=0) + _GAP
    scale_labels = [_number(v) for v in (hi, lo, 0.0)]

    grid_x = _PAD + label_width + _GAP + _MARK_WIDTH + 2
    title_height = char_height + _GAP if title else 0
    grid_y = _PAD + title_height + header_height
    cells = _cells(scores, lo, hi)
    scale_x = grid_x + cells.shape[1] + 2 * _GAP
    scale_height = min(max(cells.shape[0], 4 * char_height), 200)
    scores_y = grid_y + max(cells.shape[0], scale_height) + _GAP
    score_cells = [_cells(np.array([values], dtype=float), *score_range(values, None, None))
                   for values in grid.step_scores.values()]
    legend_y = scores_y + sum(c.shape[0] - 1 for c in score_cells) + _GAP
    legend = "green bar: evidence tokens" if evidence_rows else ""
    width = max(scale_x + _BAR_WIDTH + _GAP + max(_text_width(font, t) for t in scale_labels),
                2 * _PAD + _text_width(font, title), 2 * _PAD + 2 * _MARK_WIDTH + _text_width(font, legend))
    height = legend_y + (char_height + _GAP if legend else 0) + _PAD

    canvas = np.full((height, width, 3), BACKGROUND[0], dtype=np.uint8)
    _paste(canvas, cells, grid_y, grid_x)
    if "source" in grid.row_groups and "target" in grid.row_groups:  # where the target prefix begins
        canvas[grid_y + grid.row_groups.index("target") * CELL_HEIGHT, grid_x : grid_x + cells.shape[1]] = _SEPARATOR
    for row in evidence_rows:
        if 0 <= row < n_rows:
            y = grid_y + row * CELL_HEIGHT
            canvas[y + 1 : y + CELL_HEIGHT, grid_x - _MARK_WIDTH - 2 : grid_x - 2] = _EVIDENCE
    for i, block in enumerate(score_cells):
        _paste(canvas, block, scores_y + i * CELL_HEIGHT, grid_x)
    canvas[grid_y : grid_y + scale_height, scale_x : scale_x + _BAR_WIDTH] = _scale(lo, hi, scale_height)[:, None]

    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    if title:
        draw.text((_PAD, _PAD), title, fill=_INK, font=font)
    text_dy = (CELL_HEIGHT - char_height) // 2 + 1
    for i, text in enumerate(row_labels):
        draw.text((grid_x - _MARK_WIDTH - _GAP - _text_width(font, text), grid_y + i * CELL_HEIGHT + text_dy), text,
                  fill=_INK, font=font)
    for i, text in enumerate(score_names):
        draw.text((grid_x - _MARK_WIDTH - _GAP - _text_width(font, text), scores_y + i * CELL_HEIGHT + text_dy), text,
                  fill=_MUTED, font=font)
    if col_labels:
        image.paste(_column_header(col_labels, font, header_height), (grid_x, grid_y - header_height))
    bar_text_x = scale_x + _BAR_WIDTH + _GAP
    draw.text((bar_text_x, grid_y), scale_labels[0], fill=_MUTED, font=font)
    draw.text((bar_text_x, grid_y + scale_height - char_height), scale_labels[1], fill=_MUTED, font=font)
    if lo < 0 < hi:
        zero_y = grid_y + round((scale_height - 1) * hi / (hi - lo))
        if char_height < zero_y - grid_y < scale_height - 2 * char_height:
            draw.text((bar_text_x, zero_y - char_height // 2), scale_labels[2], fill=_MUTED, font=font)
    if legend:
        canvas_y = legend_y + text_dy
        draw.rectangle((_PAD, canvas_y, _PAD + _MARK_WIDTH - 1, canvas_y + char_height - 1), fill=_EVIDENCE)
        draw.text((_PAD + 2 * _MARK_WIDTH, canvas_y), legend, fill=_MUTED, font=font)
    return Heatmap(np.asarray(image).copy(), (grid_y, grid_x), (n_rows, n_cols))


def _cells(scores: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """``[rows * CELL_HEIGHT + 1, columns * CELL_WIDTH + 1, 3]``: each scored cell framed by grey lines;
    NaN cells, and lines that touch no scored cell, left blank."""
    n_rows, n_cols = scores.shape
    undefined = np.isnan(scores)
    colours = np.array([rgb(v, lo, hi) for v in scores.ravel().tolist()], dtype=np.uint8).reshape(n_rows, n_cols, 3)
    colours[undefined] = BACKGROUND
    block = np.full((n_rows * CELL_HEIGHT + 1, n_cols * CELL_WIDTH + 1, 3), BACKGROUND[0], dtype=np.uint8)
    block[:-1, :-1] = colours.repeat(CELL_HEIGHT, 0).repeat(CELL_WIDTH, 1)
    # A line pixel is drawn when a scored cell touches it: each cell's area shifted one pixel down
    # and right covers its closing lines.
    scored = (~undefined).repeat(CELL_HEIGHT, 0).repeat(CELL_WIDTH, 1)
    touched = np.zeros(block.shape[:2], dtype=bool)
    for dy in (0, 1):
        for dx in (0, 1):
            touched[dy : dy + scored.shape[0], dx : dx + scored.shape[1]] |= scored
    lines = (np.arange(block.shape[0]) % CELL_HEIGHT == 0)[:, None] | (np.arange(block.shape[1]) % CELL_WIDTH == 0)
    block[touched & lines] = _LINE
    return block


def _scale(lo: float, hi: float, height: int) -> np.ndarray:
    """``[height, 3]`` colours from ``hi`` (top) to ``lo`` (bottom)."""
    steps = np.linspace(hi, lo, _SCALE_STEPS).tolist()
    colours = np.array([rgb(v, lo, hi) for v in steps], dtype=np.uint8)
    return colours[np.linspace(0, _SCALE_STEPS - 1, height).round().astype(int)]


def _column_header(labels: list[str], font, height: int) -> Image.Image:
    """The column labels written upwards from the grid: drawn as rows of a strip, turned once."""
    strip = Image.new("RGB", (height, len(labels) * CELL_WIDTH + 1), BACKGROUND)
    draw = ImageDraw.Draw(strip)
    dy = (CELL_WIDTH - _text_height(font)) // 2 + 1
    for j, text in enumerate(labels):
        draw.text((_GAP // 2, j * CELL_WIDTH + dy), text, fill=_INK, font=font)
    return strip.transpose(Image.Transpose.ROTATE_90)


def _paste(canvas: np.ndarray, block: np.ndarray, y: int, x: int) -> None:
    canvas[y : y + block.shape[0], x : x + block.shape[1]] = block


@functools.cache
def _font():
    # Pillow >= 10.1 returns a FreeType font from load_default(); the bitmap one is the fast one.
    loader = getattr(ImageFont, "load_default_imagefont", ImageFont.load_default)
    return loader()


def _label(token: str) -> str:
    """A token as a short label the bitmap font can draw (long ones cut)."""
    text = _drawable(display_token(token))
    return text[: MAX_LABEL_CHARS - 2] + ".." if len(text) > MAX_LABEL_CHARS else text


def _drawable(text: str) -> str:
    """The bitmap font draws Latin-1 only: other characters become ``?``."""
    return text.encode("latin-1", "replace").decode("latin-1")


def _number(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value:.3g}"


def _text_width(font, text: str) -> int:
    return font.getbbox(text)[2] if text else 0


def _text_height(font) -> int:
    return font.getbbox("Ag")[3]
