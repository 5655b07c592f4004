"""Same numbers as inseq 0.7.1 on the three fixture models (runs whenever inseq is installed;
.ci/run installs it)."""

import copy

import pytest
import torch

import inseq_lightning as il

inseq = pytest.importorskip("inseq", reason="parity tests need inseq 0.7.1 (pip install --no-deps inseq==0.7.1)")

STEP_SCORES = ["probability", "entropy", "logit"]
EXACT_METHODS = ["saliency", "input_x_gradient", "integrated_gradients", "deeplift", "layer_gradient_x_activation",
                 "occlusion", "attention", "dummy"]


def assert_close(ours, ref, what):
    if ref is None:
        assert ours is None, what
        return
    assert ours is not None and ours.shape == ref.shape, f"{what}: {None if ours is None else ours.shape} vs {ref.shape}"
    assert torch.equal(ours.isnan(), ref.isnan()), f"{what}: NaN pattern differs"
    diff = (torch.nan_to_num(ours) - torch.nan_to_num(ref)).abs().max().item()
    assert diff < 1e-5, f"{what}: max abs diff {diff}"


def inseq_reference(model):
    """A copy of ``model`` for inseq: eager attention (inseq only switches models it loads by name), and
    inseq's double scaling of Marian/Pegasus decoder embeddings undone. Those decoders multiply the
    ``decoder_inputs_embeds`` they are given by ``embed_scale`` and inseq multiplies them too (step
    scores 9-15% off the model's own forward, see tests/test_embedding_scale.py); the reference
    decoder divides what it is given by that factor first, so it is applied once, as in the model's
    own forward."""
    ref_model = copy.deepcopy(model)
    ref_model.set_attn_implementation("eager")
    decoder = ref_model.get_decoder() if model.config.is_encoder_decoder else None
    if type(decoder).__name__ in ("MarianDecoder", "PegasusDecoder"):
        forward = decoder.forward

        def given_embeddings_scaled_once(*args, inputs_embeds=None, **kwargs):
            if inputs_embeds is not None:
                inputs_embeds = inputs_embeds / decoder.embed_scale
            return forward(*args, inputs_embeds=inputs_embeds, **kwargs)

        decoder.forward = given_embeddings_scaled_once
    return ref_model


def run_both(hf_pair, texts, method, **kwargs):
    model, tok = hf_pair
    ref_model = inseq_reference(model)
    step_scores = [] if method == "attention" else STEP_SCORES  # inseq refuses step scores there
    ref = inseq.load_model(ref_model, method, tokenizer=copy.deepcopy(tok)).attribute(
        *texts, step_scores=step_scores, show_progress=False, **kwargs)
    ours = il.load_model(model, method, tokenizer=tok).attribute(
        *texts, step_scores=step_scores, show_progress=False, **kwargs)
    return ours[0], ref[0], step_scores


@pytest.mark.parametrize("method", EXACT_METHODS)
def test_aggregated_scores_and_step_scores_equal_inseq(hf_pair, texts, method):
    ours, ref, step_scores = run_both(hf_pair, texts, method)
    assert [t.token for t in ours.target] == [t.token for t in ref.target]
    if method != "dummy":  # inseq lists the target prefix as 'source' when there are no attributions
        assert [t.token for t in ours.source] == [t.token for t in ref.source]
    assert (ours.attr_pos_start, ours.attr_pos_end) == (ref.attr_pos_start, ref.attr_pos_end)
    a, b = ours.aggregate(), ref.aggregate()
    assert_close(a.source_attributions, b.source_attributions, f"{method} source")
    assert_close(a.target_attributions, b.target_attributions, f"{method} target")
    for name in step_scores:
        assert_close(ours.step_scores[name], ref.step_scores[name], f"{method} {name}")


def test_attention_with_step_scores_equals_inseq_attention_plus_its_dummy_pass(hf_pair, texts):
    """inseq refuses step scores with attention and points to a second call with method='dummy';
    here one forward gives both, and both must equal what those two inseq calls give."""
    model, tok = hf_pair
    ref_model = inseq_reference(model)
    ref = inseq.load_model(ref_model, "attention", tokenizer=copy.deepcopy(tok))
    with pytest.raises(ValueError, match="dummy"):
        ref.attribute(*texts, step_scores=STEP_SCORES, show_progress=False)
    ref_attention = ref.attribute(*texts, show_progress=False)[0]
    ref_scores = ref.attribute(*texts, method="dummy", step_scores=STEP_SCORES, show_progress=False)[0]
    ours = il.load_model(model, "attention", tokenizer=tok).attribute(*texts, step_scores=STEP_SCORES,
                                                                      show_progress=False)[0]
    a, b = ours.aggregate(), ref_attention.aggregate()
    assert_close(a.source_attributions, b.source_attributions, "attention source")
    assert_close(a.target_attributions, b.target_attributions, "attention target")
    for name in STEP_SCORES:
        assert_close(ours.step_scores[name], ref_scores.step_scores[name], f"attention + {name}")


