"""The texts of context attribution: templates, tokens as inseq 0.7.1 reads them, generation, and the selection
of context-sensitive tokens.

Context attribution goes back and forth between texts and tokens (a text is tokenized, special tokens are
dropped, the tokens are joined into a text again): the results depend on each of those steps, so they are
inseq's, one for one. The model only runs in :func:`generate_text`.
"""

import re
from typing import Any

import torch

from ..errors import InvalidInputError
from ..models.tokenization import encode_input, tokenize_ids
from . import layout  # (the layouts use this module's helpers too: both look each other up at call time)
from .args import HandleOutputContextSetting


# ---- tokens (inseq's HuggingfaceModel methods, on an AttributionModel) ------------------------------------------------
def text_to_tokens(model, text: str, skip_special_tokens: bool = False, as_targets: bool = False) -> list[str]:
    """inseq's ``convert_string_to_tokens``: special tokens added unless ``skip_special_tokens``."""
    ids = tokenize_ids(model.tokenizer, text, not skip_special_tokens, as_targets)
    return [str(t) for t in model.tokenizer.convert_ids_to_tokens(ids, skip_special_tokens=skip_special_tokens)]


def tokens_to_text(model, tokens: list[str], skip_special_tokens: bool = True) -> str:
    """inseq's ``convert_tokens_to_string``."""
    if not tokens:
        return ""
    if skip_special_tokens:
        tokens = [t for t in tokens if t not in model.tokenizer.all_special_tokens]
    return model.tokenizer.convert_tokens_to_string(tokens)


def filtered_tokens(model, text: str, special_tokens_to_keep: list[str], replace_special_characters: bool = False,
                    is_target: bool = False) -> list[str]:
    """The tokens of ``text`` without special tokens, except those in ``special_tokens_to_keep``."""
    special = set(model.tokenizer.all_special_tokens)
    tokens = text_to_tokens(model, text, as_targets=is_target and layout.context_layout(model).targets_apart)
    kept = [t for t in tokens if t not in special or t in special_tokens_to_keep]
    if replace_special_characters:
        kept = [t.replace("Ġ", " ").replace("Ċ", "\n").replace("▁", " ") for t in kept]
    return kept


def bos_token(model) -> str | None:
    """inseq's ``bos_token``: the decoder start token, else the config's BOS token."""
    config = model.model.config
    bos_id = getattr(config, "decoder_start_token_id", None)
    bos_id = config.bos_token_id if bos_id is None else bos_id
    return None if bos_id is None else str(model.tokenizer.convert_ids_to_tokens(bos_id))


def pad_token(model) -> str:
    return str(model.tokenizer.convert_ids_to_tokens(model.special_ids.pad))


# ---- templates -------------------------------------------------------------------------------------------------------
def concat_with_sep(s1: str, s2: str, sep: str) -> str:
    """``s1 + sep + s2``, without doubling a separator one of them already has."""
    return s1 + s2 if s1.endswith(sep) or s2.startswith(sep) else s1 + sep + s2


def format_template(template: str, current: str, context: str | None = None) -> str:
    return template.format(current=current, **({} if context is None else {"context": context}))


# ---- generation ------------------------------------------------------------------------------------------------------
def generate_text(model, model_input: str, special_tokens_to_keep: list[str], output_generated_only: bool = True,
                  **generation_kwargs) -> str:
    """The model's generation from ``model_input`` as inseq's ``generate_with_special_tokens`` makes it: decoded
    with special tokens, tokenized again, special tokens not kept dropped, joined into a text."""
    can_generate = getattr(model.model, "can_generate", None)
    if can_generate is None or not can_generate():
        raise InvalidInputError(f"{type(model.model).__name__} cannot generate: pass output_current_text (and, "
                                "for a contrastive attributed_fn, contextless_output_next_tokens) to force the outputs")
    ids = model.generate_ids([model_input], skip_special_tokens=False, **generation_kwargs)[0]
    if output_generated_only:
        ids = layout.context_layout(model).generated_part(ids, len(encode_input(model, model_input, skip_special_tokens=False)))
    text = model.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return tokens_to_text(model, filtered_tokens(model, text, special_tokens_to_keep, is_target=True),
                          skip_special_tokens=False)


