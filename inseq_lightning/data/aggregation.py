"""From raw scores to shown scores: reduce extra dimensions, normalize columns, merge token spans."""

import logging
import re
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


# =====================================================================================================
# inseq 0.7.1's aggregators, computed as inseq computes them
# =====================================================================================================
logger = logging.getLogger(__name__)

#: Aggregator names :meth:`FeatureAttributionSequenceOutput.aggregate` takes besides the aggregation functions:
#: inseq 0.7.1's six (``scores``, ``spans``, ``subwords``, ``split``, ``slices``, ``pair``) and ``words``, this
#: library's word merging (word-start markers of every tokenizer family; a word cut by the prompt's end is split
#: there), which inseq does not have.
AGGREGATORS = ("scores", "spans", "subwords", "split", "slices", "pair", "words")


def list_aggregators() -> list[str]:
    """Identifiers of every aggregator (inseq's ``list_aggregators``, plus ``words``)."""
    return list(AGGREGATORS)


def default_scores_function(granularity: str) -> str:
    """The function the ``scores`` aggregator uses when none is given: ``vnorm`` for gradient-like (granular)
    scores, ``mean`` otherwise (inseq's per-class defaults)."""
    return "vnorm" if granularity == "granular" else "mean"


def scores_function(name: str | Callable, vnorm_ord: float | None = None) -> Callable:
    """An aggregation function ``fn(x, dim)``; ``vnorm_ord`` is passed on to ``vnorm`` (inseq's keyword)."""
    if name == "vnorm" and vnorm_ord is not None:
        return lambda x, dim: vector_norm(x, ord=vnorm_ord, dim=dim)
    return get_aggregation_function(name)


def validate_indices(scores: torch.Tensor, dim: int = -1, indices=None) -> torch.Tensor:
    """inseq's ``validate_indices``: an int (one index), a ``(start, end)`` tuple (a span) or a list of indices,
    negative ones counted from the end; None means all."""
    if dim >= scores.ndim:
        raise IndexError(f"Dimension {dim} is greater than tensor dimension {scores.ndim}")
    n_units = scores.shape[dim]
    if not isinstance(indices, int | tuple | list) and indices is not None:
        raise TypeError("Indices must be an integer, a (start, end) tuple of indices representing a span, a list of "
                        "individual indices or a single index.")
    if hasattr(indices, "__iter__"):
        if len(indices) == 0:
            raise RuntimeError("An empty sequence of indices is not allowed.")
        if len(indices) == 1:
            indices = indices[0]
    if isinstance(indices, int):
        if indices not in range(-n_units, n_units):
            raise IndexError(f"Index out of range. Scores only have {n_units} units.")
        return torch.tensor(indices if indices >= 0 else n_units + indices)
    if indices is None:
        indices = (0, n_units)
    indices = type(indices)(i if i >= 0 else n_units + i for i in indices)
    if len(indices) == 2 and isinstance(indices, tuple) and indices[0] >= indices[1]:
        raise RuntimeError("A (start, end) tuple of indices representing a span, a list of individual indices or a "
                           "single index must be specified.")
    max_idx_val = n_units if isinstance(indices, list) else n_units + 1
    if not all(i in range(-n_units, max_idx_val) for i in indices):
        raise IndexError(f"One or more index out of range. Scores only have {n_units} units.")
    if len(set(indices)) != len(indices):
        raise IndexError("Duplicate indices are not allowed.")
    return torch.arange(indices[0], indices[1]) if isinstance(indices, tuple) else torch.tensor(indices)


def filter_scores(scores: torch.Tensor, dim: int = -1, indices=None) -> torch.Tensor:
    """``scores`` restricted to ``indices`` of ``dim`` (an int index removes the dimension)."""
    indexed = scores.index_select(dim, validate_indices(scores, dim, indices).reshape(-1).to(scores.device))
    return indexed.squeeze(dim) if isinstance(indices, int) else indexed


def format_spans(spans):
    """``(start, end)`` or ``[(start, end), ...]`` as a list of spans (empty or None kept)."""
    if not spans:
        return spans
    return [tuple(spans)] if isinstance(spans[0], int) else [tuple(s) for s in spans]


