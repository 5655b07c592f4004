"""What a test compares before and after a call that must leave a model exactly as it was."""

import torch


def model_state(model: torch.nn.Module) -> tuple:
    """Every submodule's training flag, every parameter's requires_grad, every module's forward
    (pre-)hooks and own ``forward`` (an instance attribute shadowing the class's), and the attention kernel."""
    return ([m.training for m in model.modules()], [p.requires_grad for p in model.parameters()],
            [(dict(m._forward_hooks), dict(m._forward_pre_hooks)) for m in model.modules()],
            [m.__dict__.get("forward") for m in model.modules()],
            model.config._attn_implementation)


def snapshot(model: torch.nn.Module) -> dict:
    """Everything a call must leave as it was, by name: modes, requires_grad, .grad values, weights,
    modules' own ``forward`` attributes, the attention kernel and the torch RNG state."""
    return {
        "forwards": {n: m.__dict__.get("forward") for n, m in model.named_modules()},
        "modes": {n: m.training for n, m in model.named_modules()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "weights": {n: p.detach().clone() for n, p in model.named_parameters()},
        "attn": model.config._attn_implementation,
        "rng": torch.get_rng_state(),
    }


def assert_same(before: dict, after: dict) -> None:
    """Two :func:`snapshot` results are equal, tensor for tensor."""
    assert before["modes"] == after["modes"]
    assert before["forwards"] == after["forwards"]
    assert before["requires_grad"] == after["requires_grad"]
    assert before["attn"] == after["attn"]
    assert torch.equal(before["rng"], after["rng"])
    for name, grad in before["grads"].items():
        other = after["grads"][name]
        assert (grad is None) == (other is None) and (grad is None or torch.equal(grad, other)), name
    for name, weight in before["weights"].items():
        assert torch.equal(weight, after["weights"][name]), name
