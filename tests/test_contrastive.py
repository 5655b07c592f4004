"""Contrastive attribution: inseq's seven contrastive step functions and its contrast arguments,
checked against the model's own forward passes (ground truth) and against inseq 0.7.1."""

import copy

import pytest
import torch

import inseq_lightning as il
from inseq_lightning.errors import InvalidInputError

CONTRASTIVE = ["contrast_logits", "contrast_prob", "contrast_logits_diff", "contrast_prob_diff", "pcxmi",
               "kl_divergence", "in_context_pvi"]
# (prompt/source, target, contrast target) per family; decoder-only contrasts start with their prompt.
CASES = {
    "gpt2": ("Hello world", "Hello world, this is a cat", "Hello world, this is a dog"),
    "llama": ("The cat sat", "The cat sat on the mat", "The cat sat on a mat"),
    "marian": ("Hello world", "Le chat est noir", "Le chien est noir"),
}


def _model_logits(model, am, source: str, target_ids: list[int]) -> torch.Tensor:
    """``[T, V]`` logits of the model's own forward over ``target_ids`` (decoder-only: the whole
    sequence; encoder-decoder: the decoder inputs, from ``source``)."""
    with torch.no_grad():
        ids = torch.tensor([target_ids])
        if model.config.is_encoder_decoder:
            src = am.encode(source).input_ids
            return model(input_ids=src, decoder_input_ids=ids).logits[0]
        return model(input_ids=ids).logits[0]


def _contrast_ids(am, text: str) -> list[int]:
    return am.encode(text, as_targets=am.is_encoder_decoder).input_ids[0].tolist()


@pytest.mark.parametrize("family", list(CASES))
def test_contrastive_step_scores_equal_the_models_own_forwards(hf_models, family):
    """Every contrastive score from two plain forwards of the model: the target's and the contrast's,
    aligned right to left (inseq's default), computed here by hand."""
    model, tok = hf_models[family]
    model = copy.deepcopy(model).eval()
    am = il.load_model(model, "dummy", tokenizer=tok)
    prompt, target, contrast = CASES[family]
    out = am.attribute(prompt, target, step_scores=["probability", "logit", *CONTRASTIVE], contrast_targets=contrast,
                       show_progress=False)[0]
    target_ids = [t.id for t in out.target]
    contrast_ids = _contrast_ids(am, contrast)
    positions = list(range(out.attr_pos_start, out.attr_pos_end))
    aligned = [len(contrast_ids) - len(positions) + k for k in range(len(positions))]
    original = _model_logits(model, am, prompt, target_ids)[[p - 1 for p in positions]].double()
    other = _model_logits(model, am, prompt, contrast_ids)[[j - 1 for j in aligned]].double()
    y, y_c = torch.tensor([target_ids[p] for p in positions]), torch.tensor([contrast_ids[j] for j in aligned])
    lp, lq = original.log_softmax(-1), other.log_softmax(-1)
    p, q = lp.exp().gather(1, y[:, None])[:, 0], lq.exp().gather(1, y_c[:, None])[:, 0]
    expected = {
        "contrast_logits": other.gather(1, y_c[:, None])[:, 0],
        "contrast_prob": q,
        "contrast_logits_diff": original.gather(1, y[:, None])[:, 0] - other.gather(1, y_c[:, None])[:, 0],
        "contrast_prob_diff": p - q,
        "pcxmi": -torch.log2(p / q),
        "kl_divergence": (lp.exp() * (lp - lq)).sum(-1),
        "in_context_pvi": -p.log() + q.log(),
    }
    for name, value in expected.items():
        torch.testing.assert_close(out.step_scores[name].double(), value, rtol=1e-4, atol=1e-6, msg=name)
    # the labels say what was compared where the tokens differ (inseq's "contrast → target")
    labels = [out.target[p].token for p in positions]
    contrast_tokens = tok.convert_ids_to_tokens(contrast_ids)
    for label, p, j in zip(labels, positions, aligned):
        own = tok.convert_ids_to_tokens(target_ids[p])
        assert label == (own if contrast_tokens[j] == own else f"{contrast_tokens[j]} → {own}")


