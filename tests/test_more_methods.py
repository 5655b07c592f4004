"""The methods inseq 0.7.1 has beyond the first eleven: same numbers as inseq where it runs them here."""

import copy

import pytest
import torch

import inseq_lightning as il

TEXTS = {
    "gpt2": ("Hello world", "Hello world, this is a cat"),
    "llama": ("The cat sat", "The cat sat on the mat"),
    "marian": ("Hello world", "Le chat est noir"),
}


@pytest.mark.parametrize("family", list(TEXTS))
def test_sequential_integrated_gradients_equals_inseq(hf_models, family):
    inseq = pytest.importorskip("inseq", reason="parity needs inseq 0.7.1")
    from test_parity_inseq import inseq_reference

    model, tok = hf_models[family]
    kwargs = {"n_steps": 8, "step_scores": ["probability"], "show_progress": False}
    ours = il.load_model(copy.deepcopy(model), "sequential_integrated_gradients", tokenizer=tok).attribute(
        *TEXTS[family], **kwargs)[0]
    ref = inseq.load_model(inseq_reference(model), "sequential_integrated_gradients",
                           tokenizer=copy.deepcopy(tok)).attribute(*TEXTS[family], **kwargs)[0]
    for side in ("source_attributions", "target_attributions"):
        a, b = getattr(ours, side), getattr(ref, side)
        if b is None:
            assert a is None
            continue
        assert a.shape == b.shape and torch.equal(a.isnan(), b.isnan())
        scale = b.abs().nan_to_num().max()
        torch.testing.assert_close(a / scale, b / scale, equal_nan=True, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours.step_scores["probability"], ref.step_scores["probability"].float())


def test_sequential_integrated_gradients_moves_one_token_at_a_time(hf_models):
    """The definition, computed by hand on one step: for each position j, the Riemann sum of the
    gradient at position j along baseline(j) -> x(j), others fixed, times x(j) - baseline(j)."""
    model, tok = hf_models["gpt2"]
    model = copy.deepcopy(model).eval()
    am = il.load_model(model, "sequential_integrated_gradients", tokenizer=tok)
    out = am.attribute("Hello world", "Hello world, this", n_steps=4, attribution_args={"method": "riemann_right"},
                       show_progress=False)[0]
    ids = torch.tensor([[t.id for t in out.target]])
    step = out.attr_pos_start  # first attributed position
    embeds = model.get_input_embeddings()(ids).detach()
    unk = am.special_ids.unk
    base = model.get_input_embeddings()(torch.full_like(ids, unk)).detach()
    for j in range(step):
        total = torch.zeros_like(embeds[0, j])
        for k in range(1, 5):
            alpha = k / 4
            x = embeds.clone()
            x[0, j] = base[0, j] + alpha * (embeds[0, j] - base[0, j])
            x.requires_grad_(True)
            p = model(inputs_embeds=x).logits[0, step - 1].softmax(-1)[ids[0, step]]
            (grad,) = torch.autograd.grad(p, x)
            total += grad[0, j] / 4
        expected = total * (embeds[0, j] - base[0, j])
        torch.testing.assert_close(out.target_attributions[j, 0], expected, rtol=1e-4, atol=1e-9)
