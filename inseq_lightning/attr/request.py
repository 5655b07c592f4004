"""One validated attribution request, built once by ``AttributionModel.attribute`` and passed down.

:func:`build_request` checks every argument and routes ``**kwargs`` by name between the method,
the attributed function and the step functions (a name none of them takes is an error), so the
engine, the methods and the step scorer receive one object instead of chains of positional arguments.
"""

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidInputError
from .backward import BackwardStrategy
from .contrast import CONTRAST_ARGUMENTS, ContrastSpec
from .methods import AttributionMethod, get_method
from .step_functions import StepFunction, get_step_function, step_function_kwargs, uses_contrast


@dataclass
class AttributionRequest:
    """What to compute, validated.

    Attributes:
        method_name / method / method_kwargs: the attribution method and its arguments.
        attributed_fn / attributed_fn_name / attributed_fn_kwargs: the function whose value is attributed.
        step_functions / step_function_kwargs: step scores computed alongside, and their arguments.
        attribute_target: also attribute the target prefix (encoder-decoder).
        output_step_attributions: also return one output per step.
        include_eos_baseline: EOS positions get the UNK baseline too.
        skip_special_tokens: tokenize without special tokens.
        attr_pos_start / attr_pos_end: one position for all sequences, or one per sequence.
        memory_budget_bytes: what the vectorised backward may add (None: the model's default).
        backward: the per-step backward strategy.
        contrast: the contrastive arguments, when given.
    """

    method_name: str
    method: AttributionMethod
    method_kwargs: dict[str, Any]
    attributed_fn: StepFunction
    attributed_fn_name: str
    attributed_fn_kwargs: dict[str, Any]
    step_functions: dict[str, StepFunction]
    step_function_kwargs: dict[str, Any]
    attribute_target: bool = False
    output_step_attributions: bool = False
    include_eos_baseline: bool = False
    skip_special_tokens: bool = False
    attr_pos_start: int | list[int | None] | None = None
    attr_pos_end: int | list[int | None] | None = None
    memory_budget_bytes: int | None = None
    backward: BackwardStrategy = field(default_factory=BackwardStrategy)
    contrast: ContrastSpec | None = None


def build_request(
    n_inputs: int,
    method_name: str,
    attributed_fn: str | Callable | None,
    default_attributed_fn: str,
    step_scores: Sequence[str],
    kwargs: dict[str, Any],
    attribute_target: bool = False,
    output_step_attributions: bool = False,
    include_eos_baseline: bool = False,
    skip_special_tokens: bool = False,
    attr_pos_start=None,
    attr_pos_end=None,
    memory_budget_bytes: int | None = None,
    backward_strategy: BackwardStrategy | None = None,
) -> AttributionRequest:
    """Validate the arguments of ``attribute()`` into an :class:`AttributionRequest`.

    Args:
        n_inputs: number of input texts (per-sequence arguments must have one entry each).
        method_name: attribution method name.
        attributed_fn: step function name or callable; None for ``default_attributed_fn``.
        default_attributed_fn: the model's default attributed function name.
        step_scores: step function names.
        kwargs: the remaining keyword arguments of ``attribute()``, routed by name.
        attribute_target, output_step_attributions, include_eos_baseline, skip_special_tokens,
        attr_pos_start, attr_pos_end, memory_budget_bytes: as ``attribute()``.
        backward_strategy: the per-step backward strategy (default: :class:`BackwardStrategy`).
    """
    if memory_budget_bytes is not None and (not isinstance(memory_budget_bytes, int) or memory_budget_bytes < 0):
        raise InvalidInputError(
            f"memory_budget_bytes must be a number of bytes >= 0 (0: one step per backward) or None for the "
            f"default, got {memory_budget_bytes!r}"
        )
    method = get_method(method_name)
    if attribute_target and not method.supports_attribute_target:
        raise InvalidInputError(f"{method_name} attributes token ids, not embeddings: it cannot attribute_target")
    score_fn, score_fn_name = _resolve_attributed_fn(attributed_fn, default_attributed_fn)
    step_fns = {name: get_step_function(name) for name in step_scores}
    method_kwargs, score_kwargs, step_kwargs = route_kwargs(method, score_fn, step_fns, dict(kwargs))
    for name, value in (("attr_pos_start", attr_pos_start), ("attr_pos_end", attr_pos_end)):
        if isinstance(value, list | tuple) and len(value) != n_inputs:
            raise InvalidInputError(f"{name} has {len(value)} positions for {n_inputs} input texts; "
                                    "pass one per text, or one int for all")
    contrast = ContrastSpec.from_kwargs([score_kwargs, step_kwargs], n_inputs)
    needs_contrast = [name for name, fn in [(score_fn_name, score_fn), *step_fns.items()] if uses_contrast(fn)]
    if contrast is None and needs_contrast:
        raise InvalidInputError(f"{', '.join(needs_contrast)} compare(s) with contrast inputs: pass contrast_targets "
                                "(alternative targets) or contrast_sources (alternative sources/prompts)")
    return AttributionRequest(
        method_name=method_name, method=method, method_kwargs=method_kwargs,
        attributed_fn=score_fn, attributed_fn_name=score_fn_name, attributed_fn_kwargs=score_kwargs,
        step_functions=step_fns, step_function_kwargs=step_kwargs,
        attribute_target=attribute_target, output_step_attributions=output_step_attributions,
        include_eos_baseline=include_eos_baseline, skip_special_tokens=skip_special_tokens,
        attr_pos_start=list(attr_pos_start) if isinstance(attr_pos_start, tuple) else attr_pos_start,
        attr_pos_end=list(attr_pos_end) if isinstance(attr_pos_end, tuple) else attr_pos_end,
        memory_budget_bytes=memory_budget_bytes, backward=backward_strategy or BackwardStrategy(), contrast=contrast,
    )


