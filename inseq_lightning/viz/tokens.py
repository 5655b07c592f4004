"""How tokens are shown to people: byte-level stand-ins decoded to text, space markers shown as spaces.

Views get token strings only (no tokenizer), so decoding works on a sequence's tokens alone. Byte-level
BPE (GPT-2, Llama-3, Qwen) stores each UTF-8 byte as a printable stand-in character: "é" is the two
tokens ``Ã ©``, "🎉" four. :func:`readable_labels` turns them back into the characters they encode and
shows a character split over several tokens on its first token; the others get :data:`CONTINUATION`.
"""

import re
import unicodedata

# A label for a token that only continues a character shown on an earlier token.
CONTINUATION = "+"

# Byte-level BPE writes a leading space as "Ġ" and a newline as "Ċ"; sentencepiece writes "▁".
_MARKERS = {"Ġ": " ", "▁": " ", "Ċ": "\\n", "\n": "\\n", "ĉ": "\\t", "\t": "\\t"}
_ESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}
# Special tokens (<|endoftext|>, <s>, </s>, <unk>) are shown as they are and never decoded.
_SPECIAL = re.compile(r"<[^<>]+>")
# Stand-ins that only a byte-level tokenizer writes (space, newline, tab): such a sequence is decoded
# even where its bytes are not valid UTF-8 (a model early in training generates stray bytes).
_BYTE_LEVEL_WHITESPACE = frozenset("ĠĊĉ")


def _byte_of_stand_in() -> dict[str, int]:
    """GPT-2's byte <-> unicode table, inverted (the one ``tokenizers``' ByteLevel uses): bytes 33-126,
    161-172 and 174-255 stand for themselves, the other 68 for ``chr(256 + n)`` in byte order."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    table = {chr(b): b for b in printable}
    others = [b for b in range(256) if b not in table.values()]
    table.update({chr(256 + n): b for n, b in enumerate(others)})
    return table


_BYTE_OF = _byte_of_stand_in()


def display_token(token: str) -> str:
    """One token's markers shown: ``"Ġcat"`` -> ``" cat"``, ``"Ċ"`` -> ``"\\n"`` (a visible backslash-n, not a
    line break). Labels of a sequence come from :func:`readable_labels`, which also decodes bytes."""
    return "".join(_MARKERS.get(ch, ch) for ch in token)


def readable_labels(tokens: list[str]) -> list[str]:
    """One label per token of a sequence: ``["Par", "ty", "Ġ", "ð", "Ł", "İ", "ī", "Ġcaf", "Ã", "©"]`` ->
    ``["Par", "ty", " ", "🎉", "+", "+", "+", " caf", "é", "+"]`` (see :func:`readable_tokens`)."""
    return [CONTINUATION if text is None else text for text in readable_tokens(tokens)]


def readable_tokens(tokens: list[str]) -> list[str | None]:
    """The text each token of a sequence shows; None where a token only continues a character shown on
    an earlier token.

    Byte-level tokens are decoded when every character of the sequence's tokens is a byte stand-in and
    the bytes are UTF-8 (an unfinished last character allowed) or a byte-level space/newline/tab is
    among them; each character is shown on the token holding its first byte, a byte that is not UTF-8
    as ``\\xNN``. Other tokens (SentencePiece, WordPiece) keep their text with ``▁`` shown as a space.
    Special tokens stay as they are. Decode a whole sequence, then slice: a character may be split
    across the prompt's end.
    """
    # Runs of ordinary tokens between special ones: a character never spans a special token.
    runs, run = [], []
    for token in tokens:
        if _SPECIAL.fullmatch(token):
            runs += [run, token]
            run = []
        else:
            run.append(token)
    runs.append(run)
    if not _is_byte_level(runs[::2]):
        return [token if _SPECIAL.fullmatch(token) else display_token(token) for token in tokens]
    return [text for i, part in enumerate(runs) for text in (_decode_run(part) if i % 2 == 0 else [part])]


def _is_byte_level(runs: list[list[str]]) -> bool:
    characters = [ch for run in runs for token in run for ch in token]
    if not all(ch in _BYTE_OF for ch in characters):
        return False
    return any(ch in _BYTE_LEVEL_WHITESPACE for ch in characters) or all(map(_is_utf8, runs))


def _is_utf8(run: list[str]) -> bool:
    """Whether a run's bytes are UTF-8, its last character possibly unfinished (generation stopped)."""
    try:
        bytes(_BYTE_OF[ch] for token in run for ch in token).decode("utf-8")
    except UnicodeDecodeError as error:
        return error.reason == "unexpected end of data"
    return True


def _decode_run(tokens: list[str]) -> list[str | None]:
    """Texts of consecutive byte-level tokens: each character on the token holding its first byte."""
    data = bytes(_BYTE_OF[ch] for t in tokens for ch in t)
    owner = [i for i, t in enumerate(tokens) for _ in t]  # the token each byte came from
    texts = [""] * len(tokens)
    position = 0
    while position < len(data):
        text, size = _character_at(data, position)
        texts[owner[position]] += text
        position += size
    return [None if token and not text else text for token, text in zip(tokens, texts)]


def _character_at(data: bytes, position: int) -> tuple[str, int]:
    """The visible text of the character starting at ``position`` and its size in bytes."""
    for size in range(1, 5):
        try:
            character = data[position : position + size].decode("utf-8")
        except UnicodeDecodeError:
            continue
        return _visible(character), size
    return f"\\x{data[position]:02x}", 1


def _visible(character: str) -> str:
    """Control characters as escapes: a label is one line and moves no cursor."""
    if unicodedata.category(character) != "Cc":
        return character
    return _ESCAPES.get(character, f"\\x{ord(character):02x}")
