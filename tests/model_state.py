"""What a test compares before and after a call that must leave a model exactly as it was."""

import torch


def model_state(model: torch.nn.Module) -> tuple:
    """Every submodule's training flag, every parameter's requires_grad, every module's forward
    (pre-)hooks and the attention kernel."""
    return ([m.training for m in model.modules()], [p.requires_grad for p in model.parameters()],
            [(dict(m._forward_hooks), dict(m._forward_pre_hooks)) for m in model.modules()],
            model.config._attn_implementation)
