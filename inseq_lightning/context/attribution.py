"""Context attribution (PECoRe, Sarti et al., 2024) as inseq 0.7.1's ``attribute_context`` computes it.

Two steps, for decoder-only and encoder-decoder models, with input and/or output context:

1. **Context-sensitive token identification (CTI).** Each token of the output is scored with a contrastive
   step function (``kl_divergence`` by default) between the model's prediction without context (the
   attributed side) and with it (the contrast side); tokens whose |score| is at least the mean plus
   ``context_sensitivity_std_threshold`` standard deviations are context-sensitive. Here that is one
   ``dummy`` attribution: one forward of both conditions' rows for all tokens (inseq: two forwards per token).
2. **Contextual cues imputation (CCI).** The prediction of each context-sensitive token is attributed to the
   context tokens (``attribution_method``, ``attributed_fn``; a contrastive function compares it with the
   contextless prediction). Here every token's attribution comes from one batched call (two when some need
   ``contrast_force_inputs`` and others not); inseq runs one call per token.

Example:
    >>> import inseq_lightning as il
    >>> model = il.load_model(hf_model, "saliency", tokenizer=tokenizer)  # doctest: +SKIP
    >>> out = il.attribute_context(model=model, input_context_text="George was sick yesterday.",
    ...                            input_current_text="His colleagues asked him", show_viz=False,
    ...                            generation_kwargs={"max_new_tokens": 10})  # doctest: +SKIP
    >>> [(cci.cti_token, cci.input_context_scores) for cci in out.cci_scores]  # doctest: +SKIP
"""

import copy
import json
from dataclasses import dataclass

from ..attr.methods import get_method
from ..attr.step_functions import get_step_function, list_step_functions, uses_contrast
from ..data.outputs import FeatureAttributionOutput, FeatureAttributionSequenceOutput
from ..errors import InvalidInputError, UnknownStepFunctionError
from ..models import AttributionModel, load_model
from ..models.tokenization import reused_tokenizations
from ..utils.model_state import preserve_model_state
from .args import AttributeContextArgs
from .layout import context_layout
from .output import AttributeContextOutput, CCIOutput
from .texts import (
    bos_token,
    contextless_output,
    filtered_tokens,
    format_template,
    pad_token,
    prepare_outputs,
    rank_tokens,
    text_to_tokens,
    tokens_to_text,
)


def attribute_context(args: AttributeContextArgs | None = None, model: AttributionModel | None = None,
                      **kwargs) -> AttributeContextOutput:
    """Find the context-sensitive tokens of an output and the context tokens each relies on.

    Args:
        args: the arguments (inseq's call: ``attribute_context(args)``); or pass them as keywords.
        model: the :class:`~inseq_lightning.models.AttributionModel` to use; default: loaded from
            ``args.model_name_or_path`` (a local directory) with ``attribution_method``, ``device``,
            ``model_kwargs`` and ``tokenizer_kwargs``.
        **kwargs: the fields of :class:`AttributeContextArgs`, when ``args`` is not given.

    Returns:
        An :class:`AttributeContextOutput` (also written to ``save_path`` / ``viz_path`` and printed with
        ``show_viz``, which is on by default as in inseq).

    Raises:
        InvalidInputError: arguments that cannot be used (see :class:`AttributeContextArgs`), a metric that is not
            contrastive, a model that cannot generate when an output must be generated. The model is left as it
            was (modes, ``requires_grad``, RNG streams).
    """
    if args is None:
        args = AttributeContextArgs(**kwargs)
    elif kwargs:
        raise InvalidInputError(f"pass the arguments as AttributeContextArgs or as keywords, not both (got "
                                f"{', '.join(sorted(kwargs))} besides args)")
    if model is None:
        if args.model_name_or_path is None:
            raise InvalidInputError("no model: pass model= (an AttributionModel) or model_name_or_path (a local "
                                    "model directory)")
        check_names(args)
        model = load_model(args.model_name_or_path, args.attribution_method, device=args.device,
                           model_kwargs=copy.deepcopy(args.model_kwargs) or None,
                           tokenizer_kwargs=copy.deepcopy(args.tokenizer_kwargs) or None)
    elif not isinstance(model, AttributionModel):
        raise InvalidInputError(f"model must be an AttributionModel (inseq_lightning.load_model(model, "
                                f"tokenizer=...)), not {type(model).__name__}")
    return attribute_context_with_model(args, model)


