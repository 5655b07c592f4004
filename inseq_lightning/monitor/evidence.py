"""Map a probe's evidence (character spans of the prompt) to the rows of its attribution map."""

from transformers import PreTrainedTokenizerBase


def _find(haystack: list[int], needle: list[int]) -> int | None:
    for start in range(len(haystack) - len(needle) + 1):
        if haystack[start : start + len(needle)] == needle:
            return start
    return None


def evidence_rows(tokenizer: PreTrainedTokenizerBase, prompt: str, source_ids: list[int],
                  spans: list[tuple[int, int]]) -> list[int] | None:
    """Indices of the source tokens that hold a non-whitespace character of an evidence span.

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
    return [start + i for i, (token_id, (s, e)) in enumerate(zip(ids, offsets))
            if _holds_evidence(prompt, s, e, spans) and not _is_blank(tokenizer, token_id)]


def _holds_evidence(prompt: str, start: int, end: int, spans: list[tuple[int, int]]) -> bool:
    # Byte-level BPE ("Ġkite") and Metaspace ("▁kite") offsets include the space before the word:
    # that space alone must not make the word evidence when a span ends on it ("red ").
    return any(prompt[max(start, span_start):min(end, span_end)].strip() for span_start, span_end in spans)


def _is_blank(tokenizer: PreTrainedTokenizerBase, token_id: int) -> bool:
    # Metaspace's prepended "▁" is a token of its own whose offsets point at the first character.
    return not tokenizer.decode([token_id]).strip()
