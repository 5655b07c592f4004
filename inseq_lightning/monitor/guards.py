"""The guard around every monitoring pass: the training it watches must not notice it."""

import contextlib
from collections.abc import Iterator

import torch

from ..utils.model_state import preserve_model_state


@contextlib.contextmanager
def attribution_guard(model: torch.nn.Module) -> Iterator[None]:
    """Gradients on (even inside ``no_grad`` or ``inference_mode``, as in validation and testing),
    and on exit every submodule's training flag, every ``requires_grad`` flag, every ``.grad``
    tensor (same object, same values), the attention kernel and the RNG streams (torch CPU and
    CUDA, numpy, python) restored, also when the pass raises. The model is never moved or copied.
    """
    with preserve_model_state(model, preserve_rng=True), torch.inference_mode(False), torch.enable_grad():
        yield