def attribute_context_with_model(args: AttributeContextArgs, model: AttributionModel) -> AttributeContextOutput:
    """:func:`attribute_context` with a loaded model (inseq's function of the same name). ``args`` is left as
    given; the output's ``info`` holds a copy with the outputs filled in."""
    check_names(args)
    args = copy.copy(args)
    args.generation_kwargs = dict(args.generation_kwargs)
    if args.model_name_or_path is None:
        args.model_name_or_path = model.info["model_name"]
    # The same few texts are tokenized over a dozen times between the two steps: once each is enough.
    with preserve_model_state(model.model), reused_tokenizations():
        output, cti_threshold = _attribute(args, model)
    if args.show_viz or args.viz_path:
        from .viz import visualize_attribute_context

        visualize_attribute_context(output, model, cti_threshold, args.show_viz, args.viz_path)
    if not args.add_output_info:
        output.info = None
    if args.save_path:
        with open(args.save_path, "w", encoding="utf-8") as f:
            json.dump(output.to_dict(), f, indent=4)
    return output


def contrastive_step_functions() -> list[str]:
    """The step functions that compare with contrast inputs: the choices of ``context_sensitivity_metric``."""
    return [name for name in list_step_functions() if uses_contrast(get_step_function(name))]


def check_names(args: AttributeContextArgs) -> None:
    """The method, metric and attributed function exist (and the metric is contrastive), before any work."""
    get_method(args.attribution_method)
    contrastive = contrastive_step_functions()
    if args.context_sensitivity_metric not in list_step_functions():
        raise UnknownStepFunctionError(args.context_sensitivity_metric, contrastive)
    if args.context_sensitivity_metric not in contrastive:
        raise InvalidInputError(f"context_sensitivity_metric {args.context_sensitivity_metric!r} does not compare "
                                f"with the contextless prediction; choose a contrastive one: {', '.join(contrastive)}")
    if args.attributed_fn is not None:
        get_step_function(args.attributed_fn)


@dataclass
class _Cue:
    """One context-sensitive token, ready for its contextual cues attribution."""

    cti_idx: int
    cti_score: float
    cti_token: str
    contextual_output: str
    pos_start: int
    contextless_output: str | None = None
    contrast_token: str | None = None
    force_inputs: bool = False