def check_spans(tokens: Sequence, spans, what: str) -> None:
    """inseq's span rules: two indices each, non-empty, ascending, non-overlapping, within the tokens."""
    if not spans:
        return
    if not (all(isinstance(s, int) for s in spans) or all(isinstance(s, tuple | list) for s in spans)):
        raise ValueError(f"All {what} spans must be either indices (int) or (start, end) spans, got {spans}")
    previous_end = -1
    for span in format_spans(spans):
        if len(span) != 2:
            raise ValueError(f"{what} spans must contain two indexes, got {spans}")
        if span[1] < span[0] + 1:
            raise ValueError(f"{what} spans must be non-empty, got {spans}")
        if span[0] < previous_end:
            raise ValueError(f"{what} spans must be positive-valued, non-overlapping and in ascending order, got {spans}")
        if span[1] > len(tokens):
            raise ValueError(f"{what} span values must be indexes of the original sequence, got {spans}")
        previous_end = span[1]


def aggregate_contiguous(t: torch.Tensor, spans, fn: Callable, dim: int = 0) -> torch.Tensor:
    """inseq's ``aggregate_contiguous``: each span of ``dim`` reduced to one index with ``fn``, the rest kept."""
    if not spans:
        return t
    if dim != 0:
        t = t.transpose(dim, 0)
    pieces, cursor = [], 0
    for start, end in spans:
        if start > cursor:
            pieces.append(t[cursor:start, ...])
        pieces.append(fn(t[start:end, ...], dim=0).unsqueeze(0))
        cursor = end
    if cursor < t.shape[0]:
        pieces.append(t[cursor:, ...])
    out = torch.cat(pieces, dim=0)
    return out.transpose(dim, 0) if dim != 0 else out


def relativize_target_spans(spans, start: int):
    """Target spans as step (column) spans: those ending in the prefix dropped, the rest shifted by ``start``."""
    if start != 0 and spans:
        spans = [(s - start if s > start else 0, e - start) for s, e in spans if e > start]
    return spans


def merge_token_spans(tokens: list, spans) -> list:
    """inseq's ``aggregate_token_sequence``: each span's tokens joined into one token with id -1."""
    if not spans:
        return tokens
    token_cls = type(tokens[0])
    starts = {s: e for s, e in spans}
    out, cursor = [], 0
    while cursor < len(tokens):
        if cursor in starts:
            end = starts[cursor]
            out.append(token_cls("".join(t.token for t in tokens[cursor:end]), -1))
            cursor = end
        else:
            out.append(tokens[cursor])
            cursor += 1
    return out


def inseq_subword_spans(tokens: Sequence[str], special_chars: str | Sequence[str] = "▁",
                        is_suffix_symbol: bool = False) -> list[tuple[int, int]]:
    """inseq's ``SubwordAggregator.get_spans``: a token starting with one of ``special_chars`` starts a word (ends
    one with ``is_suffix_symbol``). As in inseq, a final token that continues a word is left out of the word's
    span, and tokens without any of ``special_chars`` give no spans (with a warning)."""
    if isinstance(special_chars, list):
        special_chars = tuple(special_chars)
    if not any(sym in token for token in tokens for sym in special_chars):
        logger.warning(
            f"The {special_chars} character is currently used for subword aggregation, but no instances have been "
            "detected in the sequence. Change the special symbols using e.g. special_chars=('Ġ', 'Ċ'), and set "
            "is_suffix_symbol=True if they are used as suffix word separators (e.g. Hello</w> world</w>)")
        return []
    spans, last_prefix = [], 0
    for i, token in enumerate(tokens):
        if token.startswith(special_chars) == is_suffix_symbol:  # continues a word
            if i == len(tokens) - 1 and i - last_prefix > 1:
                spans.append((last_prefix, i))
            continue
        if i - last_prefix > 1:
            spans.append((last_prefix, i))
        last_prefix = i
    return spans


