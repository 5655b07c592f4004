"""Leave a model exactly as it was found: modes, requires_grad flags, .grad tensors, attention kernel, RNG."""

import contextlib
import random
import weakref
from collections.abc import Iterator

import numpy as np
import torch


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def _attn_implementation(model: torch.nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) if config is not None else None


def set_attn_implementation(model: torch.nn.Module, implementation: str) -> None:
    """Switch a transformers model's attention kernel (e.g. to ``eager`` to read attention weights)."""
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(implementation)
    else:  # older transformers: the config field is what the layers read
        model.config._attn_implementation = implementation


# Models inside a guard, and whether that guard restores the RNG streams. A guard inside another
# on the same model snapshots nothing: the outer one restores everything when the public call that
# opened it returns (one snapshot of every .grad and RNG per call, not one per batch or helper).
_GUARDED: "weakref.WeakKeyDictionary[torch.nn.Module, bool]" = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def preserve_model_state(model: torch.nn.Module, preserve_rng: bool = True, freeze: bool = False) -> Iterator[None]:
    """Restore every submodule's training flag, every parameter's ``requires_grad`` and ``.grad``
    (the same tensor object, with its values), the attention implementation and the RNG streams
    when the block exits, also when it raises. ``freeze``: set ``requires_grad=False`` on every
    parameter for the block (restored with the rest).

    Re-entrant: inside an outer block on the same model that covers as much (RNG included when
    asked for), this one only freezes; the outer block restores everything on exit. Code inside a
    guard may therefore change modes for its own work, but must undo what later work in the same
    call depends on (``mc_dropout_prob_avg`` puts dropout back off after its noisy forwards).

    Attribution uses ``torch.autograd.grad`` and never writes ``.grad``; the snapshot is a guard
    against step functions or user callbacks that do.
    """
    if model in _GUARDED and (_GUARDED[model] or not preserve_rng):
        if freeze:
            for p in model.parameters():
                if p.requires_grad:
                    p.requires_grad_(False)
        yield
        return
    # Snapshots by object, not by name: restoring walks lists instead of re-deriving names, and
    # only what changed is written back (cheap on models with thousands of parameters).
    modes = [(module, module.training) for module in model.modules()]
    params = list(model.parameters())
    requires_grad = [p.requires_grad for p in params]
    grads = [(p.grad, p.grad.detach().clone()) if p.grad is not None else (None, None) for p in params]
    attn = _attn_implementation(model)
    rng = _rng_state() if preserve_rng else None
    outer = _GUARDED.get(model)
    _GUARDED[model] = preserve_rng
    try:
        if freeze:
            for p, flag in zip(params, requires_grad):
                if flag:
                    p.requires_grad_(False)
        yield
    finally:
        if outer is None:
            _GUARDED.pop(model, None)
        else:
            _GUARDED[model] = outer
        for module, training in modes:
            if module.training != training:
                module.training = training
        for p, flag, (original, values) in zip(params, requires_grad, grads):
            if p.requires_grad != flag:
                p.requires_grad_(flag)
            if original is not None:
                original.copy_(values)
            if p.grad is not original:
                p.grad = original
        if attn is not None and _attn_implementation(model) != attn:
            set_attn_implementation(model, attn)
        if rng is not None:
            _set_rng_state(rng)
