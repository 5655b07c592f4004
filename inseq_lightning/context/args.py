"""AttributeContextArgs: the arguments of context attribution, inseq 0.7.1's names, defaults and checks.

One flat dataclass with the fields of inseq's ``AttributeContextArgs`` (its input, method, output and base
attribution arguments), in inseq's order so that saved ``info`` dictionaries line up. Each field's metadata holds
its command-line help and aliases; ``inseq-lightning attribute-context`` builds its flags from them.
"""

import logging
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from ..errors import InvalidInputError

logger = logging.getLogger(__name__)


class HandleOutputContextSetting(Enum):
    """How an output context generated together with the current output is split from it."""

    MANUAL = "manual"  # propose a split, ask the user to confirm or correct it
    AUTO = "auto"  # take the proposed split
    PRE = "pre"  # never ask: the output context must be given


def _cli(help_text: str, *aliases: str) -> dict[str, Any]:
    """A field's metadata: its command-line help and aliases."""
    return {"help": help_text, "aliases": aliases}


@dataclass
class AttributeContextArgs:
    """Arguments of :func:`~inseq_lightning.context.attribute_context` (inseq 0.7.1's, same names and defaults).

    Texts: ``input_current_text`` (required), ``input_context_text``, ``output_context_text``,
    ``output_current_text`` (generated when omitted), the ``input_template`` / ``output_template`` joining context
    and current (``"{context} {current}"`` when a context is given, ``"{current}"`` otherwise) and the
    ``contextless_*`` templates used without context. Context sensitivity (CTI): ``context_sensitivity_metric``
    (a contrastive step function, ``kl_divergence`` by default), ``context_sensitivity_std_threshold``,
    ``context_sensitivity_topk``. Contextual cues (CCI): ``attribution_method``, ``attributed_fn`` (a contrastive
    one compares with the contextless prediction), ``attribution_kwargs``, aggregation options. Outputs:
    ``save_path`` (JSON), ``viz_path`` (HTML), ``show_viz`` (console), ``add_output_info``.

    Raises:
        InvalidInputError: templates without ``{current}``, a ``{context}`` placeholder without its text, a
            context text its template does not use, and the other inconsistencies inseq refuses.
    """

    # inseq's AttributeContextOutputArgs
    show_intermediate_outputs: bool = field(
        default=False, metadata=_cli("show the CTI and CCI attribution outputs as they are computed"))
    save_path: str | None = field(default=None, metadata=_cli("write the output here as JSON", "-o"))
    add_output_info: bool = field(default=True, metadata=_cli("keep these arguments in the output (its info)"))
    viz_path: str | None = field(default=None, metadata=_cli("write the visualization here as HTML"))
    show_viz: bool = field(default=True, metadata=_cli("print the visualization to the console"))
    # inseq's AttributeBaseArgs
    model_name_or_path: str | None = field(
        default=None, metadata=_cli("local model directory (save_pretrained format)", "-m"))
    attribution_method: str | None = field(
        default="saliency", metadata=_cli("attribution method of the contextual cues imputation (CCI)", "-a"))
    device: str | None = field(
        default=None, metadata=_cli("device of the model (default: cuda when available, else cpu)", "--dev"))
    attributed_fn: str | None = field(default=None, metadata=_cli(
        "step function attributed in CCI (default: probability); a contrastive one (e.g. contrast_prob_diff) "
        "compares the contextual prediction with the contextless one", "-fn"))
    attribution_selectors: list[int] | None = field(
        default=None, metadata=_cli("indices the aggregators apply to (inseq's select_idx)"))
    attribution_aggregators: list[str] | None = field(
        default=None, metadata=_cli("aggregators reducing CCI scores to one per token"))
    normalize_attributions: bool = field(default=False, metadata=_cli("normalize CCI scores to sum to 1"))
    rescale_attributions: bool = field(default=False, metadata=_cli("rescale CCI scores by their absolute maximum"))
    model_kwargs: dict = field(default_factory=dict, metadata=_cli("from_pretrained arguments of the model, as JSON"))
    tokenizer_kwargs: dict = field(
        default_factory=dict, metadata=_cli("from_pretrained arguments of the tokenizer, as JSON"))
    generation_kwargs: dict = field(default_factory=dict, metadata=_cli("generate() arguments, as JSON"))
    attribution_kwargs: dict = field(
        default_factory=dict, metadata=_cli("arguments of the CCI attribution method and attributed function, as JSON"))
    # inseq's AttributeContextMethodArgs
    context_sensitivity_metric: str = field(default="kl_divergence", metadata=_cli(
        "contrastive step function comparing the predictions with and without context (CTI)"))
    handle_output_context_strategy: str = field(default=HandleOutputContextSetting.MANUAL.value, metadata=_cli(
        "how an output context generated with the current output is split from it: manual (confirm a proposed "
        "split), auto (take it), pre (refuse: give --output_context_text)"))
    contextless_output_next_tokens: list[str] = field(default_factory=list, metadata=_cli(
        "one token per context-sensitive token, forced as the contextless prediction (contrastive -fn)"))
    prompt_user_for_contextless_output_next_tokens: bool = field(default=False, metadata=_cli(
        "ask for the contextless prediction of each context-sensitive token (contrastive -fn)"))
    special_tokens_to_keep: list[str] = field(
        default_factory=list, metadata=_cli("special tokens kept in texts, e.g. a <brk> separator"))
    decoder_input_output_separator: str = field(
        default=" ", metadata=_cli("separator between a decoder-only model's input and output"))
    context_sensitivity_std_threshold: float = field(default=1.0, metadata=_cli(
        "context-sensitive tokens: |score| at least the mean plus this many standard deviations"))
    context_sensitivity_topk: int | None = field(
        default=None, metadata=_cli("keep at most this many context-sensitive tokens"))
    attribution_std_threshold: float = field(default=1.0, metadata=_cli(
        "contextual cues shown: |score| at least the mean plus this many standard deviations"))
    attribution_topk: int | None = field(default=None, metadata=_cli("show at most this many contextual cues"))
    # inseq's AttributeContextInputArgs
    input_current_text: str = field(
        default="", metadata=_cli("the input whose output is attributed (prompt or source text)"))
    input_context_text: str | None = field(
        default=None, metadata=_cli("the input context, {context} in --input_template"))
    input_template: str | None = field(default=None, metadata=_cli(
        "how context and current input are joined (default: '{context} {current}' with a context)"))
    output_context_text: str | None = field(
        default=None, metadata=_cli("the output context, {context} in --output_template"))
    output_current_text: str | None = field(
        default=None, metadata=_cli("the output whose tokens are tested (generated when omitted)"))
    output_template: str | None = field(default=None, metadata=_cli(
        "how context and current output are joined (default: '{context} {current}' with a context)"))
    contextless_input_current_text: str | None = field(default=None, metadata=_cli(
        "the input without context, a template with {current} (default: '{current}')"))
    contextless_output_current_text: str | None = field(default=None, metadata=_cli(
        "the output without context, a template with {current} (default: '{current}')"))

    def __post_init__(self):
        strategies = [s.value for s in HandleOutputContextSetting]
        if self.handle_output_context_strategy not in strategies:
            raise InvalidInputError(f"handle_output_context_strategy must be one of {', '.join(strategies)}, "
                                    f"got {self.handle_output_context_strategy!r}")
        if self.contextless_output_next_tokens and self.prompt_user_for_contextless_output_next_tokens:
            raise InvalidInputError("give contextless_output_next_tokens or prompt_user_for_contextless_output_next_"
                                    "tokens, not both")
        if not isinstance(self.input_current_text, str) or not self.input_current_text.strip():
            raise InvalidInputError("input_current_text must be a non-empty string: the input whose output is "
                                    "attributed")
        if self.input_template is None:
            self.input_template = "{current}" if self.input_context_text is None else "{context} {current}"
        if self.output_template is None:
            self.output_template = "{current}" if self.output_context_text is None else "{context} {current}"
        if self.contextless_input_current_text is None:
            self.contextless_input_current_text = "{current}"
        if self.contextless_output_current_text is None:
            self.contextless_output_current_text = "{current}"
        for name in ("input_template", "output_template", "contextless_input_current_text",
                     "contextless_output_current_text"):
            if "{current}" not in getattr(self, name):
                raise InvalidInputError(f"{name} {getattr(self, name)!r} has no {{current}} placeholder; add it "
                                        "where the current text goes")
        self.has_input_context = "{context}" in self.input_template
        self.has_output_context = "{context}" in self.output_template
        for side in ("input", "output"):
            text, template = getattr(self, f"{side}_context_text"), getattr(self, f"{side}_template")
            if text and "{context}" not in template:  # inseq warns and drops the context
                raise InvalidInputError(f"{side}_context_text is given but {side}_template {template!r} has no "
                                        f"{{context}} placeholder: add {{context}} to the template or drop the context")
        if self.has_input_context and not self.input_context_text:
            raise InvalidInputError(f"input_template {self.input_template!r} has a {{context}} placeholder but no "
                                    "input_context_text is given")
        if self.has_output_context and self.output_template.find("{context}") > self.output_template.find("{current}"):
            raise InvalidInputError(f"{{context}} must come before {{current}} in output_template "
                                    f"{self.output_template!r}")
        if (self.handle_output_context_strategy == HandleOutputContextSetting.PRE.value
                and self.has_output_context and not self.output_context_text):
            raise InvalidInputError("handle_output_context_strategy='pre' with {context} in output_template needs "
                                    "output_context_text (nobody is asked for it)")
        if not self.output_template.endswith("{current}"):
            suffix = self.output_template.partition("{current}")[2]
            logger.warning(f"output_template ends with {suffix!r} after {{current}}: those tokens are left out of "
                           "context sensitivity detection; force --output_current_text if the model does not "
                           "produce them")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.to_dict()})"

    @classmethod
    def _to_dict(cls, value: Any) -> Any:
        if value is None or isinstance(value, str | int | float | bool):
            return value
        if isinstance(value, dict):
            return {k: cls._to_dict(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [cls._to_dict(v) for v in value]
        return str(value)

    def to_dict(self) -> dict[str, Any]:
        """Every argument as JSON values (inseq's ``to_dict``: ``has_input_context`` and
        ``has_output_context`` included, other objects as their ``str``)."""
        return self._to_dict(self.__dict__)
