"""Where context attribution differs between decoder-only and encoder-decoder models, in one place.

inseq 0.7.1's ``attribute_context`` branches on ``is_encoder_decoder`` in a dozen places; each branch is a
method here, one class per architecture, so that the steps of :mod:`.attribution` and :mod:`.texts` read the
same on both. The facts behind the branches:

- A decoder-only model reads its output after its input, in one token sequence: the output is tokenized as
  the input's continuation, generated ids start with the prompt's, and the contextless prediction is a
  continuation of the contextless input. An encoder-decoder's output is its own target sequence (tokenized
  as a target, ending with EOS, after a decoder start token), continued through ``decoder_input_ids``.
- The contrast of a decoder-only model differs from the attributed sequence in its prompt, so its positions
  are aligned explicitly; an encoder-decoder's contrast has its own source (``contrast_sources``).
"""

import warnings
from typing import Any

from ..attr.contrast import align_positions
from ..models.tokenization import build_batch, encode_target
from . import texts  # (texts reads the layout too: its names are looked up at call time)

__all__ = ["DecoderOnlyLayout", "EncoderDecoderLayout", "context_layout"]


class DecoderOnlyLayout:
    """A decoder-only model: input and output in one sequence."""

    #: outputs are tokenized as targets (an encoder-decoder's own target tokenization)
    targets_apart = False
    #: tokens every output ends with after its text (an encoder-decoder's EOS)
    trailing_tokens = 0
    #: an output of one token is followed by the pad token when it is written as a text (inseq's)
    pads_lone_token = False
    #: CCI also attributes the target prefix when there is an output context (decoder-only: the output
    #: context is part of the one sequence, attributed as the input is)
    attribute_target_for_output_context = False

    # ---- texts ----------------------------------------------------------------------------
    def full_output(self, input_full_text: str, output_full_text: str, sep: str) -> str:
        """The output text as attributed: after the input."""
        return texts.concat_with_sep(input_full_text, output_full_text, sep)

    def contextless_texts(self, contextless_input: str, contextless_current: str, sep: str) -> tuple[str, str]:
        """``(input, output)`` of the contextless condition: the output continues the input."""
        contextless_input = texts.concat_with_sep(contextless_input, "", sep)
        return contextless_input, contextless_input + contextless_current

    def contrast_input(self, contextless_input: str, contextless_prefix: str, sep: str) -> str:
        """The contextless input of a contrastive CCI: inseq appends the output's prefix again for every token."""
        return texts.concat_with_sep(contextless_input, contextless_prefix, sep)

    def current_tokens(self, model, output_current_text: str, output_full_tokens: list[str], offset: int,
                       keep: list[str]) -> list[str]:
        """The current output's tokens as the model reads them: after the input, counted back from the end."""
        return output_full_tokens[offset:]

    # ---- generation -----------------------------------------------------------------------
    def generated_part(self, ids: list[int], prompt_length: int) -> list[int]:
        """The generated ids without the prompt's (``generate`` returns both)."""
        return ids[prompt_length:]

    def generation_input(self, model, input_full_text: str, current_prefix: str, output_context: str | None,
                         current_prefix_template: str, generation_kwargs: dict[str, Any], sep: str
                         ) -> tuple[str, str]:
        """``(model input, prefix the generation starts with)`` for the current output.

        With a given output context, the model continues the output context and the template's separator before
        ``{current}`` (inseq strips it, then looks for the whole input in the generated tokens and fails)."""
        if output_context is None:
            return texts.concat_with_sep(input_full_text, "", sep), current_prefix
        context_part = current_prefix_template.format(context=output_context)
        return texts.concat_with_sep(input_full_text, context_part, sep), ""

    def contextless_generation(self, model, input_current_text: str, prefix: str, generation_kwargs: dict[str, Any],
                               sep: str) -> str:
        """The model input of the one-token contextless prediction after ``prefix`` (sets ``max_new_tokens``)."""
        generation_kwargs["max_new_tokens"] = 1
        return texts.concat_with_sep(input_current_text, prefix, sep)

    # ---- attribution ----------------------------------------------------------------------
    def contrast_kwargs(self, model, inputs: list[str], outputs: list[str], starts: list[int] | None,
                        contrast_inputs: list[str], contrast_outputs: list[str]) -> dict[str, Any]:
        """The arguments that attribute ``outputs`` (of ``inputs``, from ``starts``) against ``contrast_outputs``
        of ``contrast_inputs``: a decoder-only contrast's positions are given explicitly,
        the last attributed token with the last contrast token and so on leftwards (inseq's default alignment; a
        contrast that does not start with its prompt needs them)."""
        with warnings.catch_warnings():  # attribute() warns about token boundaries itself
            warnings.simplefilter("ignore")
            batch = build_batch(model, inputs, outputs, starts, None, False, False)
        pairs = []
        for i, positions in enumerate(batch.step_positions):
            length = int(batch.target_mask[i].sum())
            contrast_length = len(encode_target(model, contrast_outputs[i], skip_special_tokens=False))
            aligned = align_positions(positions, length, contrast_length, None, f"contrast of output {i}")
            pairs.append(list(zip(positions, aligned, strict=True)))
        return {"contrast_targets": contrast_outputs, "contrast_targets_alignments": pairs}

    def start_offset(self, first_token: str, bos: str | None, keep: list[str]) -> int:
        """Rows before the first output token in an attribution: a BOS not kept (decoder-only), the decoder
        start token (encoder-decoder)."""
        return int(first_token == bos and bos not in keep)

    def context_lead(self, first_token: str, bos: str | None, keep: list[str], has_lang_tag: bool) -> int:
        """Rows before the first text token of an attributed sequence: the start rows (a decoder-only
        model's BOS not kept), and an encoder-decoder's language tag."""
        return self.start_offset(first_token, bos, keep)

    def input_context_scores(self, seq, lead: int, has_lang_tag: bool) -> list[float]:
        """The first attributed step's scores of the input tokens (a decoder-only input is the target prefix)."""
        return seq.target_attributions[:, 0].tolist()[lead:]

    def output_context_skip(self, model, prefix: str, input_full_tokens: list[str], sep: str, keep: list[str]) -> int:
        """Target rows before the output context: the input's, then the output template's prefix."""
        if prefix:
            prefix = sep + prefix
        return len(texts.filtered_tokens(model, prefix, keep, is_target=True)) + len(input_full_tokens)