def split_pattern_spans(tokens: Sequence[str], split_pattern: str, split_mode: str = "single") -> list[tuple[int, int]]:
    """inseq's ``StringSplitAggregator.get_spans``: the token spans between (and of) the matches of
    ``split_pattern`` in the joined tokens; ``split_mode`` ``"single"`` keeps the matches apart, ``"start"`` joins
    each to what follows, ``"end"`` to what precedes."""
    if split_pattern is None:
        raise ValueError("split_pattern is None. Provide a valid regular expression pattern to split the string.")
    full_text = "".join(tokens)
    token_spans, cursor = [], 0
    for tok in tokens:
        token_spans.append((cursor, cursor + len(tok)))
        cursor += len(tok)
    matches = [(m.start(), m.end()) for m in re.finditer(split_pattern, full_text)]
    if not matches:
        return []
    matches_tokens = []
    for start, end in matches:
        token_start = next((i for i, (ts, te) in enumerate(token_spans) if ts <= start < te), None)
        token_end = next((i for i, (ts, te) in enumerate(token_spans) if ts < end <= te), None)
        if token_start is not None and token_end is not None:
            matches_tokens.append((token_start, token_end + 1))
    if not matches_tokens:
        return []
    seen = set()
    matches_tokens = [m for m in matches_tokens if not (m in seen or seen.add(m))]
    non_overlapping = []
    for idx, (start, end) in enumerate(matches_tokens):
        curr_start, curr_end = start, end
        if len(matches_tokens) > idx + 1 and end > matches_tokens[idx + 1][0]:
            curr_end = matches_tokens[idx + 1][0]
        if idx > 0 and start < non_overlapping[-1][1]:
            curr_start = non_overlapping[-1][1]
        non_overlapping.append((curr_start, curr_end))
        if curr_end != end and end < matches_tokens[idx + 1][1]:
            non_overlapping.append((curr_end, end))
    matches_tokens = non_overlapping
    spans, matched = [], []
    if matches_tokens[0][0] != 0:
        spans.append((0, matches_tokens[0][0]))
        matched.append(False)
    for i in range(len(matches_tokens) - 1):
        spans.append(matches_tokens[i])
        matched.append(True)
        if matches_tokens[i][1] != matches_tokens[i + 1][0]:
            spans.append((matches_tokens[i][1], matches_tokens[i + 1][0]))
            matched.append(False)
    spans.append(matches_tokens[-1])
    matched.append(True)
    if matches_tokens[-1][1] != len(tokens):
        spans.append((matches_tokens[-1][1], len(tokens)))
        matched.append(False)
    if split_mode == "single":
        return spans
    if split_mode not in ("start", "end"):
        raise ValueError("Invalid split strategy: must be one of 'single', 'start', 'end'")
    merged, span_start = [], 0
    for (start, end), is_match in zip(spans, matched):
        if is_match:
            if split_mode == "start" and start != span_start:
                merged.append((span_start, start))
                span_start = start
            elif split_mode == "end":
                merged.append((span_start, end))
                span_start = end
    if span_start != spans[-1][1]:
        merged.append((span_start, spans[-1][1]))
    return merged


def contiguous_fields(seq, source_spans, target_spans, aggregate_fn: str | Callable | None,
                      step_function_fn: Callable[[str], str]) -> dict:
    """The fields of ``seq`` with spans merged as inseq's ``ContiguousSpanAggregator`` merges them (``spans``,
    ``subwords``, ``split``): columns (steps) first, then rows; target spans also merge step columns and step
    scores; a span crossing ``attr_pos_start`` merges the prompt's piece into the first step's token."""
    start, end = seq.attr_pos_start, seq.attr_pos_end
    fn = get_aggregation_function(aggregate_fn or "absmax")
    step_spans = relativize_target_spans(target_spans, start)

    def sequential(scores, row_spans, column_spans):
        if scores is None:
            return None
        return aggregate_contiguous(aggregate_contiguous(scores, column_spans, fn, 1), row_spans, fn, 0)

    step_scores = {}
    for name, values in seq.step_scores.items():
        score_fn = fn if aggregate_fn is not None else get_aggregation_function(step_function_fn(name))
        step_scores[name] = aggregate_contiguous(values, step_spans, score_fn, 0)
    if target_spans:
        new_start = start - sum(e - s - 1 for s, e in target_spans if e <= start)
        overlapping = [s for s in target_spans if s[0] < start < s[1]]
        if len(overlapping) > 1:
            raise RuntimeError(f"Multiple overlapping spans detected for the starting position {start}.")
        if overlapping:
            new_start -= start - overlapping[0][0]
        new_end = new_start + (end - start) - sum(e - s - 1 for s, e in step_spans)
    else:
        new_start, new_end = start, end
    return {
        "source": merge_token_spans(seq.source, source_spans),
        "target": merge_token_spans(seq.target, target_spans),
        "source_attributions": sequential(seq.source_attributions, source_spans, step_spans),
        "target_attributions": sequential(seq.target_attributions, target_spans, step_spans),
        "step_scores": step_scores,
        "attr_pos_start": new_start,
        "attr_pos_end": new_end,
    }