def _resolve_attributed_fn(attributed_fn, default: str) -> tuple[Callable, str]:
    if attributed_fn is None:
        return get_step_function(default), default
    if isinstance(attributed_fn, str):
        return get_step_function(attributed_fn), attributed_fn
    if callable(attributed_fn):
        return attributed_fn, getattr(attributed_fn, "__name__", "custom")
    raise InvalidInputError(f"attributed_fn must be a step function name or a callable, not {attributed_fn!r}")


def route_kwargs(method: AttributionMethod, score_fn, step_fns: dict[str, StepFunction],
                 kwargs: dict[str, Any]) -> tuple[dict, dict, dict]:
    """Split ``kwargs`` between the method, the attributed function and the step functions (inseq's
    ``attribution_args``/``attributed_fn_args``/``step_scores_args`` dicts are honoured); a name none
    of them accepts is an error rather than silently ignored."""
    method_params = set(inspect.signature(method.attribute).parameters) - {"self", "ctx", "kwargs"}
    attribution_args = dict(kwargs.pop("attribution_args", {}) or {})
    score_kwargs = dict(kwargs.pop("attributed_fn_args", {}) or {})
    step_kwargs = dict(kwargs.pop("step_scores_args", {}) or {})
    method_kwargs = {k: v for k, v in kwargs.items() if k in method_params}
    method_kwargs.update(attribution_args)
    score_kwargs.update(step_function_kwargs(score_fn, kwargs))
    used = set(method_kwargs) | set(score_kwargs)
    for fn in step_fns.values():
        taken = step_function_kwargs(fn, kwargs)
        step_kwargs.update(taken)
        used |= set(taken)
    unknown = sorted(set(kwargs) - used)
    if unknown:
        hint = ""
        if set(unknown) & set(CONTRAST_ARGUMENTS):
            hint = " (contrast arguments are taken by the contrastive step functions: e.g. step_scores=" \
                   "['contrast_prob_diff'] or attributed_fn='contrast_prob_diff')"
        raise InvalidInputError(
            f"Unknown argument(s) {', '.join(unknown)}: not taken by method {method.name!r} "
            f"(takes {', '.join(sorted(method_params)) or 'none'}), the attributed function or the step functions{hint}"
        )
    return method_kwargs, score_kwargs, step_kwargs
