"""The guard around every monitoring pass: the training it watches must not notice it."""

import contextlib
from collections.abc import Iterator

import torch

from ..utils.model_state import preserve_model_state


@contextlib.contextmanager
def original_forwards(model: torch.nn.Module) -> Iterator[None]:
    """Run the forward accelerate wrapped, not its mixed-precision wrapper, inside the block.

    With ``bf16``/``fp16`` training, ``Accelerator.prepare_model`` keeps a module's forward as
    ``_original_forward`` and sets an autocast wrapper as the instance's ``forward`` (with PEFT, on
    more than one module). An outer ``torch.autocast(enabled=False)`` cannot undo that inner
    autocast, so every submodule of ``model`` carrying such a wrapper runs its ``_original_forward``
    here: attributions are computed in the weights' own dtype, like offline on the same weights.
    On exit each instance ``forward`` is put back (the same object), also when the block raises;
    modules without a wrapper are untouched.
    """
    wrapped = [(module, module.__dict__["forward"]) for module in model.modules()
               if "forward" in module.__dict__ and hasattr(module, "_original_forward")]
    try:
        for module, _ in wrapped:
            module.forward = module._original_forward
        yield
    finally:
        for module, wrapper in wrapped:
            module.forward = wrapper


@contextlib.contextmanager
def attribution_guard(model: torch.nn.Module) -> Iterator[None]:
    """Gradients on (even inside ``no_grad`` or ``inference_mode``, as in validation and testing),
    full precision (accelerate's autocast wrappers bypassed, see :func:`original_forwards`), and on
    exit every submodule's training flag, every ``requires_grad`` flag, every ``.grad`` tensor (same
    object, same values), every instance ``forward``, the attention kernel and the RNG streams
    (torch CPU and CUDA, numpy, python) restored, also when the pass raises. The model is never
    moved or copied.
    """
    with (preserve_model_state(model, preserve_rng=True), original_forwards(model), torch.inference_mode(False),
          torch.enable_grad()):
        yield
