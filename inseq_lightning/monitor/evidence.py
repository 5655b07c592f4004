"""Map a probe's evidence (and cue) character spans of the prompt to the rows of its attribution map, and
score how well the map ranks the evidence (plausibility)."""

import math
from collections.abc import Iterable

import numpy as np
from transformers import PreTrainedTokenizerBase


def _find(haystack: list[int], needle: list[int]) -> int | None:
    for start in range(len(haystack) - len(needle) + 1):
        if haystack[start : start + len(needle)] == needle:
            return start
    return None


def _aligned(tokenizer, text: str, source_ids: list[int]) -> tuple[int, list[int], list] | None:
    """``(row of the first token, ids, offsets)`` of ``text``'s encoding laid over ``source_ids``, or None.

    The prompt's own encoding sits inside the source ids (between special tokens). When the prompt
    and its continuation tokenize differently at their boundary, the source is a prefix of the *full
    text's* encoding instead: its tokens up to the first attributed one."""
    encoding = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    ids, offsets = list(encoding["input_ids"]), list(encoding["offset_mapping"])
    start = _find(source_ids, ids)
    if start is not None:
        return start, ids, offsets
    for lead in range(min(3, len(source_ids))):  # a BOS or two in front of the text's own tokens
        n = len(source_ids) - lead
        if n > 0 and ids[:n] == source_ids[lead:]:
            return lead, ids[:n], offsets[:n]
    return None


def evidence_rows(tokenizer: PreTrainedTokenizerBase, prompt: str, source_ids: list[int],
                  spans: list[tuple[int, int]], full_text: str | None = None) -> list[int] | None:
    """Indices of the source tokens that hold a non-whitespace character of an evidence span.

    The offsets come from the fast tokenizer's offset mapping of ``prompt`` (or, when the prompt
    ends inside a token of its continuation, of ``full_text``, which starts with the prompt); the
    attributed source ids may differ from that encoding by leading/trailing special tokens, so the
    encoding is aligned with them first. Returns None when offsets are not available or cannot be
    aligned.
    """
    if not spans:
        return []
    if not getattr(tokenizer, "is_fast", False):
        return None
    source_ids = list(source_ids)
    aligned = _aligned(tokenizer, prompt, source_ids)
    if aligned is None and full_text is not None and full_text.startswith(prompt):
        aligned = _aligned(tokenizer, full_text, source_ids)
    if aligned is None:
        return None
    start, ids, offsets = aligned
    return [start + i for i, (token_id, (s, e)) in enumerate(zip(ids, offsets))
            if _holds_evidence(prompt, s, e, spans) and not _is_blank(tokenizer, token_id)]


def _holds_evidence(prompt: str, start: int, end: int, spans: list[tuple[int, int]]) -> bool:
    # Byte-level BPE ("Ġkite") and Metaspace ("▁kite") offsets include the space before the word:
    # that space alone must not make the word evidence when a span ends on it ("red ").
    return any(prompt[max(start, span_start):min(end, span_end)].strip() for span_start, span_end in spans)


def _is_blank(tokenizer: PreTrainedTokenizerBase, token_id: int) -> bool:
    # Metaspace's prepended "▁" is a token of its own whose offsets point at the first character.
    return not tokenizer.decode([token_id]).strip()


# ---- plausibility: does the map rank the evidence first? -------------------------------------
def context_token_scores(scores: np.ndarray, n_context: int) -> np.ndarray:
    """One score per context token: the absolute aggregated (per-step normalized) scores of the first
    ``n_context`` rows of a ``[rows, steps]`` map, summed over the steps (NaN counts as 0)."""
    return np.nansum(np.abs(np.asarray(scores, dtype=float)[:n_context]), axis=1)


def _labels(n: int, positives: Iterable[int]) -> np.ndarray:
    labels = np.zeros(n, dtype=bool)
    labels[[i for i in positives if 0 <= i < n]] = True
    return labels


def average_precision(scores, positives: Iterable[int]) -> float:
    """Area under the precision-recall curve of ``scores`` against the ``positives`` (indices), as
    ``sklearn.metrics.average_precision_score`` computes it: ``sum_n (R_n - R_{n-1}) P_n`` over the
    distinct scores taken as thresholds from the highest down, tied scores entering together.
    NaN without positives."""
    scores = np.asarray(scores, dtype=float)
    labels = _labels(len(scores), positives)
    n_positive = int(labels.sum())
    if n_positive == 0:
        return math.nan
    order = np.argsort(-scores, kind="mergesort")
    ranked, hits = scores[order], labels[order]
    ends = np.r_[np.flatnonzero(np.diff(ranked)), len(ranked) - 1]  # last index of each distinct score
    true_positives = np.cumsum(hits)[ends]
    precision = true_positives / (ends + 1)
    recall = true_positives / n_positive
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def reciprocal_rank(scores, positives: Iterable[int]) -> float:
    """``1 / rank`` of the highest-scoring positive; the other tokens tied with it rank before it (an
    all-zero map does not rank the evidence first). NaN without positives."""
    scores = np.asarray(scores, dtype=float)
    labels = _labels(len(scores), positives)
    if not labels.any():
        return math.nan
    best = scores[labels].max()
    return 1.0 / (1 + int(np.sum(scores[~labels] >= best)))
