"""Step functions: one score per generated token, usable as step scores and as attribution targets.

A step function receives a :class:`StepFunctionArgs` whose ``forward_output.logits`` has shape
``[M, 1, vocab]`` (the logits that predict each target token) and ``target_ids`` of shape ``[M]``,
plus its own keyword arguments, and returns a ``[M]`` tensor.

The built-in functions are called once for all steps of all sequences together (M = sequences x
steps; ``decoder_input_ids`` then hold each row's whole sequence). A function registered with
:func:`register_step_function` is called as inseq calls it: once per step (rows grouped by prefix
length), with ``decoder_input_ids``/``decoder_attention_mask``/``decoder_input_embeds`` holding the
prefix before the predicted token, so functions written for inseq work unchanged.

The seven contrastive functions compare each step with the contrast inputs of
:mod:`~inseq_lightning.attr.contrast` (``contrast_targets``, ``contrast_sources``,
``contrast_targets_alignments``, ``contrast_force_inputs``), whose logits come from one forward.
"""

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers.utils import ModelOutput

from ..errors import InvalidInputError, UnknownStepFunctionError
from ..utils.registry import Registry


@dataclass
class StepFunctionArgs:
    """What every step function receives (the inseq field names are kept).

    Attributes:
        attribution_model: the :class:`~inseq_lightning.models.AttributionModel` in use.
        forward_output: a ``ModelOutput`` whose ``logits`` are ``[M, 1, vocab]``.
        target_ids: ``[M]`` ids of the tokens predicted at each step.
        decoder_input_ids / decoder_attention_mask: ``[M, T]`` full (not prefix) decoder inputs of the
            sequence each row belongs to; causal models only look left, so the prefix is implied.
        encoder_input_ids / encoder_attention_mask: ``[M, S]`` (encoder-decoder only).
        is_attributed_fn: True when the function is the attribution target.
        forward_again: re-runs the shared forward with the model's current modes and returns fresh
            ``[M, vocab]`` logits (used by ``mc_dropout_prob_avg``).
        contrast: the contrast inputs' view of each row (:class:`ContrastView`), when the call has any.
    """

    attribution_model: Any
    forward_output: ModelOutput
    target_ids: torch.Tensor
    decoder_input_ids: torch.Tensor
    decoder_attention_mask: torch.Tensor
    is_attributed_fn: bool = False
    encoder_input_ids: torch.Tensor | None = None
    encoder_attention_mask: torch.Tensor | None = None
    decoder_input_embeds: torch.Tensor | None = None
    encoder_input_embeds: torch.Tensor | None = None
    forward_again: Callable[[], torch.Tensor] | None = field(default=None, repr=False)
    contrast: "ContrastView | None" = field(default=None, repr=False)


@dataclass
class ContrastView:
    """The contrast inputs seen from the rows of a :class:`StepFunctionArgs`.

    Attributes:
        target_ids: ``[M]`` the contrast token aligned with each row's step.
        logits: a callable returning ``[M, vocab]`` logits of the contrast forward that predict
            ``target_ids`` (computed once per batch, on first use).
        force_inputs: ``contrast_force_inputs``.
    """

    target_ids: torch.Tensor
    logits: Callable[[], torch.Tensor] = field(repr=False)
    force_inputs: bool = False


StepFunction = Callable[..., torch.Tensor]


def _logits(args: StepFunctionArgs) -> torch.Tensor:
    return args.forward_output.logits[:, -1, :]


def logit_fn(args: StepFunctionArgs) -> torch.Tensor:
    """Raw logit of the target token, ``z[y]``."""
    return _logits(args).gather(-1, args.target_ids.view(-1, 1)).squeeze(-1)


def probability_fn(args: StepFunctionArgs, logprob: bool = False) -> torch.Tensor:
    """``softmax(z)[y]``; with ``logprob=True`` the log-softmax."""
    logits = _logits(args)
    scores = logits.log_softmax(-1) if logprob else logits.softmax(-1)
    return scores.gather(-1, args.target_ids.view(-1, 1)).squeeze(-1)


def entropy_fn(args: StepFunctionArgs) -> torch.Tensor:
    """Entropy (nats) of the predictive distribution."""
    return torch.distributions.Categorical(logits=_logits(args)).entropy()


