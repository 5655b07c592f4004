"""Map a probe's evidence (character spans of the prompt) to the rows of its attribution map."""

from transformers import PreTrainedTokenizerBase


def _find(haystack: list[int], needle: list[int]) -> int | None:
    for start in range(len(haystack) - len(needle) + 1):
        if haystack[start : start + len(needle)] == needle:
            return start
    return None


def evidence_rows(tokenizer: PreTrainedTokenizerBase, prompt: str, source_ids: list[int],
                  spans: list[tuple[int, int]]) -> list[int] | None:
    """Indices of the source tokens that overlap an evidence span.

    The offsets come from the fast tokenizer's offset mapping of ``prompt``; the attributed source
    ids may differ from that encoding by leading/trailing special tokens, so the encoding is
    aligned with them first. Returns None when offsets are not available or cannot be aligned.
    """
    if not spans:
        return []
    if not getattr(tokenizer, "is_fast", False):
        return None
    encoding = tokenizer(prompt, return_offsets_mapping=True, add_special_tokens=False)
    ids, offsets = list(encoding["input_ids"]), list(encoding["offset_mapping"])
    start = _find(list(source_ids), ids)
    if start is None:
        return None
    rows = []
    for i, (s, e) in enumerate(offsets):
        if e > s and any(s < span_end and e > span_start for span_start, span_end in spans):
            rows.append(start + i)
    return rows
