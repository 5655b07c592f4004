"""Map a probe's evidence (character spans of the prompt) to the rows of its attribution map."""

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
