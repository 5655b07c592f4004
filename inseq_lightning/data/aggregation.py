"""From raw scores to shown scores: reduce extra dimensions, normalize columns, merge token spans."""

from collections.abc import Callable, Sequence
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch.linalg import vector_norm


def _absmax(scores: torch.Tensor, dim: int) -> torch.Tensor:
    """The element of largest magnitude along ``dim``, sign kept."""
    index = torch.nan_to_num(scores).abs().argmax(dim, keepdim=True)
    return scores.gather(dim, index).squeeze(dim)


AGGREGATION_FUNCTIONS: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
    "mean": lambda x, dim: x.mean(dim),
    "max": lambda x, dim: x.max(dim).values,
    "min": lambda x, dim: x.min(dim).values,
    "sum": lambda x, dim: x.sum(dim),
    "prod": lambda x, dim: x.prod(dim),
    "absmax": _absmax,
    "vnorm": lambda x, dim: vector_norm(x, ord=2, dim=dim),
}

DEFAULT_AGGREGATORS = {
    "granular": ["vnorm"],
    "multidimensional": ["mean", "mean"],
    "coarse": [],
    "none": [],
}


def list_aggregation_functions() -> list[str]:
    return list(AGGREGATION_FUNCTIONS)


def get_aggregation_function(name: str | Callable) -> Callable[[torch.Tensor, int], torch.Tensor]:
    if callable(name):
        return name
    if name not in AGGREGATION_FUNCTIONS:
        raise ValueError(f"Unknown aggregation function {name!r}. Choose one of: {', '.join(AGGREGATION_FUNCTIONS)}.")
    return AGGREGATION_FUNCTIONS[name]


def _nan_safe(fn: Callable[[torch.Tensor], torch.Tensor], scores: torch.Tensor) -> torch.Tensor:
    nan = scores.isnan()
    out = fn(scores.masked_fill(nan, 0.0))
    return out.masked_fill(nan, float("nan"))


def normalize_columns(source: torch.Tensor | None, target: torch.Tensor | None):
    """Divide each step's column (source rows and target rows together) by its L1 norm
    (``max(sum|x|, 1e-12)``); NaN counts as 0 and is restored afterwards."""
    parts = [p for p in (source, target) if p is not None]
    if not parts:
        return source, target
    joined = torch.cat(parts, 0)
    joined = _nan_safe(lambda x: F.normalize(x, p=1, dim=0), joined)
    if source is not None and target is not None:
        return joined[: source.shape[0]], joined[source.shape[0] :]
    return (joined, None) if source is not None else (None, joined)


def rescale_global(source: torch.Tensor | None, target: torch.Tensor | None):
    """Divide every score by the global absolute maximum (NaN ignored)."""
    parts = [p for p in (source, target) if p is not None]
    if not parts:
        return source, target
    joined = torch.cat(parts, 0)
    joined = _nan_safe(lambda x: x / x.abs().max(), joined)
    if source is not None and target is not None:
        return joined[: source.shape[0]], joined[source.shape[0] :]
    return (joined, None) if source is not None else (None, joined)


def merge_spans(scores: torch.Tensor, spans: Sequence[tuple[int, int]], dim: int, fn: str | Callable) -> torch.Tensor:
    """Merge index ranges ``[start, end)`` along ``dim`` with ``fn``; other indices are kept."""
    aggregate = get_aggregation_function(fn)
    pieces, cursor = [], 0
    for start, end in sorted(spans):
        if start > cursor:
            pieces.append(scores.narrow(dim, cursor, start - cursor))
        pieces.append(aggregate(scores.narrow(dim, start, end - start), dim).unsqueeze(dim))
        cursor = end
    if cursor < scores.shape[dim]:
        pieces.append(scores.narrow(dim, cursor, scores.shape[dim] - cursor))
    return torch.cat(pieces, dim)


def merge_cell_spans(
    scores: torch.Tensor | None,
    row_spans: Sequence[tuple[int, int]],
    column_spans: Sequence[tuple[int, int]],
    fn: str | Callable,
) -> torch.Tensor | None:
    """Merge ``row_spans`` of ``scores`` ``[rows, steps, ...]`` along dim 0, then ``column_spans`` along dim 1:
    for each function of ``AGGREGATION_FUNCTIONS``, a merged cell is ``fn`` over its block of original cells."""
    if scores is None:
        return None
    if row_spans:
        scores = merge_spans(scores, row_spans, 0, fn)
    if column_spans:
        scores = merge_spans(scores, column_spans, 1, fn)
    return scores


def split_spans(spans: Sequence[tuple[int, int]], boundaries: Sequence[int]) -> list[tuple[int, int]]:
    """Cut every span ``[start, end)`` at each boundary strictly inside it; one-token pieces are dropped
    (there is nothing to merge in them)."""
    out = []
    for start, end in spans:
        cuts = [start, *sorted(b for b in set(boundaries) if start < b < end), end]
        out.extend((s, e) for s, e in pairwise(cuts) if e - s > 1)
    return out


def validate_spans(spans: Sequence[tuple[int, int]] | None, length: int, what: str) -> list[tuple[int, int]]:
    if not spans:
        return []
    if isinstance(spans[0], int):
        spans = [tuple(spans)]
    spans = sorted((int(s), int(e)) for s, e in spans)
    previous_end = 0
    for start, end in spans:
        if not 0 <= start < end <= length:
            raise ValueError(f"{what} span ({start}, {end}) is outside 0..{length} or empty")
        if start < previous_end:
            raise ValueError(f"{what} spans overlap at ({start}, {end})")
        previous_end = end
    return [(s, e) for s, e in spans if e - s > 1]


def subword_spans(tokens: Sequence[str], word_start: tuple[str, ...] = ("▁", "Ġ", " "), specials: Sequence[str] = ()) -> list[tuple[int, int]]:
    """Spans of tokens that form one word: a word starts at a token with a word-start marker
    (SentencePiece ``▁``, byte-level ``Ġ``) or a special token."""
    spans, start = [], 0
    for i, token in enumerate(tokens):
        starts_word = i == 0 or token.startswith(word_start) or token in specials or tokens[i - 1] in specials
        if starts_word and i > start:
            spans.append((start, i))
            start = i
        elif starts_word:
            start = i
    spans.append((start, len(tokens)))
    return [s for s in spans if s[1] - s[0] > 1]
