"""A red-white-blue colour scale shared by the console, HTML and figure views."""

import math


def score_range(values: list[float], min_val: float | None, max_val: float | None) -> tuple[float, float]:
    finite = [v for v in values if not math.isnan(v)]
    if min_val is None:
        min_val = min(finite, default=0.0)
        min_val = min(min_val, 0.0)
    if max_val is None:
        max_val = max(finite, default=1.0)
    if max_val <= min_val:
        max_val = min_val + 1e-12
    return min_val, max_val


def rgb(value: float, min_val: float, max_val: float) -> tuple[int, int, int]:
    """Negative scores in blue, positive in red, zero white (for all-positive ranges: white to red)."""
    if math.isnan(value):
        return (255, 255, 255)
    if min_val < 0 < max_val:
        x = value / max_val if value >= 0 else -(value / min_val)  # negative values map to [-1, 0)
        x = max(-1.0, min(1.0, x))
    else:
        x = (value - min_val) / (max_val - min_val)
        x = max(0.0, min(1.0, x))
    fade = round(255 * (1 - abs(x)))
    return (255, fade, fade) if x >= 0 else (fade, fade, 255)


def text_color(background: tuple[int, int, int]) -> str:
    r, g, b = background
    return "#000000" if (0.299 * r + 0.587 * g + 0.114 * b) > 140 else "#ffffff"
