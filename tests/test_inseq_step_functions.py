"""Step functions written for inseq run unchanged: inseq 0.7.1's own callables, registered here, give
inseq's numbers as step scores and as the attributed function."""

import copy

import pytest
import torch

import inseq_lightning as il

inseq = pytest.importorskip("inseq", reason="needs inseq 0.7.1 (pip install --no-deps inseq==0.7.1)")
from inseq.attr import step_functions as inseq_steps
from test_parity_inseq import inseq_reference  # inseq with its Marian double scaling undone

# inseq's functions that need no contrast inputs and no extra forward of inseq's own. (Its top_p_size_fn
# returns one count for a whole batch of rows, so it is only right one row at a time: not vectorisable.)
FUNCTIONS = ["logit", "probability", "entropy", "crossentropy", "perplexity"]


@pytest.fixture(scope="module", autouse=True)
def registered():
    for name in FUNCTIONS:
        il.register_step_function(getattr(inseq_steps, f"{name}_fn"), f"inseq_{name}", overwrite=True)


@pytest.mark.parametrize("family", ["gpt2", "marian"])
def test_inseqs_own_step_functions_give_inseqs_numbers(hf_models, family):
    model, tok = hf_models[family]
    texts = ("Hello world", "Hello world, this is a cat") if family == "gpt2" else ("Hello world", "Le chat est noir")
    ours = il.load_model(copy.deepcopy(model), "saliency", tokenizer=tok).attribute(
        *texts, step_scores=[f"inseq_{n}" for n in FUNCTIONS], show_progress=False)[0]
    # inseq itself fails on crossentropy/perplexity with one sequence (target ids squeezed to 0-d):
    # those are checked against their formula on the probability inseq gives
    ref = inseq.load_model(inseq_reference(model), "saliency", tokenizer=copy.deepcopy(tok)).attribute(
        *texts, step_scores=["logit", "probability", "entropy"], show_progress=False)[0]
    for name in ("logit", "probability", "entropy"):
        assert torch.allclose(ours.step_scores[f"inseq_{name}"], ref.step_scores[name].float(), rtol=1e-5,
                              atol=1e-6), name
    nats = -ref.step_scores["probability"].float().log()
    assert torch.allclose(ours.step_scores["inseq_crossentropy"], nats, rtol=1e-4)
    assert torch.allclose(ours.step_scores["inseq_perplexity"], 2**nats, rtol=1e-4)


def test_an_inseq_step_function_as_the_attributed_function_equals_the_builtin(hf_models):
    model, tok = hf_models["gpt2"]
    attr_model = il.load_model(copy.deepcopy(model), "saliency", tokenizer=tok)
    texts = ("Hello world", "Hello world, this is a cat")
    theirs = attr_model.attribute(*texts, attributed_fn="inseq_entropy", show_progress=False)[0]
    builtin = attr_model.attribute(*texts, attributed_fn="entropy", show_progress=False)[0]
    assert torch.allclose(theirs.target_attributions, builtin.target_attributions, equal_nan=True, atol=1e-7)


CONTRASTIVE = ["contrast_logits", "contrast_prob", "contrast_logits_diff", "contrast_prob_diff", "pcxmi",
               "kl_divergence", "in_context_pvi"]
CONTRAST_CASES = {
    "gpt2": ("Hello world", "Hello world, this is a cat", "Hello world, this is a dog"),
    "marian": ("Hello world", "Le chat est noir", "Le chien est noir"),
}


@pytest.mark.parametrize("family", list(CONTRAST_CASES))
def test_inseqs_own_contrastive_step_functions_give_inseqs_numbers(hf_models, family):
    """inseq's contrastive callables build their contrast batch through inseq's model API
    (``encode``, ``embed``, ``formatter``, ``get_forward_output``), called per step as inseq calls them:
    registered here they give inseq's numbers, and this library's built-ins give the same."""
    for name in CONTRASTIVE:
        il.register_step_function(getattr(inseq_steps, f"{name}_fn"), f"inseq_{name}", overwrite=True)
    model, tok = hf_models[family]
    prompt, target, contrast = CONTRAST_CASES[family]
    ours = il.load_model(copy.deepcopy(model), "saliency", tokenizer=tok).attribute(
        prompt, target, step_scores=[f"inseq_{n}" for n in CONTRASTIVE] + CONTRASTIVE, contrast_targets=contrast,
        show_progress=False)[0]
    ref = inseq.load_model(inseq_reference(model), "saliency", tokenizer=copy.deepcopy(tok)).attribute(
        prompt, target, step_scores=CONTRASTIVE, contrast_targets=contrast, show_progress=False)[0]
    for name in CONTRASTIVE:
        torch.testing.assert_close(ours.step_scores[f"inseq_{name}"], ref.step_scores[name].float(), rtol=1e-5,
                                   atol=1e-6, msg=name)
        torch.testing.assert_close(ours.step_scores[name], ours.step_scores[f"inseq_{name}"], rtol=1e-5, atol=1e-6,
                                   msg=name)


