"""How a token is shown to people: tokenizer markers turned back into what they stand for."""

# Byte-level BPE writes a leading space as "Ġ" and a newline as "Ċ"; sentencepiece writes "▁".
_MARKERS = {"Ġ": " ", "▁": " ", "Ċ": "\\n", "\n": "\\n", "ĉ": "\\t", "\t": "\\t"}


def display_token(token: str) -> str:
    """``"Ġcat"`` -> ``" cat"``, ``"Ċ"`` -> ``"\\n"`` (a visible backslash-n, not a line break)."""
    return "".join(_MARKERS.get(ch, ch) for ch in token)
