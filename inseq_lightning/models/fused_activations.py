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
it raises.
"""

import contextlib
from collections.abc import Callable, Iterator

import torch

_FUSED_DTYPES = (torch.float32, torch.float64)


def _tanh_gelu_classes() -> tuple[type, ...]:
    """transformers' Python tanh-GELU modules (exact types: a subclass may compute something else)."""
    try:
        from transformers.activations import FastGELUActivation, NewGELUActivation
    except ImportError:  # pragma: no cover - every supported transformers has both
        return ()
    return (NewGELUActivation, FastGELUActivation)


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
    modules were switched. A module whose ``forward`` is already shadowed (by a user or another
    library) is left alone."""
    classes = _tanh_gelu_classes()
    switched = []
    try:
        for module in model.modules():
            if type(module) in classes and "forward" not in module.__dict__:
                module.forward = _fused_tanh_gelu(module.forward)
                switched.append(module)
        yield len(switched)
    finally:
        for module in switched:
            module.__dict__.pop("forward", None)