def test_inseqs_contrast_prob_diff_as_the_attributed_function_gives_inseqs_attributions(hf_models):
    il.register_step_function(inseq_steps.contrast_prob_diff_fn, "inseq_contrast_prob_diff", overwrite=True)
    model, tok = hf_models["gpt2"]
    prompt, target, contrast = CONTRAST_CASES["gpt2"]
    ours = il.load_model(copy.deepcopy(model), "saliency", tokenizer=tok).attribute(
        prompt, target, attributed_fn="inseq_contrast_prob_diff", contrast_targets=contrast, show_progress=False)[0]
    ref = inseq.load_model(inseq_reference(model), "saliency", tokenizer=copy.deepcopy(tok)).attribute(
        prompt, target, attributed_fn="contrast_prob_diff", contrast_targets=contrast, show_progress=False)[0]
    scale = ref.target_attributions.abs().nan_to_num().max()
    torch.testing.assert_close(ours.target_attributions / scale, ref.target_attributions / scale, equal_nan=True,
                               atol=1e-5, rtol=1e-4)


def test_inseq_callables_get_inseqs_per_step_arguments(hf_models):
    """A registered function sees what inseq passes at each step: the prefix before the predicted
    token as decoder inputs (ids, mask, embeddings), one row per sequence, the target ids."""
    seen = []

    def spy(args):
        seen.append((args.decoder_input_ids.tolist(), args.decoder_attention_mask.tolist(),
                     tuple(args.decoder_input_embeds.shape), args.target_ids.tolist(),
                     tuple(args.forward_output.logits.shape)))
        return args.target_ids.float()

    il.register_step_function(spy, "spy_args", overwrite=True)
    model, tok = hf_models["gpt2"]
    am = il.load_model(copy.deepcopy(model), "dummy", tokenizer=tok)
    out = am.attribute("Hello world", "Hello world, this is a cat", step_scores=["spy_args"], show_progress=False)[0]
    ids = [t.id for t in out.target]
    assert len(seen) == out.attr_pos_end - out.attr_pos_start
    for (prefix, mask, embeds, target, logits), position in zip(seen, range(out.attr_pos_start, out.attr_pos_end)):
        assert prefix == [ids[:position]] and mask == [[1] * position]
        assert embeds == (1, position, model.config.n_embd) and target == [ids[position]]
        assert logits == (1, 1, model.config.vocab_size)
    assert out.step_scores["spy_args"].tolist() == [float(i) for i in ids[out.attr_pos_start:]]


def test_inseqs_top_p_size_and_mc_dropout_callables_run_here(hf_models):
    """inseq's ``top_p_size_fn`` (one count per call: right one row at a time, which is how a
    registered function is called here for one sequence) gives inseq's counts; inseq's
    ``mc_dropout_prob_avg_fn`` switches the model to train mode through ``args.attribution_model``:
    it runs, gives finite z-scores, and every submodule's mode is back afterwards."""
    il.register_step_function(inseq_steps.top_p_size_fn, "inseq_top_p_size", overwrite=True)
    il.register_step_function(inseq_steps.mc_dropout_prob_avg_fn, "inseq_mc_dropout", overwrite=True)
    model, tok = hf_models["gpt2"]
    model = copy.deepcopy(model).eval()
    texts = ("Hello world", "Hello world, this is a cat")
    ours = il.load_model(model, "saliency", tokenizer=tok).attribute(
        *texts, step_scores=["inseq_top_p_size", "top_p_size", "inseq_mc_dropout"], top_p=0.5, show_progress=False)[0]
    ref = inseq.load_model(inseq_reference(model), "saliency", tokenizer=copy.deepcopy(tok)).attribute(
        *texts, step_scores=["top_p_size"], top_p=0.5, show_progress=False)[0]
    assert ours.step_scores["inseq_top_p_size"].tolist() == ref.step_scores["top_p_size"].float().tolist()
    assert ours.step_scores["top_p_size"].tolist() == ref.step_scores["top_p_size"].float().tolist()
    assert torch.isfinite(ours.step_scores["inseq_mc_dropout"]).all()
    assert not any(m.training for m in model.modules())