def _generate_model_output(model, model_input: str, generation_kwargs: dict, special_tokens_to_keep: list[str],
                           output_template: str, prefix: str, suffix: str) -> str:
    """The generation without the output template's prefix and suffix (which it must have)."""
    output = generate_text(model, model_input, special_tokens_to_keep, **generation_kwargs)
    for part, present, cut in ((prefix, output.startswith, lambda s: s[len(prefix):]),
                               (suffix, output.endswith, lambda s: s[: -len(suffix)])):
        if part:
            if not present(part):
                raise InvalidInputError(f"output_template {output_template!r} has {part!r} around {{current}} but "
                                        f"the model generated {output!r}; fix the template or force the outputs "
                                        "(output_context_text, output_current_text)")
            output = cut(output)
    return output


def prepare_outputs(model, input_context_text: str | None, input_full_text: str, output_context_text: str | None,
                    output_current_text: str | None, output_template: str, handle_output_context_strategy: str,
                    generation_kwargs: dict[str, Any], special_tokens_to_keep: list[str],
                    decoder_input_output_separator: str) -> tuple[str | None, str]:
    """``(output_context, output_current)``: as given, or generated from the full input (inseq's six settings:
    given context and current; given current; given context, generated current; generated current; generated
    context and current, split; generated context, given current)."""
    use_out_ctx = "{context}" in output_template
    has_out_ctx, has_out_curr = output_context_text is not None, output_current_text is not None
    if has_out_ctx == use_out_ctx and has_out_curr:
        return output_context_text, output_current_text
    prefix = output_template.split("{context}" if use_out_ctx else "{current}")[0]
    current_prefix_template, suffix = output_template.split("{current}")
    separator = output_template.split("{context}")[1].split("{current}")[0] if use_out_ctx else None
    continued = output_context_text if has_out_ctx and not has_out_curr else None
    current_prefix = (current_prefix_template.strip().format(context=output_context_text) if continued is not None
                      else prefix)
    model_input, current_prefix = layout.context_layout(model).generation_input(
        model, input_full_text, current_prefix, continued, current_prefix_template, generation_kwargs,
        decoder_input_output_separator)
    generated = _generate_model_output(model, model_input, generation_kwargs, special_tokens_to_keep,
                                       output_template, current_prefix, suffix)
    if has_out_ctx == use_out_ctx:
        return output_context_text, _nonempty_current(generated.strip(), output_context_text)
    # The generation holds context and current: split on the template's separator when it occurs once, else on
    # punctuation when that gives two parts (inseq then tries a LaBSE word aligner, downloaded at run time: not here).
    candidate = None
    parts = generated.split(separator)
    if len(parts) == 2:
        candidate = parts[0]
    if not candidate:
        parts = [s for s in re.split(r"[\s{}]+".format(re.escape(".?!,;:)]}")), generated) if s]
        if len(parts) == 2:
            candidate = parts[0]
    if candidate and handle_output_context_strategy == HandleOutputContextSetting.AUTO.value:
        context = candidate
    else:
        context = _ask_for_context(generated, candidate)
    template_context = output_template.split("{current}")[0].format(context=context)
    if not context:
        template_context = template_context.strip()
    current = generated[min(len(template_context), len(generated)):]
    if has_out_curr:
        return context, output_current_text
    return context, _nonempty_current(current.strip(), context)


def _nonempty_current(current: str, context: str | None) -> str:
    if not current:
        raise InvalidInputError(f"the model generated no output current text (output context: {context!r}); pass "
                                "output_current_text, allow more tokens in generation_kwargs, or force an output "
                                "context with output_context_text")
    return current


def _ask_for_context(output: str, candidate: str | None) -> str:
    """inseq's ``prompt_user_for_context``: confirm the proposed output context, or type the right one."""
    from rich import print as rprint
    from rich.prompt import Confirm, Prompt

    while True:
        confirmed = bool(candidate) and Confirm.ask(
            f'\n:arrow_right: The model generated the following output: "[bold]{output}[/bold]"'
            f'\n:question: Is [bold]"{candidate}"[/bold] the correct context you want to attribute?')
        context = candidate if confirmed else Prompt.ask(
            ":writing_hand: Please enter the portion of the generated output representing the correct context")
        if output.startswith(context):
            if context.strip() or Confirm.ask(":question: The provided context is empty. Do you want to use an "
                                              "empty context?"):
                return context if context.strip() else ""
            continue
        rprint("[prompt.invalid]The provided context is invalid. Please provide a non-empty substring of the model "
               "output above to use as context.")