def test_explicit_alignments_pick_the_contrast_token_of_each_step(hf_models):
    """A longer contrast, aligned by hand: each step's contrast probability is the model's for the
    token the alignment names; steps left unaligned are aligned right to left (inseq's fill)."""
    model, tok = hf_models["gpt2"]
    model = copy.deepcopy(model).eval()
    am = il.load_model(model, "dummy", tokenizer=tok)
    prompt, target, contrast = "Hello world", "Hello world, this is a cat", "Hello world, this is a big dog"
    out = am.attribute(prompt, target, step_scores=["contrast_prob"], contrast_targets=contrast, show_progress=False)[0]
    positions = list(range(out.attr_pos_start, out.attr_pos_end))
    contrast_ids = _contrast_ids(am, contrast)
    pairs = [(positions[0], positions[0] + 1), (positions[2], positions[0] + 2)]
    out = am.attribute(prompt, target, step_scores=["contrast_prob"], contrast_targets=contrast,
                       contrast_targets_alignments=pairs, show_progress=False)[0]
    aligned = {p: len(contrast_ids) - k for k, p in enumerate(reversed(positions), start=1)}
    aligned.update(dict(pairs))
    probs = _model_logits(model, am, prompt, contrast_ids).softmax(-1)
    expected = torch.stack([probs[aligned[p] - 1, contrast_ids[aligned[p]]] for p in positions])
    torch.testing.assert_close(out.step_scores["contrast_prob"], expected, rtol=1e-5, atol=1e-7)


