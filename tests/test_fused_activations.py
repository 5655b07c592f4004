"""GPT-2-style Python tanh-GELUs run as PyTorch's fused kernel during attribution, with the model's own
numbers, and are put back afterwards (also after an error); half precision keeps the model's formula."""

import pytest
import torch
from model_state import assert_same, snapshot
from transformers.activations import FastGELUActivation, NewGELUActivation

import inseq_lightning as il
from inseq_lightning.errors import InvalidInputError
from inseq_lightning.models.fused_activations import fused_activations
from inseq_lightning.tiny_models import tiny_gpt2


def _activations(model):
    return [m for m in model.modules() if type(m) is NewGELUActivation]


def test_attribution_runs_the_fused_kernel_and_matches_the_models_own_prefix_gradients():
    model, tok = tiny_gpt2(n_layer=2, n_embd=64, n_head=4)
    acts = _activations(model)
    assert len(acts) == 2
    seen = []
    for act in acts:  # a user's hook on the activation still fires, and sees the fused forward
        act.register_forward_hook(lambda m, a, o: seen.append(getattr(m.__dict__.get("forward"),
                                                                       "fused_by_inseq_lightning", False)))
    out = il.load_model(model, "saliency", tokenizer=tok).attribute(
        "the quick brown", "the quick brown fox jumps over", step_scores=["probability"], show_progress=False)[0]
    assert seen and all(seen)
    assert all("forward" not in act.__dict__ for act in acts)
    # Ground truth: the model's own (Python-formula) forward, one prefix at a time.
    seen.clear()
    ids = tok("the quick brown fox jumps over")["input_ids"]
    emb = model.get_input_embeddings()
    for k, pos in enumerate(range(out.attr_pos_start, out.attr_pos_end)):
        prefix = emb(torch.tensor([ids[:pos]])).detach().requires_grad_(True)
        p = model(inputs_embeds=prefix).logits[0, -1].softmax(-1)[ids[pos]]
        (grad,) = torch.autograd.grad(p, prefix)
        expected = grad[0].abs()  # float rounding of a different summation order, against the map's scale
        torch.testing.assert_close(out.target_attributions[:pos, k], expected, rtol=1e-5,
                                   atol=1e-6 * expected.max().item())
        torch.testing.assert_close(out.step_scores["probability"][k], p.detach(), rtol=1e-6, atol=0)
    assert seen and not any(seen)  # outside attribute() the model runs its own formula


def test_the_forward_is_put_back_after_an_error_and_generation_keeps_the_models_formula():
    model, tok = tiny_gpt2(n_layer=2, n_embd=64, n_head=4)
    wrapper = il.load_model(model, "saliency", tokenizer=tok)
    before = snapshot(model)

    def failing(args):
        raise RuntimeError("a step function that fails")

    with pytest.raises(RuntimeError, match="a step function that fails"):  # raised inside the attribution
        wrapper.attribute("the quick brown", "the quick brown fox", attributed_fn=failing, show_progress=False)
    assert_same(before, snapshot(model))
    with pytest.raises(InvalidInputError):
        wrapper.attribute("the quick brown", "a target without its prompt", show_progress=False)
    assert_same(before, snapshot(model))
    fused_during_generation = []
    _activations(model)[0].register_forward_hook(
        lambda m, a, o: fused_during_generation.append("forward" in m.__dict__))
    wrapper.generate_ids(["the quick brown"], max_new_tokens=3, do_sample=False)
    assert fused_during_generation and not any(fused_during_generation)


@pytest.mark.parametrize("cls", [NewGELUActivation, FastGELUActivation])
def test_fused_values_equal_the_python_formula_in_float32_and_half_precision_keeps_it(cls):
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), cls())
    x = torch.randn(64, 8) * 4
    reference = net(x)
    with fused_activations(net) as switched:
        assert switched == 1
        fused = net(x)
        half = x.to(torch.bfloat16)
        net_half = torch.nn.Sequential(cls())
        with fused_activations(net_half):
            assert torch.equal(net_half(half), cls()(half))  # bf16: the model's own rounding, bit for bit
    torch.testing.assert_close(fused, reference, rtol=1e-6, atol=1e-6)  # values up to 12
    assert "forward" not in net[1].__dict__


def test_a_forward_shadowed_by_someone_else_is_left_alone():
    act = NewGELUActivation()
    mine = act.forward
    act.forward = lambda x: x * 0  # e.g. a user's own patch
    with fused_activations(torch.nn.Sequential(act)) as switched:
        assert switched == 0
        assert torch.equal(act(torch.ones(3)), torch.zeros(3))
    assert act.forward is not mine and torch.equal(act(torch.ones(3)), torch.zeros(3))


def test_a_class_level_patch_a_forward_set_meanwhile_and_process_wide_instances_are_respected(monkeypatch):
    from transformers import activations

    act = NewGELUActivation()
    monkeypatch.setattr(NewGELUActivation, "forward", lambda self, x: x * 2)  # a user's class-level patch
    with fused_activations(torch.nn.Sequential(act)) as switched:
        assert switched == 0 and torch.equal(act(torch.ones(2)), torch.full((2,), 2.0))
    monkeypatch.undo()

    users = lambda x: x * 3  # set by user code while the block runs
    with fused_activations(torch.nn.Sequential(act)) as switched:
        assert switched == 1
        act.forward = users
    assert act.__dict__["forward"] is users  # not removed on exit: it is not the one the block installed

    # OpenAI-GPT's layers share transformers' process-wide instance: switching it would switch other models.
    with fused_activations(torch.nn.Sequential(activations.gelu_new, activations.gelu_fast)) as switched:
        assert switched == 0
    assert "forward" not in activations.gelu_new.__dict__