def contextless_output(model, input_current_text: str, current_tokens: list[str], cti_idx: int,
                       n_sensitive: int, next_tokens: list[str], ask_user: bool, step: int,
                       decoder_input_output_separator: str, special_tokens_to_keep: list[str],
                       generation_kwargs: dict[str, Any]) -> str:
    """The output without context up to the context-sensitive token ``cti_idx`` of ``current_tokens`` (the
    current output's tokens): the contextual prefix followed by the contextless prediction (given in
    ``next_tokens``, typed by the user, or generated)."""
    next_token = None
    if next_tokens:
        if len(next_tokens) != n_sensitive:
            raise InvalidInputError(f"contextless_output_next_tokens has {len(next_tokens)} tokens for "
                                    f"{n_sensitive} context-sensitive tokens; give one per context-sensitive token")
        next_token = next_tokens[step]
    if ask_user:
        next_token = _ask_for_next_token(model, current_tokens, cti_idx, special_tokens_to_keep)
    if isinstance(next_token, str):
        first = text_to_tokens(model, next_token, as_targets=layout.context_layout(model).targets_apart)[0]
        return tokens_to_text(model, current_tokens[:cti_idx] + [first], skip_special_tokens=False).lstrip(" ")
    prefix = tokens_to_text(model, current_tokens[:cti_idx], skip_special_tokens=False).lstrip(" ")
    model_input = layout.context_layout(model).contextless_generation(model, input_current_text, prefix, generation_kwargs,
                                                               decoder_input_output_separator)
    return generate_text(model, model_input, special_tokens_to_keep, output_generated_only=False, **generation_kwargs)


def _ask_for_next_token(model, current_tokens: list[str], cti_idx: int,
                        special_tokens_to_keep: list[str]) -> str | None:
    """inseq's ``prompt_user_for_contextless_output_next_tokens``."""
    from rich import print as rprint
    from rich.prompt import Confirm, Prompt

    prefix = tokens_to_text(model, current_tokens[:cti_idx], skip_special_tokens=False).lstrip(" ")
    token = filtered_tokens(model, current_tokens[cti_idx], special_tokens_to_keep, is_target=True,
                            replace_special_characters=True)[0]
    while True:
        if not Confirm.ask(f'\n:arrow_right: Contextual prefix: "[bold]{prefix}[/bold]"\n:question: The token '
                           f'[bold]"{token}"[/bold] is produced in the contextual setting. Do you want to specify a '
                           "word for comparison?"):
            return None
        word = Prompt.ask(":writing_hand: Please enter the word to use for comparison with the contextual output:")
        if word.strip():
            return word
        rprint("[prompt.invalid]The provided word is empty. Please provide a non-empty word.")


# ---- selection -------------------------------------------------------------------------------------------------------
def scores_threshold(scores: list[float], std_weight: float | None) -> float:
    """Mean plus ``std_weight`` standard deviations, in float32 as inseq computes it (the selection of tokens at
    the threshold depends on its rounding); 0 without scores or weight, the mean for one score or weight 0."""
    if std_weight is None or not scores:
        return 0.0
    values = torch.tensor(scores)
    if std_weight == 0 or len(scores) == 1:
        return float(values.mean())
    return float(values.mean() + std_weight * values.std())


def rank_tokens(tokens: list[str], scores: list[float], std_threshold: float | None = None,
                topk: int | None = None) -> tuple[list[tuple[int, float, str]], float]:
    """``([(index, score, token), ...], threshold)``: the tokens whose |score| reaches the threshold, largest
    |score| first (ties keep their order), at most ``topk`` of them."""
    ranked = sorted(zip(range(len(scores)), scores, tokens, strict=False), key=lambda x: abs(x[1]), reverse=True)
    threshold = scores_threshold(scores, std_threshold)
    # float32 comparison, as inseq compares Python floats with a float32 tensor
    limit = torch.tensor(threshold, dtype=torch.float32)
    ranked = [(i, s, t) for i, s, t in ranked if bool(abs(s) >= limit)]
    return (ranked[:topk] if topk else ranked), threshold
