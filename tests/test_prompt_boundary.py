"""Every target character is attributed, however the prompt and its continuation tokenize at their boundary.

Expected tokens come from the tokenizer's own encoding of the full text and character offsets; step
scores from a plain forward pass over the attributed ids.
"""

import warnings

import pytest
import torch

import inseq_lightning as il
from inseq_lightning.errors import InvalidInputError, TokenBoundaryWarning
from inseq_lightning.monitor import Probe, ProbeMonitor
from inseq_lightning.tiny_models import metaspace_tokenizer, tiny_gpt2, tiny_llama

CASES = [
    ("Question: where is the key? Answer: ", "the kitchen drawer"),  # the prompt's space joins "the"
    ("Paris is the capi", "tal of France"),  # the prompt ends inside a word
]


@pytest.fixture(params=["byte_level", "metaspace"])
def model_and_tokenizer(request):
    return tiny_gpt2() if request.param == "byte_level" else tiny_llama(tokenizer=metaspace_tokenizer())


def _first_target_token(tokenizer, prompt: str, full: str) -> int:
    """Index of the first token holding a character after the prompt, from the tokenizer's offsets."""
    encoding = tokenizer(full, return_offsets_mapping=True)
    return next(i for i, (_, end) in enumerate(encoding["offset_mapping"]) if end > len(prompt))


@pytest.mark.parametrize(("prompt", "target"), CASES)
def test_every_target_character_is_attributed(model_and_tokenizer, prompt, target):
    model, tok = model_and_tokenizer
    full = prompt + target
    ids = tok(full)["input_ids"]
    first = _first_target_token(tok, prompt, full)
    assert tok(prompt)["input_ids"] != ids[: len(tok(prompt)["input_ids"])]  # not a token prefix: the hard case
    with pytest.warns(TokenBoundaryWarning, match=repr(tok.convert_ids_to_tokens(ids[first]))):
        out = il.load_model(model, "saliency", tokenizer=tok).attribute(
            prompt, full, step_scores=["probability"], show_progress=False)
    seq = out[0]
    assert [t.id for t in seq.target] == ids and seq.attr_pos_start == first
    assert target in tok.decode([t.id for t in seq.generated])  # nothing of the target is lost
    with torch.no_grad():
        probs = model(torch.tensor([ids])).logits[0].softmax(-1)
    expected = torch.stack([probs[i - 1, ids[i]] for i in range(first, len(ids))])
    assert torch.allclose(seq.step_scores["probability"], expected, rtol=1e-5, atol=1e-8)


def test_a_prompt_that_is_a_token_prefix_warns_nothing(model_and_tokenizer):
    model, tok = model_and_tokenizer
    with warnings.catch_warnings():
        warnings.simplefilter("error", TokenBoundaryWarning)
        out = il.load_model(model, "saliency", tokenizer=tok).attribute(
            "Paris is the", "Paris is the capital", show_progress=False)
    assert tok.decode([t.id for t in out[0].generated]).strip() == "capital"


def test_probes_whose_target_leaves_out_the_prompt_attribute_all_of_it(model_and_tokenizer):
    model, tok = model_and_tokenizer
    prompt, target = CASES[0]
    probe = Probe(prompt, target, evidence=("key",))
    with pytest.warns(TokenBoundaryWarning):
        result = ProbeMonitor([probe]).run(model, tok, 0).results[0]
    generated = [t.id for t in result.output[0].generated]
    assert target in tok.decode(generated)
    # the evidence is still found in the source tokens, by its characters
    rows = result.evidence_rows
    assert rows and "key" in tok.decode([result.output[0].source[i].id for i in rows])


def test_a_prompt_ending_inside_the_first_token_is_refused():
    model, tok = tiny_gpt2()  # no BOS: the first token has nothing before it
    full = "Hello world"
    first = tok.convert_ids_to_tokens(tok(full)["input_ids"])[0]
    assert len(first) > 1
    with pytest.raises(InvalidInputError, match="inside the first token"):
        il.load_model(model, "saliency", tokenizer=tok).attribute(first[:-1], full, show_progress=False)