def crossentropy_fn(args: StepFunctionArgs) -> torch.Tensor:
    """``-ln p(y)``."""
    return F.cross_entropy(_logits(args), args.target_ids, reduction="none")


def perplexity_fn(args: StepFunctionArgs, base: str = "inseq") -> torch.Tensor:
    """Per-token perplexity. inseq computes ``2 ** crossentropy`` with the cross-entropy in nats;
    that is the default here so numbers match. ``base="e"`` gives the consistent ``exp(crossentropy)``."""
    ce = crossentropy_fn(args)
    if base == "e":
        return torch.exp(ce)
    if base != "inseq":
        raise ValueError(f"perplexity base must be 'inseq' (2**CE in nats, inseq's value) or 'e', not {base!r}")
    return 2**ce


def mc_dropout_prob_avg_fn(args: StepFunctionArgs, n_mcd_steps: int = 5, logprob: bool = False) -> torch.Tensor:
    """``(p - mean(p~)) / std(p~)`` over ``n_mcd_steps`` forwards with dropout on.

    The model is switched to train mode for the noisy forwards and put back in the exact modes it
    had afterwards (inseq leaves it in train mode).
    """
    if args.forward_again is None:
        raise RuntimeError("mc_dropout_prob_avg needs the engine's forward_again hook")
    original = probability_fn(args, logprob=logprob)
    model = args.attribution_model.model
    modes = {name: m.training for name, m in model.named_modules()}
    try:
        model.train()
        noisy = []
        for _ in range(n_mcd_steps):
            logits = args.forward_again()
            scores = logits.log_softmax(-1) if logprob else logits.softmax(-1)
            noisy.append(scores.gather(-1, args.target_ids.view(-1, 1)).squeeze(-1).to(original.device))
    finally:
        for name, m in model.named_modules():
            m.training = modes[name]
    noisy_t = torch.stack(noisy)
    return (original - noisy_t.mean(0)).div(noisy_t.std(0))


def top_p_size_fn(args: StepFunctionArgs, top_p: float = 0.9) -> torch.Tensor:
    """Number of tokens kept by a nucleus (top-p) mask: the smallest set of most likely tokens whose
    cumulative probability reaches ``top_p`` (inseq's mask, computed per row)."""
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    logits = _logits(args)
    sorted_logits, _ = torch.sort(logits, descending=False)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    removed = cumulative <= (1 - top_p)
    removed[..., -1:] = False
    return (~removed).sum(-1)