def _attribute(args: AttributeContextArgs, model: AttributionModel) -> tuple[AttributeContextOutput, float]:
    """Both steps; ``args`` (a copy) receives the output texts, as inseq's does."""
    keep, sep, layout = args.special_tokens_to_keep, args.decoder_input_output_separator, context_layout(model)
    has_lang_tag = "tgt_lang" in args.tokenizer_kwargs
    if has_lang_tag and "forced_bos_token_id" not in args.generation_kwargs:
        lang_ids = getattr(model.tokenizer, "lang_code_to_id", None)
        if lang_ids is None or args.tokenizer_kwargs["tgt_lang"] not in lang_ids:
            raise InvalidInputError(f"tokenizer_kwargs' tgt_lang {args.tokenizer_kwargs['tgt_lang']!r} is not a "
                                    "language of this tokenizer; pass generation_kwargs' forced_bos_token_id")
        args.generation_kwargs["forced_bos_token_id"] = lang_ids[args.tokenizer_kwargs["tgt_lang"]]
    input_full_text = format_template(args.input_template, args.input_current_text, args.input_context_text)
    args.output_context_text, args.output_current_text = prepare_outputs(
        model, args.input_context_text, input_full_text, args.output_context_text, args.output_current_text,
        args.output_template, args.handle_output_context_strategy, copy.deepcopy(args.generation_kwargs), keep, sep)
    output_full_text = layout.full_output(
        input_full_text, format_template(args.output_template, args.output_current_text, args.output_context_text), sep)
    input_context_tokens = (filtered_tokens(model, args.input_context_text, keep)
                            if args.input_context_text is not None else None)
    output_context_tokens = (filtered_tokens(model, args.output_context_text, keep, is_target=True)
                             if args.output_context_text is not None else None)
    input_full_tokens = filtered_tokens(model, input_full_text, keep)
    output_full_tokens = filtered_tokens(model, output_full_text, keep, is_target=True)
    contextless_input = args.contextless_input_current_text.format(current=args.input_current_text)
    contextless_input, contextless_current = layout.contextless_texts(
        contextless_input, args.contextless_output_current_text.format(current=args.output_current_text), sep)

    # Part 1: context-sensitive token identification
    cti_out = _context_sensitivity(model, args.context_sensitivity_metric, contextless_input, contextless_current,
                                   input_full_text, output_full_text)
    if args.show_intermediate_outputs:
        cti_out.show(do_aggregation=False)
    contextless_prefix = args.contextless_output_current_text.split("{current}")[0]
    start = int(has_lang_tag) + len(filtered_tokens(model, contextless_prefix, keep, is_target=True))
    cti_scores = cti_out.step_scores[args.context_sensitivity_metric][start:].tolist()
    cti_tokens = [t.token for t in cti_out.target][start + cti_out.attr_pos_start:]
    if layout.trailing_tokens:  # the EOS every encoder-decoder target ends with
        cti_scores, cti_tokens = cti_scores[:-layout.trailing_tokens], cti_tokens[:-layout.trailing_tokens]
    ranked, threshold = rank_tokens(cti_tokens, cti_scores, args.context_sensitivity_std_threshold,
                                    args.context_sensitivity_topk)
    output = AttributeContextOutput(
        input_context=args.input_context_text, input_context_tokens=input_context_tokens,
        output_context=args.output_context_text, output_context_tokens=output_context_tokens,
        output_current=args.output_current_text, output_current_tokens=cti_tokens, cti_scores=cti_scores, info=args)

    # Part 2: contextual cues imputation
    contrastive = args.attributed_fn is not None and uses_contrast(get_step_function(args.attributed_fn))
    if contrastive:  # inseq appends the prefix again for every token (the same text by default)
        contextless_input = layout.contrast_input(contextless_input, contextless_prefix, sep)
    # Where the current output starts among the full output's tokens, counted back with the CTI tokens: the
    # current output as the model reads it after the input. inseq counts the current output tokenized alone,
    # one token off when its first word tokenizes differently there (byte-level "thanked": t|h|anked alone,
    # Ġth|anked after a space; a lone Ġ before a generated word), and then attributes a neighbour of each
    # sensitive token.
    output_offset = len(output_full_tokens) - len(cti_tokens)
    current_tokens = layout.current_tokens(model, args.output_current_text, output_full_tokens, output_offset, keep)
    cues = [_prepare_cue(model, args, rank, item, ranked, output_full_tokens, output_offset, current_tokens,
                         contextless_input if contrastive else None, has_lang_tag)
            for rank, item in enumerate(ranked)]
    contextual_input = tokens_to_text(model, input_full_tokens, skip_special_tokens=False).lstrip(" ")
    sequences = _attribute_cues(model, args, contextual_input, contextless_input if contrastive else None, cues)
    for cue, seq in zip(cues, sequences, strict=True):
        if args.show_intermediate_outputs:
            seq.show(do_aggregation=False)
        input_scores, output_scores = _context_scores(model, args, seq, input_context_tokens, input_full_tokens,
                                                      output_context_tokens, has_lang_tag)
        output.cci_scores.append(CCIOutput(
            cti_idx=cue.cti_idx, cti_token=cue.cti_token, cti_score=cue.cti_score,
            contextual_output=cue.contextual_output, contrast_token=cue.contrast_token,
            contextless_output=cue.contextless_output, input_context_scores=input_scores,
            output_context_scores=output_scores))
    return output, threshold


def _context_sensitivity(model: AttributionModel, metric: str, contextless_input: str, contextless_output: str,
                         input_full_text: str, output_full_text: str) -> FeatureAttributionSequenceOutput:
    """Every output token's ``metric`` between the contextless prediction (attributed side) and the contextual
    one (contrast side, aligned right to left): a ``dummy`` attribution, two forwards."""
    kwargs = context_layout(model).contrast_kwargs(model, [contextless_input.rstrip(" ")], [contextless_output], None,
                                                   [input_full_text], [output_full_text])
    return model.attribute(contextless_input.rstrip(" "), contextless_output, method="dummy", step_scores=[metric],
                           show_progress=False, **kwargs)[0]


def _prepare_cue(model: AttributionModel, args: AttributeContextArgs, rank: int, item: tuple[int, float, str],
                 ranked: list, output_full_tokens: list[str], output_offset: int, current_tokens: list[str],
                 contextless_input: str | None, has_lang_tag: bool) -> _Cue:
    """The contextual output up to a context-sensitive token, the position to attribute and, for a contrastive
    ``attributed_fn``, the contextless output it is compared with."""
    cti_idx, cti_score, cti_token = item
    layout, keep = context_layout(model), args.special_tokens_to_keep
    end = output_offset + cti_idx + 1
    contextual_output = tokens_to_text(model, output_full_tokens[:end], skip_special_tokens=False).lstrip(" ")
    if not contextual_output:
        output_tokens = [output_full_tokens[end - 1]] + ([pad_token(model)] if layout.pads_lone_token else [])
        contextual_output = tokens_to_text(model, output_tokens, skip_special_tokens=True)
    else:
        output_tokens = text_to_tokens(model, contextual_output, as_targets=layout.targets_apart)
    bos_offset = layout.start_offset(output_tokens[0], bos_token(model), keep)
    cue = _Cue(cti_idx, cti_score, cti_token, contextual_output, end - 1 + bos_offset + int(has_lang_tag))
    if contextless_input is not None:
        cue.contextless_output = contextless_output(
            model, contextless_input, current_tokens, cti_idx, len(ranked), args.contextless_output_next_tokens,
            args.prompt_user_for_contextless_output_next_tokens, rank, args.decoder_input_output_separator, keep,
            copy.deepcopy(args.generation_kwargs))
        contextless_tokens = text_to_tokens(model, cue.contextless_output, as_targets=layout.targets_apart)
        last = -1 - layout.trailing_tokens  # the last token before an encoder-decoder's EOS
        cue.contrast_token = contextless_tokens[last]
        cue.force_inputs = args.attributed_fn == "kl_divergence" or output_tokens[last] == contextless_tokens[last]
    return cue