def test_contrast_sources_change_the_context_not_the_tokens(hf_models):
    """Encoder-decoder: another source, the same target; decoder-only: another prompt before the
    same continuation (inseq refuses it there). The contrast probability is the model's own for the
    original tokens given the other context."""
    model, tok = hf_models["marian"]
    model = copy.deepcopy(model).eval()
    am = il.load_model(model, "dummy", tokenizer=tok)
    out = am.attribute("Hello world", "Le chat est noir", step_scores=["contrast_prob", "probability"],
                       contrast_sources="Good night", show_progress=False)[0]
    ids = [t.id for t in out.target]
    probs = _model_logits(model, am, "Good night", ids).softmax(-1)
    expected = torch.stack([probs[p - 1, ids[p]] for p in range(out.attr_pos_start, out.attr_pos_end)])
    torch.testing.assert_close(out.step_scores["contrast_prob"], expected, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(out.step_scores["contrast_prob"], out.step_scores["probability"])

    model, tok = hf_models["gpt2"]
    model = copy.deepcopy(model).eval()
    am = il.load_model(model, "dummy", tokenizer=tok)
    out = am.attribute("Hello world", "Hello world, this is a cat", step_scores=["contrast_prob"],
                       contrast_sources="Goodbye moon", show_progress=False)[0]
    continuation = [t.id for t in out.target][out.attr_pos_start:]
    sequence = _contrast_ids(am, "Goodbye moon") + continuation
    probs = _model_logits(model, am, "", sequence).softmax(-1)
    start = len(sequence) - len(continuation)
    expected = torch.stack([probs[start + k - 1, tok_id] for k, tok_id in enumerate(continuation)])
    torch.testing.assert_close(out.step_scores["contrast_prob"], expected, rtol=1e-5, atol=1e-7)


def test_contrast_logits_of_all_steps_come_from_one_forward(hf_models):
    model, tok = hf_models["gpt2"]
    model = copy.deepcopy(model)
    am = il.load_model(model, "saliency", tokenizer=tok)
    calls = []
    handle = model.register_forward_hook(lambda module, args, output: calls.append(1))
    try:
        out = am.attribute("Hello world", "Hello world, this is a cat", step_scores=CONTRASTIVE,
                           contrast_targets="Hello world, this is a dog", show_progress=False)[0]
    finally:
        handle.remove()
    assert out.attr_pos_end - out.attr_pos_start == 7
    assert len(calls) == 2  # the attributed forward + one contrast forward, for 7 steps and 7 functions


@pytest.mark.parametrize("family", ["gpt2", "marian"])
def test_step_scores_only_run_the_real_and_contrast_rows_in_one_padded_forward(hf_models, family):
    """``dummy`` with contrastive step scores: one forward over the real and the contrast rows, right-padded
    to a common length, gives the numbers of the two separate forwards a gradient method runs (a padded
    batch of two, targets and contrasts of different lengths)."""
    model, tok = hf_models[family]
    seq2seq = model.config.is_encoder_decoder
    prompts = ["Hello world", "The cat sat on the mat"]
    targets = (["Le chat est noir", "Le chien"] if seq2seq
               else ["Hello world, this is a cat", "The cat sat on the mat and slept"])
    contrasts = (["Le chien est noir et blanc", "Un chat"] if seq2seq
                 else ["Hello world, this is a big dog", "The cat sat on the mat"])
    kwargs = {"step_scores": CONTRASTIVE, "contrast_targets": contrasts, "show_progress": False}
    if not seq2seq:  # the second contrast is shorter than its target: align its last token with every step
        kwargs["contrast_targets_alignments"] = [[], [(k, 6) for k in range(7, 11)]]
    calls = []
    dummy_model = copy.deepcopy(model)
    handle = dummy_model.register_forward_hook(lambda module, args, output: calls.append(output.logits.shape[0]))
    try:
        joint = il.load_model(dummy_model, "dummy", tokenizer=tok).attribute(prompts, targets, **kwargs)
    finally:
        handle.remove()
    assert calls == [4]
    separate = il.load_model(copy.deepcopy(model), "saliency", tokenizer=tok).attribute(prompts, targets, **kwargs)
    for ours, ref in zip(joint.sequence_attributions, separate.sequence_attributions, strict=True):
        assert set(ours.step_scores) == set(CONTRASTIVE)
        for name in CONTRASTIVE:
            torch.testing.assert_close(ours.step_scores[name], ref.step_scores[name], rtol=1e-5, atol=1e-6, msg=name)


def test_contrastive_attributed_function_is_the_gradient_of_the_difference(hf_models):
    """``attributed_fn="contrast_prob_diff"``: saliency is |d (p(y) - p(y')) / d e| on the original
    forward (inseq's rule without contrast_force_inputs), computed here with autograd for each step."""
    model, tok = hf_models["gpt2"]
    model = copy.deepcopy(model).eval()
    am = il.load_model(model, "saliency", tokenizer=tok)
    prompt, target, contrast = CASES["gpt2"]
    out = am.attribute(prompt, target, attributed_fn="contrast_prob_diff", contrast_targets=contrast,
                       show_progress=False)[0]
    ids = torch.tensor([[t.id for t in out.target]])
    contrast_ids = _contrast_ids(am, contrast)
    positions = list(range(out.attr_pos_start, out.attr_pos_end))
    for k, p in enumerate(positions):
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        probs = model(inputs_embeds=embeds).logits[0, p - 1].softmax(-1)
        j = len(contrast_ids) - len(positions) + k
        (grad,) = torch.autograd.grad(probs[ids[0, p]] - probs[contrast_ids[j]], embeds)
        torch.testing.assert_close(out.target_attributions[:p, k], grad[0, :p].abs(), rtol=1e-4, atol=1e-7)


def test_contrastive_attribution_runs_with_integration_points(hf_models):
    """inseq refuses contrastive targets with integrated gradients (its batch of points no longer
    matches the contrast batch); here the contrast ids are per step and the points share them: the
    same numbers whether the points run in one forward or four."""
    model, tok = hf_models["marian"]
    am = il.load_model(copy.deepcopy(model), "integrated_gradients", tokenizer=tok)
    kwargs = {"attributed_fn": "contrast_prob_diff", "contrast_targets": "Le chien est noir", "n_steps": 8,
                  "step_scores": ["contrast_prob_diff"], "show_progress": False}
    whole = am.attribute("Hello world", "Le chat est noir", **kwargs)[0]
    split = am.attribute("Hello world", "Le chat est noir", internal_batch_size=2, **kwargs)[0]
    assert torch.isfinite(whole.source_attributions).all() and whole.source_attributions.abs().sum() > 0
    torch.testing.assert_close(whole.source_attributions, split.source_attributions, rtol=1e-4, atol=1e-7)
    dummy = il.load_model(copy.deepcopy(model), "dummy", tokenizer=tok).attribute(
        "Hello world", "Le chat est noir", step_scores=["contrast_prob_diff"], contrast_targets="Le chien est noir",
        show_progress=False)[0]
    torch.testing.assert_close(whole.step_scores["contrast_prob_diff"], dummy.step_scores["contrast_prob_diff"])


def _state(model):
    return ([m.training for m in model.modules()], [p.requires_grad for p in model.parameters()],
            torch.get_rng_state())


@pytest.mark.parametrize("kwargs,match", [
    ({"step_scores": ["contrast_prob"]}, "contrast_targets"),
    ({"step_scores": ["contrast_prob"], "contrast_targets": ["a", "b"]}, "one per input"),
    ({"step_scores": ["contrast_prob"], "contrast_targets": "Goodbye, this is a dog"}, "does not start with its prompt"),
    ({"step_scores": ["contrast_prob"], "contrast_targets": "Hello world, this is a dog",
      "contrast_targets_alignments": [(7, 99)]}, "out of range"),
    ({"step_scores": ["contrast_prob"], "contrast_targets": "Hello world, this is a dog",
      "contrast_targets_alignments": "auto"}, "LaBSE"),
    ({"step_scores": ["contrast_prob"], "contrast_targets": "Hello world, this is a dog",
      "contrast_targets_alignments": [(7, 0)]}, "no token precedes"),
    ({"attributed_fn": "kl_divergence", "contrast_targets": "Hello world, this is a dog"}, "contrast_force_inputs"),
    ({"contrast_targets": "Hello world, this is a dog"}, "contrastive step functions"),
    ({"step_scores": ["contrast_prob"], "contrast_targets_alignments": [(7, 8)]}, "requires contrast_targets"),
])
def test_bad_contrast_inputs_get_a_typed_error_and_leave_the_model_as_it_was(hf_models, kwargs, match):
    model, tok = hf_models["gpt2"]
    model = copy.deepcopy(model).train()
    am = il.load_model(model, "saliency", tokenizer=tok)
    before = _state(model)
    with pytest.raises(InvalidInputError, match=match):
        am.attribute("Hello world", "Hello world, this is a cat", show_progress=False, **kwargs)
    after = _state(model)
    assert before[0] == after[0] and before[1] == after[1] and torch.equal(before[2], after[2])


def test_fourteen_step_functions_as_inseq_lists_them():
    names = il.list_step_functions()
    assert set(CONTRASTIVE) <= set(names)
    assert len(names) >= 14
    inseq = pytest.importorskip("inseq")
    assert set(inseq.list_step_functions()) <= set(names)


@pytest.mark.parametrize("family", list(CASES))
def test_contrastive_step_scores_and_attributions_equal_inseq(hf_models, family):
    inseq = pytest.importorskip("inseq", reason="parity needs inseq 0.7.1")
    from test_parity_inseq import inseq_reference

    model, tok = hf_models[family]
    prompt, target, contrast = CASES[family]
    ours_model = il.load_model(copy.deepcopy(model), "saliency", tokenizer=tok)
    ref_model = inseq.load_model(inseq_reference(model), "saliency", tokenizer=copy.deepcopy(tok))
    ours = ours_model.attribute(prompt, target, step_scores=CONTRASTIVE, contrast_targets=contrast,
                                show_progress=False)[0]
    ref = ref_model.attribute(prompt, target, step_scores=CONTRASTIVE, contrast_targets=contrast,
                              show_progress=False)[0]
    assert [t.token for t in ours.target] == [t.token for t in ref.target]
    for name in CONTRASTIVE:
        torch.testing.assert_close(ours.step_scores[name], ref.step_scores[name].float(), rtol=1e-5, atol=1e-5,
                                   msg=name)
    for fn in ("contrast_prob_diff", "contrast_logits_diff", "pcxmi", "in_context_pvi"):
        a = ours_model.attribute(prompt, target, attributed_fn=fn, contrast_targets=contrast, show_progress=False)[0]
        b = ref_model.attribute(prompt, target, attributed_fn=fn, contrast_targets=contrast, show_progress=False)[0]
        # Raw gradients, relative to their scale: where the contrast token is the target token, pcxmi is
        # exactly 0 on one forward and so is its gradient here, while inseq's two paths leave ~1e-10 of
        # rounding that its per-step normalisation would blow up to O(1).
        for side in ("source_attributions", "target_attributions"):
            if getattr(b, side) is not None:
                scale = getattr(b, side).abs().nan_to_num().max()
                torch.testing.assert_close(getattr(a, side) / scale, getattr(b, side) / scale, equal_nan=True,
                                           atol=1e-5, rtol=1e-4, msg=f"{fn} {side}")
