"""Step functions: one score per generated token, usable as step scores and as attribution targets.

A step function receives a :class:`StepFunctionArgs` whose ``forward_output.logits`` has shape
``[M, 1, vocab]`` (the logits that predict each target token) and ``target_ids`` of shape ``[M]``,
plus its own keyword arguments, and returns a ``[M]`` tensor. The engine calls it once for all
steps of all sequences together (M = sequences x steps), so it never re-runs the model per token.
Functions written for inseq that read ``args.attribution_model.output2logits(args.forward_output)`` and
``args.target_ids`` work unchanged (inseq's own ``logit``/``probability``/``entropy``/``crossentropy``/
``perplexity`` functions are tested registered here); inseq's contrastive functions, which build
contrast inputs through inseq's own formatter, do not yet.
"""

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers.utils import ModelOutput

from ..errors import UnknownStepFunctionError
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


@dataclass
class _Entry:
    fn: StepFunction
    aggregate_map: dict[str, str]


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


for _name, _fn, _agg in [
    ("logit", logit_fn, {}),
    ("probability", probability_fn, {"spans": "prod"}),
    ("entropy", entropy_fn, {"spans": "sum"}),
    ("crossentropy", crossentropy_fn, {"spans": "sum"}),
    ("perplexity", perplexity_fn, {"spans": "prod"}),
    ("mc_dropout_prob_avg", mc_dropout_prob_avg_fn, {"spans": "prod"}),
    ("top_p_size", top_p_size_fn, {}),
]:
    register_step_function(_fn, _name, _agg)