class EncoderDecoderLayout(DecoderOnlyLayout):
    """An encoder-decoder: the output is its own target sequence."""

    targets_apart = True
    trailing_tokens = 1
    pads_lone_token = True
    attribute_target_for_output_context = True

    def full_output(self, input_full_text: str, output_full_text: str, sep: str) -> str:
        return output_full_text

    def contextless_texts(self, contextless_input: str, contextless_current: str, sep: str) -> tuple[str, str]:
        return contextless_input, contextless_current

    def contrast_input(self, contextless_input: str, contextless_prefix: str, sep: str) -> str:
        return contextless_input

    def current_tokens(self, model, output_current_text: str, output_full_tokens: list[str], offset: int,
                       keep: list[str]) -> list[str]:
        return texts.filtered_tokens(model, output_current_text, keep, is_target=True)

    def generated_part(self, ids: list[int], prompt_length: int) -> list[int]:
        return ids  # the target alone

    def generation_input(self, model, input_full_text: str, current_prefix: str, output_context: str | None,
                         current_prefix_template: str, generation_kwargs: dict[str, Any], sep: str
                         ) -> tuple[str, str]:
        """The decoder continues the output context, given as ``decoder_input_ids`` (with the language tag a
        ``forced_bos_token_id`` asks for)."""
        if output_context is None:
            return input_full_text, current_prefix
        decoder_ids = model.encode(current_prefix, as_targets=True, add_special_tokens=False).input_ids
        if "forced_bos_token_id" in generation_kwargs:
            decoder_ids[0, 0] = generation_kwargs["forced_bos_token_id"]
        generation_kwargs["decoder_input_ids"] = decoder_ids
        return input_full_text, current_prefix

    def contextless_generation(self, model, input_current_text: str, prefix: str, generation_kwargs: dict[str, Any],
                               sep: str) -> str:
        """Two new tokens: the EOS encoder-decoders always end with, and the token."""
        generation_kwargs["max_new_tokens"] = 2
        decoder_ids = model.encode(prefix, as_targets=True).input_ids
        if int(decoder_ids[0, -1]) == model.special_ids.eos:
            decoder_ids = decoder_ids[:, :-1]
        generation_kwargs["decoder_input_ids"] = decoder_ids
        return input_current_text

    def contrast_kwargs(self, model, inputs: list[str], outputs: list[str], starts: list[int] | None,
                        contrast_inputs: list[str], contrast_outputs: list[str]) -> dict[str, Any]:
        return {"contrast_targets": contrast_outputs, "contrast_sources": contrast_inputs}

    def start_offset(self, first_token: str, bos: str | None, keep: list[str]) -> int:
        return 1

    def context_lead(self, first_token: str, bos: str | None, keep: list[str], has_lang_tag: bool) -> int:
        return self.start_offset(first_token, bos, keep) + int(has_lang_tag)

    def input_context_scores(self, seq, lead: int, has_lang_tag: bool) -> list[float]:
        """The source scores (after the language tag and its separator, when there is one)."""
        scores = seq.source_attributions[:, 0].tolist()
        return scores[2:] if has_lang_tag else scores

    def output_context_skip(self, model, prefix: str, input_full_tokens: list[str], sep: str, keep: list[str]) -> int:
        return len(texts.filtered_tokens(model, prefix, keep, is_target=True))


_LAYOUTS = {False: DecoderOnlyLayout(), True: EncoderDecoderLayout()}


def context_layout(model) -> DecoderOnlyLayout:
    """The layout of an :class:`~inseq_lightning.models.AttributionModel` (its adapter's kind, which the wrapper
    exposes under inseq's attribute name)."""
    return _LAYOUTS[bool(model.is_encoder_decoder)]
