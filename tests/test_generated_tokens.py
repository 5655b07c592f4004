"""A model's own generation is attributed token for token as ``model.generate`` produced it.

Decoding a continuation and tokenizing the text again is not the identity: a Metaspace tokenizer
drops the first word's space, byte-level BPE turns partial UTF-8 bytes into U+FFFD, special tokens
vanish. Every expected value here comes from ``model.generate`` and a plain forward pass.
"""

import pytest
import torch

import inseq_lightning as il
from inseq_lightning.monitor import ProbeMonitor, ProbeSet
from inseq_lightning.monitor.probes import Probe
from inseq_lightning.tiny_models import TOKENIZERS, tiny_gpt2, tiny_llama

PROMPT = "Das ist"


def _forced(tokenizer, tokens: list[str]):
    """``prefix_allowed_tokens_fn`` that makes ``generate`` produce exactly ``tokens`` after the prompt."""
    forced = tokenizer.convert_tokens_to_ids(tokens)
    assert tokenizer.convert_ids_to_tokens(forced) == tokens  # all in the vocabulary
    n_prompt = len(tokenizer(PROMPT)["input_ids"])
    return lambda batch_id, ids: [forced[min(len(ids) - n_prompt, len(forced) - 1)]]


# Continuations that do not survive decode + re-tokenize, per tokenizer family.
TRICKY = {
    "byte_level": ["Ġk", "ð", "Ł", "<|endoftext|>"],  # a partial UTF-8 character, then a generated EOS
    "metaspace": ["▁ein", "▁Hau", "s"],  # decode drops the first token's space: "Das istein"
    "wordpiece": ["##s", ",", "the"],  # a word continuation right after the prompt; decode adds spaces
}


def _ground_truth_probabilities(model, ids: list[int], n_prompt: int) -> torch.Tensor:
    with torch.no_grad():
        probs = model(torch.tensor([ids])).logits[0].softmax(-1)
    return torch.stack([probs[i - 1, ids[i]] for i in range(n_prompt, len(ids))])


@pytest.fixture(params=list(TOKENIZERS))
def llama_with(request):
    tokenizer = TOKENIZERS[request.param]()
    model, _ = tiny_llama(tokenizer=tokenizer)
    return request.param, model, tokenizer


def test_attribute_without_targets_attributes_the_generated_ids(llama_with):
    family, model, tok = llama_with
    tricky = TRICKY[family]
    args = {"max_new_tokens": len(tricky), "do_sample": False, "prefix_allowed_tokens_fn": _forced(tok, tricky)}
    prompt_ids = tok(PROMPT)["input_ids"]
    expected = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                              pad_token_id=tok.pad_token_id or tok.eos_token_id, **args)[0].tolist()
    assert expected[len(prompt_ids):] == tok.convert_tokens_to_ids(TRICKY[family])  # the forcing worked
    out = il.load_model(model, "saliency", tokenizer=tok).attribute(
        PROMPT, generation_args=args, step_scores=["probability"], show_progress=False)
    seq = out[0]
    assert [t.id for t in seq.target] == expected
    assert [t.token for t in seq.generated] == TRICKY[family]
    assert seq.attr_pos_start == len(prompt_ids)
    assert torch.allclose(seq.step_scores["probability"], _ground_truth_probabilities(model, expected, len(prompt_ids)),
                          rtol=1e-5, atol=1e-7)


def test_generate_mode_probes_attribute_what_the_model_generated(llama_with):
    _, model, tok = llama_with
    args = {"max_new_tokens": 5, "do_sample": False}
    prompt_ids = tok(PROMPT)["input_ids"]
    expected = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                              pad_token_id=tok.pad_token_id or tok.eos_token_id, **args)[0].tolist()
    probes = ProbeSet([Probe(PROMPT, None)], generate=True, generation_args=args)
    result = ProbeMonitor(probes, step_scores=("probability",)).run(model, tok, 0).results[0]
    seq = result.output[0]
    assert [t.id for t in seq.target] == expected
    probabilities = _ground_truth_probabilities(model, expected, len(prompt_ids))
    assert result.step_scores["probability"] == pytest.approx(float(probabilities.mean()), rel=1e-5)


def test_generate_returns_the_prompt_followed_by_the_decoded_continuation(llama_with):
    _, model, tok = llama_with
    attr_model = il.load_model(model, "saliency", tokenizer=tok)
    args = {"max_new_tokens": 4, "do_sample": False}
    [ids] = attr_model.generate_ids([PROMPT], **args)
    n_prompt = len(tok(PROMPT)["input_ids"])
    assert attr_model.generate([PROMPT], **args) == [PROMPT + tok.decode(ids[n_prompt:], skip_special_tokens=True)]


@pytest.mark.parametrize("family", ["gpt2", "llama-dynamic-rope"])
def test_generation_leaves_no_inference_tensor_on_the_model_and_training_goes_on(family):
    """A model that caches tensors on itself while generating (a dynamic RoPE growing its frequencies past the
    trained length) must still train afterwards: generation runs under no_grad, not inference_mode, whose
    tensors training cannot use."""
    if family == "gpt2":
        model, tok = tiny_gpt2()
    else:
        model, tok = tiny_llama(rope_scaling={"rope_type": "dynamic", "factor": 2.0}, max_position_embeddings=16)
    model.train()
    am = il.load_model(model, "saliency", tokenizer=tok)
    generated = am.generate_ids(["Hello world, this is a long prompt that goes past sixteen tokens for sure"],
                                max_new_tokens=4, do_sample=False)[0]
    assert len(generated) > 16
    assert model.training  # modes restored
    assert not any(t.is_inference() for t in [*model.parameters(), *model.buffers()])
    ids = torch.tensor([generated])
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters() if p.requires_grad)
