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