def slice_fields(seq, source_spans, target_spans) -> dict:
    """inseq's ``SliceAggregator``: keep the tokens of the spans (rows of the scores); the attributed steps are
    always kept whole, and a decoder-only source follows the target spans."""
    source_spans, target_spans = format_spans(source_spans), format_spans(target_spans)
    start, end = seq.attr_pos_start, seq.attr_pos_end
    if seq.source_attributions is None:
        if source_spans:
            logger.warning("Source spans are specified but no source scores are given for decoder-only models. "
                           "Ignoring source spans and using target spans instead.")
        source_spans = [(s, min(e, start)) for s, e in (target_spans or [])]
    new_target_spans, gen_added = [], False
    for span in target_spans or []:
        if span[1] > start and gen_added:
            continue
        if span[1] > start:
            new_target_spans.append((span[0], end))
            gen_added = True
        else:
            new_target_spans.append(span)
    if not gen_added:
        new_target_spans.append((start, end))
    check_spans(seq.source, source_spans, "source")
    check_spans(seq.target, new_target_spans, "target")

    def rows(scores, spans):
        if scores is None:
            return None
        return torch.cat(tuple(scores[s:e, ...] for s, e in spans), dim=0)

    return {
        "source": [t for s, e in (source_spans or []) for t in seq.source[s:e]],
        "target": [t for s, e in new_target_spans for t in seq.target[s:e]],
        "source_attributions": rows(seq.source_attributions, source_spans),
        "target_attributions": rows(seq.target_attributions, new_target_spans),
        "attr_pos_start": sum(min(e, start) - s for s, e in new_target_spans),
        "attr_pos_end": end,  # as inseq: clamped to the sliced target's length by the new output
    }


def pair_difference(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """inseq's ``pair`` default: ``paired - attr``."""
    return y - x


def pair_fields(seq, paired, aggregate_fn: Callable | None) -> dict:
    """inseq's ``PairAggregator``: elementwise ``aggregate_fn(seq, paired)`` (default ``paired - seq``) of every
    score, tokens that differ labelled ``"token → paired token"``."""
    fn = aggregate_fn or pair_difference
    if len(seq.source) != len(paired.source):
        raise ValueError("Source sequences must be the same length.")
    if len(seq.target) != len(paired.target):
        raise ValueError("Target sequences must be the same length.")
    for name in ("source_attributions", "target_attributions"):
        a, b = getattr(seq, name), getattr(paired, name)
        if a is not None and (b is None or a.shape != b.shape):
            raise ValueError(f"{name.split('_')[0].capitalize()} attributions must be the same shape.")
    for name, value in seq.step_scores.items():
        if name not in paired.step_scores:
            raise ValueError(f"Step score {name} must be in paired attribution.")
        if value.shape != paired.step_scores[name].shape:
            raise ValueError(f"Step score {name} must be the same shape.")

    def tokens(ours, theirs):
        token_cls = type(ours[0]) if ours else None
        return [a if a.token == b.token else token_cls(f"{a.token} → {b.token}", -1) for a, b in zip(ours, theirs)]

    def scores(name):
        a = getattr(seq, name)
        return None if a is None else fn(a, getattr(paired, name))

    return {
        "source": tokens(seq.source, paired.source),
        "target": tokens(seq.target, paired.target),
        "source_attributions": scores("source_attributions"),
        "target_attributions": scores("target_attributions"),
        "step_scores": {name: fn(v, paired.step_scores[name]) for name, v in seq.step_scores.items()},
    }