def _contrast_side(args: StepFunctionArgs, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``([M, vocab] logits, [M] ids)`` of the contrast side. As attributed function (without
    ``contrast_force_inputs``) the contrast token is scored on the original forward, so that the
    gradients of both terms flow to the attributed inputs (inseq's rule)."""
    if args.contrast is None:
        raise InvalidInputError(f"{name} compares with contrast inputs: pass contrast_targets (or contrast_sources) "
                                "to attribute()")
    if args.is_attributed_fn and not args.contrast.force_inputs:
        return _logits(args), args.contrast.target_ids
    return args.contrast.logits(), args.contrast.target_ids


def _gather(scores: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return scores.gather(-1, ids.view(-1, 1).to(scores.device)).squeeze(-1)


def contrast_logits_fn(args: StepFunctionArgs, contrast_sources=None, contrast_targets=None,
                       contrast_targets_alignments=None, contrast_force_inputs: bool = False,
                       skip_special_tokens: bool = False) -> torch.Tensor:
    """Logit of the contrast token given the contrast context (see :mod:`~inseq_lightning.attr.contrast`)."""
    logits, ids = _contrast_side(args, "contrast_logits")
    return _gather(logits, ids)


def contrast_prob_fn(args: StepFunctionArgs, contrast_sources=None, contrast_targets=None,
                     contrast_targets_alignments=None, logprob: bool = False, contrast_force_inputs: bool = False,
                     skip_special_tokens: bool = False) -> torch.Tensor:
    """Probability (``logprob``: log-probability) of the contrast token given the contrast context."""
    logits, ids = _contrast_side(args, "contrast_prob")
    return _gather(logits.log_softmax(-1) if logprob else logits.softmax(-1), ids)


def contrast_logits_diff_fn(args: StepFunctionArgs, contrast_sources=None, contrast_targets=None,
                            contrast_targets_alignments=None, contrast_force_inputs: bool = False,
                            skip_special_tokens: bool = False) -> torch.Tensor:
    """``logit(y) - logit(y')`` (Yin & Neubig, 2022)."""
    return logit_fn(args) - contrast_logits_fn(args)


def contrast_prob_diff_fn(args: StepFunctionArgs, contrast_sources=None, contrast_targets=None,
                          contrast_targets_alignments=None, logprob: bool = False,
                          contrast_force_inputs: bool = False, skip_special_tokens: bool = False) -> torch.Tensor:
    """``p(y) - p(y')``: which inputs made the model pick the target rather than the contrast."""
    return probability_fn(args, logprob=logprob) - contrast_prob_fn(args, logprob=logprob)


def pcxmi_fn(args: StepFunctionArgs, contrast_sources=None, contrast_targets=None, contrast_targets_alignments=None,
             contrast_force_inputs: bool = False, skip_special_tokens: bool = False) -> torch.Tensor:
    """Pointwise conditional cross-mutual information ``-log2(p(y) / p_contrast(y'))`` (Yin et al., 2021)."""
    return -torch.log2(torch.div(probability_fn(args), contrast_prob_fn(args)))


def in_context_pvi_fn(args: StepFunctionArgs, contrast_sources=None, contrast_targets=None,
                      contrast_targets_alignments=None, contrast_force_inputs: bool = False,
                      skip_special_tokens: bool = False) -> torch.Tensor:
    """In-context pointwise V-usable information ``-log p(y) + log p_contrast(y')`` (Lu et al., 2023)."""
    return -probability_fn(args, logprob=True) + contrast_prob_fn(args, logprob=True)


def kl_divergence_fn(args: StepFunctionArgs, contrast_sources=None, contrast_targets=None,
                     contrast_targets_alignments=None, top_k: int = 0, top_p: float = 1.0, min_tokens_to_keep: int = 1,
                     contrast_force_inputs: bool = False, skip_special_tokens: bool = False) -> torch.Tensor:
    """``KL(P || Q)`` between the original (P) and the contrast (Q) next-token distributions, after
    inseq's top-p then top-k filtering on the summed logits."""
    if args.is_attributed_fn and not contrast_force_inputs:
        raise InvalidInputError("kl_divergence as attributed function compares two forwards; pass "
                                "contrast_force_inputs=True to attribute it")
    if args.contrast is None:
        raise InvalidInputError("kl_divergence compares with contrast inputs: pass contrast_targets (or "
                                "contrast_sources) to attribute()")
    original, contrast = _logits(args), args.contrast.logits().to(_logits(args).device)
    original, contrast = _filter_logits(original, contrast, top_p, top_k, min_tokens_to_keep)
    return F.kl_div(contrast.log_softmax(-1), original.log_softmax(-1), reduction="none", log_target=True).sum(-1)


def _filter_logits(original: torch.Tensor, contrast: torch.Tensor, top_p: float, top_k: int,
                   min_tokens_to_keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """inseq's ``filter_logits`` with the "merged" strategy: the masks come from ``original + contrast``."""
    if top_k > original.size(-1) or top_k < 0:
        raise InvalidInputError(f"top_k must be an integer in [0, {original.size(-1)}], got {top_k}")
    if not 0 <= top_p <= 1:
        raise InvalidInputError(f"top_p must be in [0, 1], got {top_p}")
    if not isinstance(min_tokens_to_keep, int) or min_tokens_to_keep < 1:
        raise InvalidInputError(f"min_tokens_to_keep must be a positive integer, got {min_tokens_to_keep}")
    if top_p < 1.0:
        sorted_logits, sorted_indices = torch.sort(original + contrast, descending=False)
        remove = sorted_logits.softmax(-1).cumsum(-1) <= (1 - top_p)
        remove[..., -min_tokens_to_keep:] = False
        remove = remove.scatter(1, sorted_indices, remove)
        original, contrast = original.masked_fill(remove, float("-inf")), contrast.masked_fill(remove, float("-inf"))
    if top_k > 0:
        merged = original + contrast
        remove = merged < merged.topk(max(top_k, min_tokens_to_keep)).values[..., -1, None]
        original, contrast = original.masked_fill(remove, float("-inf")), contrast.masked_fill(remove, float("-inf"))
    return original, contrast


@dataclass
class _Entry:
    fn: StepFunction
    aggregate_map: dict[str, str]
    # Built-ins take every step of every sequence at once; registered functions get inseq's per-step call.
    vectorized: bool = False


_STEP_FUNCTIONS: Registry[_Entry] = Registry("step function", error=UnknownStepFunctionError)


def register_step_function(
    fn: StepFunction,
    identifier: str,
    aggregate_map: dict[str, str] | None = None,
    overwrite: bool = False,
) -> None:
    """Register ``fn`` as a step function named ``identifier``.

    Args:
        fn: ``fn(args: StepFunctionArgs, **kwargs) -> Tensor[M]``.
        identifier: the name used in ``step_scores=[...]`` and ``attributed_fn=...``.
        aggregate_map: how the score aggregates per aggregator family, e.g. ``{"spans": "prod"}``
            for probabilities (default: ``absmax``).
        overwrite: replace an existing registration of the same name.
    """
    if not callable(fn):
        raise TypeError(f"step function {identifier!r} must be callable, got {type(fn).__name__}")
    params = list(inspect.signature(fn).parameters.values())
    if not params:
        raise TypeError(f"step function {identifier!r} must take the StepFunctionArgs as first argument")
    _STEP_FUNCTIONS.register(identifier, _Entry(fn, dict(aggregate_map or {})), overwrite=overwrite)


def get_step_function(identifier: str) -> StepFunction:
    return _STEP_FUNCTIONS.get(identifier).fn


def is_vectorized(fn: StepFunction) -> bool:
    """Whether ``fn`` is a built-in that takes all steps at once (else it is called per step)."""
    return any(fn is builtin for builtin in _VECTORIZED)  # identity: callables may be unhashable


def uses_contrast(fn: StepFunction) -> bool:
    """Whether ``fn`` takes inseq's contrastive arguments."""
    names = _keyword_names(fn)
    return names is not None and "contrast_targets" in names


def step_function_aggregate_map(identifier: str) -> dict[str, str]:
    return _STEP_FUNCTIONS.get(identifier).aggregate_map if identifier in _STEP_FUNCTIONS else {}


def list_step_functions() -> list[str]:
    """Identifiers of every registered step function."""
    return _STEP_FUNCTIONS.names()


def step_function_kwargs(fn: StepFunction, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The subset of ``kwargs`` that ``fn`` accepts (besides its first, positional args)."""
    names = _keyword_names(fn)
    if names is None:
        return dict(kwargs)
    return {k: v for k, v in kwargs.items() if k in names}


def _keyword_names(fn: StepFunction) -> frozenset[str] | None:
    """Names ``fn`` takes after its first argument; None when it takes ``**kwargs``. Cached:
    ``inspect.signature`` costs more than a tiny model's whole attribution bookkeeping."""
    try:
        return _cached_keyword_names(fn)
    except TypeError:  # an unhashable callable object: no cache
        return _signature_keyword_names(fn)


def _signature_keyword_names(fn: StepFunction) -> frozenset[str] | None:
    params = list(inspect.signature(fn).parameters.values())[1:]
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return frozenset(p.name for p in params)


_cached_keyword_names = functools.lru_cache(maxsize=256)(_signature_keyword_names)


_BUILT_IN = [
    ("logit", logit_fn, {}),
    ("probability", probability_fn, {"spans": "prod"}),
    ("entropy", entropy_fn, {"spans": "sum"}),
    ("crossentropy", crossentropy_fn, {"spans": "sum"}),
    ("perplexity", perplexity_fn, {"spans": "prod"}),
    ("contrast_logits", contrast_logits_fn, {}),
    ("contrast_prob", contrast_prob_fn, {"spans": "prod"}),
    ("contrast_logits_diff", contrast_logits_diff_fn, {}),
    ("contrast_prob_diff", contrast_prob_diff_fn, {"spans": "prod"}),  # inseq's map
    ("pcxmi", pcxmi_fn, {"spans": "sum"}),
    ("kl_divergence", kl_divergence_fn, {"spans": "sum"}),
    ("in_context_pvi", in_context_pvi_fn, {}),
    ("mc_dropout_prob_avg", mc_dropout_prob_avg_fn, {"spans": "prod"}),
    ("top_p_size", top_p_size_fn, {}),
]
_VECTORIZED = tuple(fn for _, fn, _ in _BUILT_IN)
for _name, _fn, _agg in _BUILT_IN:
    register_step_function(_fn, _name, _agg)
