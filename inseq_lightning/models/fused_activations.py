"""Activations written in Python run as PyTorch's fused kernel while an attribution runs.

GPT-2, GPT-J, GPT-Neo, CodeGen and Phi-1/2 compute the tanh approximation of GELU
(``gelu_new``/``gelu_fast``) as eight tensor operations in Python. Each is saved for the backward,
and a per-step backward runs all of them once per attributed step: on a 6-layer GPT-2 they are
about a tenth of the attribution's time. ``torch.nn.functional.gelu(x, approximate="tanh")`` is the
same formula in one kernel (one saved tensor, one backward kernel); float32 values agree to rounding
(about 1e-7 relative), which is what transformers itself says of its ``gelu_pytorch_tanh``.

Only float32/float64 inputs take the fused kernel. In half precision the Python formula rounds after
every operation and the fused one does not, so their values differ by the format's own precision:
those inputs keep the model's formula, as does generation (a near tie could pick another token).

The module objects stay the same (hooks on them still fire); only their ``forward`` is shadowed
by an instance attribute for the duration of the block, and removed again when it exits, also when
it raises. Encoder-decoders with these modules (T5 v1.1 / mT5's gated GELU) are switched too. Step
scores then equal the model's own forward to float rounding (about 1e-7 relative), not bit for bit.
"""

import contextlib
from collections.abc import Callable, Iterator

import torch

_FUSED_DTYPES = (torch.float32, torch.float64)


def _switchable(module: torch.nn.Module, activations) -> bool:
    """A transformers Python tanh-GELU module running transformers' own formula, owned by its model.

    Exact types (a subclass may compute something else), whose class ``forward`` is still transformers'
    (a user's class-level patch is respected) and without an instance ``forward`` (nor one of a user's).
    Not the process-wide instances of ``transformers.activations`` (``gelu_new``, ``gelu_fast``): OpenAI-GPT's
    layers all hold that one object, so switching it would switch every such model of the process, models
    this call does not attribute included."""
    cls = type(module)
    if cls not in (activations.NewGELUActivation, activations.FastGELUActivation) or "forward" in module.__dict__:
        return False
    if getattr(cls.forward, "__module__", None) != activations.__name__:
        return False
    return not any(module is shared for shared in vars(activations).values())


def _fused_tanh_gelu(original: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(input: torch.Tensor) -> torch.Tensor:
        if input.dtype in _FUSED_DTYPES:
            return torch.nn.functional.gelu(input, approximate="tanh")
        return original(input)

    forward.fused_by_inseq_lightning = True
    return forward


@contextlib.contextmanager
def fused_activations(model: torch.nn.Module) -> Iterator[int]:
    """Run the model's Python tanh-GELU modules as the fused kernel inside the block; yields how many
    modules were switched (see :func:`_switchable` for those left alone). On exit only the ``forward``
    this block installed is removed: one a user sets meanwhile stays."""
    from transformers import activations

    switched = []
    try:
        for module in model.modules():
            if _switchable(module, activations):
                fused = _fused_tanh_gelu(module.forward)
                module.forward = fused
                switched.append((module, fused))
        yield len(switched)
    finally:
        for module, fused in switched:
            if module.__dict__.get("forward") is fused:
                del module.__dict__["forward"]