@pytest.mark.parametrize("method", ["saliency", "integrated_gradients", "attention"])
def test_attribute_target_equals_inseq_on_encoder_decoder(hf_models, method):
    pair = copy.deepcopy(hf_models["marian"])
    ours, ref, _ = run_both(pair, ("Hello world", "Le chat est noir"), method, attribute_target=True)
    a, b = ours.aggregate(), ref.aggregate()
    assert_close(a.source_attributions, b.source_attributions, "source")
    assert_close(a.target_attributions, b.target_attributions, "target")


def test_raw_gradients_equal_inseq_per_embedding_dimension(hf_pair, texts):
    ours, ref, _ = run_both(hf_pair, texts, "input_x_gradient")
    raw_ours = ours.source_attributions if ours.source_attributions is not None else ours.target_attributions
    raw_ref = ref.source_attributions if ref.source_attributions is not None else ref.target_attributions
    scale = raw_ref.abs().nan_to_num().max()
    assert_close(raw_ours / scale, raw_ref / scale, "raw input_x_gradient")


def test_integrated_gradients_options_equal_inseq(hf_models):
    pair = copy.deepcopy(hf_models["gpt2"])
    ours, ref, _ = run_both(pair, ("Hello world", "Hello world, this is a cat"), "integrated_gradients",
                            n_steps=10, internal_batch_size=4)
    assert_close(ours.aggregate().target_attributions, ref.aggregate().target_attributions, "ig n_steps=10")


def test_logprob_attributed_function_equals_inseq(hf_models):
    pair = copy.deepcopy(hf_models["llama"])
    ours, ref, _ = run_both(pair, ("The cat sat", "The cat sat on the mat"), "saliency", logprob=True)
    assert_close(ours.aggregate().target_attributions, ref.aggregate().target_attributions, "logprob")


def test_attr_pos_start_equals_inseq(hf_models):
    pair = copy.deepcopy(hf_models["gpt2"])
    ours, ref, _ = run_both(pair, ("Hello world", "Hello world, this is a cat"), "saliency", attr_pos_start=8)
    assert (ours.attr_pos_start, ours.attr_pos_end) == (ref.attr_pos_start, ref.attr_pos_end)
    assert_close(ours.aggregate().target_attributions, ref.aggregate().target_attributions, "attr_pos_start")


@pytest.mark.parametrize("method", ["layer_integrated_gradients", "layer_deeplift"])
def test_inseq_layer_methods_with_baselines_ignore_the_baseline(hf_pair, texts, method):
    """inseq 0.7.1 feeds the original ids to the model whatever captum passes, so layer methods
    that need a baseline return all zeros there. We do not copy that; formula tests check ours
    against captum run directly."""
    ours, ref, _ = run_both(hf_pair, texts, method)
    raw_ref = ref.source_attributions if ref.source_attributions is not None else ref.target_attributions
    raw_ours = ours.source_attributions if ours.source_attributions is not None else ours.target_attributions
    assert torch.nan_to_num(raw_ref).abs().max() == 0
    assert torch.nan_to_num(raw_ours).abs().max() > 0


def test_gradient_shap_agrees_with_inseq_in_expectation(hf_models):
    """GradientSHAP is random: with many samples both estimate the same expectation."""
    model, tok = copy.deepcopy(hf_models["gpt2"])
    texts = ("Hello world", "Hello world, this is")
    torch.manual_seed(0)
    ref = inseq.load_model(inseq_reference(model), "gradient_shap", tokenizer=copy.deepcopy(tok)).attribute(
        *texts, n_samples=300, show_progress=False)[0].aggregate().target_attributions
    ours = il.load_model(model, "gradient_shap", tokenizer=tok).attribute(
        *texts, n_samples=300, seed=1, show_progress=False)[0].aggregate().target_attributions
    diff = (torch.nan_to_num(ours) - torch.nan_to_num(ref)).abs().max().item()
    assert diff < 0.05, diff