def _attribute_cues(model: AttributionModel, args: AttributeContextArgs, contextual_input: str,
                    contextless_input: str | None, cues: list[_Cue]) -> list[FeatureAttributionSequenceOutput]:
    """The aggregated attribution of every cue's token, one batched call per ``contrast_force_inputs`` value."""
    results: dict[int, FeatureAttributionSequenceOutput] = {}
    layout = context_layout(model)
    for force in sorted({cue.force_inputs for cue in cues}):
        group = [i for i, cue in enumerate(cues) if cue.force_inputs == force]
        inputs = [contextual_input] * len(group)
        outputs = [cues[i].contextual_output for i in group]
        starts = [cues[i].pos_start for i in group]
        kwargs = dict(args.attribution_kwargs)
        if contextless_input is not None:
            contrasts = [cues[i].contextless_output for i in group]
            kwargs.update(layout.contrast_kwargs(model, inputs, outputs, starts, [contextless_input] * len(group),
                                                 contrasts), contrast_force_inputs=force)
        out = model.attribute(inputs, outputs, method=args.attribution_method, attributed_fn=args.attributed_fn,
                              attribute_target=layout.attribute_target_for_output_context and args.has_output_context,
                              attr_pos_start=starts, show_progress=False, **kwargs)
        for i, seq in zip(group, _aggregate(out, args), strict=True):
            results[i] = seq
    return [results[i] for i in range(len(cues))]


def _aggregate(out: FeatureAttributionOutput, args: AttributeContextArgs) -> FeatureAttributionOutput:
    """inseq's ``aggregate_attribution_scores``: one ``aggregate`` per (selector, aggregator) pair, else one with
    the aggregators (the method's default without) and no normalization unless asked for."""
    if args.attribution_selectors is not None and args.attribution_aggregators is not None:
        for select_idx, aggregator in zip(args.attribution_selectors, args.attribution_aggregators, strict=False):
            out = out.aggregate(aggregator=aggregator, normalize=args.normalize_attributions,
                                rescale=args.rescale_attributions, select_idx=select_idx,
                                do_post_aggregation_checks=False)
        return out
    return out.aggregate(aggregator=args.attribution_aggregators, normalize=args.normalize_attributions,
                         rescale=args.rescale_attributions)


def _context_scores(model: AttributionModel, args: AttributeContextArgs, seq: FeatureAttributionSequenceOutput,
                    input_context_tokens: list[str] | None, input_full_tokens: list[str],
                    output_context_tokens: list[str] | None, has_lang_tag: bool
                    ) -> tuple[list[float] | None, list[float] | None]:
    """The scores of the input and output context tokens, at the attributed token (the first attributed step)."""
    keep, layout = args.special_tokens_to_keep, context_layout(model)
    # The rows before the first text token: an encoder-decoder's decoder start token (and language tag), a
    # decoder-only model's BOS. inseq 0.7.1 skips only language tags, so it reads every context one row early
    # there (the start token's score first, the last context token's missing).
    lead = layout.context_lead(seq.target[0].token, bos_token(model), keep, has_lang_tag)
    input_scores = output_scores = None
    if args.has_input_context:
        input_scores = layout.input_context_scores(seq, lead, has_lang_tag)
        prefix = args.input_template.partition("{context}")[0]
        if "{current}" in prefix:
            prefix = prefix.format(current=args.input_current_text)
        skip = len(filtered_tokens(model, prefix, keep))
        input_scores = input_scores[skip : skip + len(input_context_tokens)]
    if args.has_output_context:
        output_scores = seq.target_attributions[:, 0].tolist()[lead:]
        skip = layout.output_context_skip(model, args.output_template.partition("{context}")[0], input_full_tokens,
                                          args.decoder_input_output_separator, keep)
        output_scores = output_scores[skip : skip + len(output_context_tokens)]
    return input_scores, output_scores
