"""Chat probes: conversations rendered with the tokenizer's own chat template, and where their parts land.

A chat probe is a list of messages (``{"role": ..., "content": ...}``) before an assistant answer.
It is rendered twice with ``apply_chat_template``: the context with the generation prompt (what the
model sees before answering) and the whole conversation. The answer's characters are located in
the whole text, so that only the assistant's content tokens become attributed steps; the template's
own tokens (``<|im_end|>``, the newline after it) stay context.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..errors import InvalidInputError, TokenizerError


@dataclass(frozen=True)
class RenderedChat:
    """A chat probe as one tokenizer's template writes it.

    Attributes:
        prompt_text: the conversation before the answer, generation prompt included (with an answer:
            exactly the text before it in ``full_text``).
        full_text: the whole conversation (``prompt_text`` followed by the answer and the
            template's closing tokens); equal to ``prompt_text`` when there is no answer yet.
        answer_span: ``(start, end)`` characters of the assistant's content in ``full_text``, or None.
        message_spans: ``(label, start, end)`` of each context message's content in ``prompt_text``
            (label ``"<index>_<role>"``), for the messages the template writes verbatim.
    """

    prompt_text: str
    full_text: str
    answer_span: tuple[int, int] | None
    message_spans: tuple[tuple[str, int, int], ...]


def message_label(index: int, role: str) -> str:
    return f"{index}_{role}"


def normalize_messages(messages: Sequence, where: str) -> tuple[dict, ...]:
    """Messages as plain ``{"role", "content"}`` dicts with text content, or a typed error saying what is wrong."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise InvalidInputError(f"{where}: a conversation is a list of {{'role': ..., 'content': ...}} messages")
    if not messages:
        raise InvalidInputError(f"{where}: the conversation is empty; give at least one user message")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise InvalidInputError(f"{where}: message {i} must be a dict with 'role' and 'content' keys, got {message!r}")
        if not isinstance(message["content"], str):
            raise InvalidInputError(f"{where}: message {i} has non-text content; chat probes take text messages")
        out.append({"role": str(message["role"]), "content": message["content"]})
    return tuple(out)


def _check_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise TokenizerError(
            f"{type(tokenizer).__name__} has no chat template, so chat probes cannot be rendered: set "
            "tokenizer.chat_template (the model's own), or write the probes as plain prompt/target texts."
        )


def _find(text: str, content: str, start: int) -> int:
    index = text.find(content, start)
    if index < 0 and content.strip() != content:  # templates often strip the content
        index = text.find(content.strip(), start)
    return index


def render_chat(tokenizer, messages: Sequence[Mapping], answer: str | None) -> RenderedChat:
    """Render ``messages`` (the context) and ``answer`` (the assistant's content, None in generate mode)."""
    _check_template(tokenizer)
    context = [dict(m) for m in messages]
    prompt_text = tokenizer.apply_chat_template(context, tokenize=False, add_generation_prompt=True)
    spans, cursor = [], 0
    for i, message in enumerate(context):
        index = _find(prompt_text, message["content"], cursor) if message["content"].strip() else -1
        if index >= 0:
            length = len(message["content"] if prompt_text.startswith(message["content"], index)
                         else message["content"].strip())
            spans.append((message_label(i, message["role"]), index, index + length))
            cursor = index + length
    if answer is None:
        return RenderedChat(prompt_text, prompt_text, None, tuple(spans))
    full_text = tokenizer.apply_chat_template(context + [{"role": "assistant", "content": answer}], tokenize=False)
    # Most templates write the context identically with or without the answer; some (reasoning
    # headers) do not: then the context is whatever precedes the answer in the whole text.
    start = _find(full_text, answer, len(prompt_text) if full_text.startswith(prompt_text) else cursor)
    if start < 0:
        raise TokenizerError(
            "The chat template changes the assistant's answer, so its tokens cannot be located: give the answer "
            "as the template writes it."
        )
    length = len(answer) if full_text.startswith(answer, start) else len(answer.strip())
    # The context is everything before the answer in the whole text: what a template writes between
    # the generation prompt and the answer (an empty "<think></think>" block) is context, never a step.
    return RenderedChat(full_text[:start], full_text, (start, start + length), tuple(spans))
