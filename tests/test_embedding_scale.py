"""Encoder-decoders get their embeddings scaled exactly once: step scores equal the model's own forward.

Marian's and Pegasus's decoders multiply ``decoder_inputs_embeds`` by ``embed_scale`` themselves;
inseq 0.7.1 scales them again (9-15% off on these models). The expected values are a plain forward
with ``decoder_input_ids``, never a library path.
"""

import pytest
import torch
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    MarianConfig,
    MarianMTModel,
    PegasusConfig,
    PegasusForConditionalGeneration,
    T5Config,
    T5ForConditionalGeneration,
)

import inseq_lightning as il
from inseq_lightning.tiny_models import marian_tokenizer

SIZES = {"d_model": 64, "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 4,
         "decoder_attention_heads": 4, "encoder_ffn_dim": 128, "decoder_ffn_dim": 128, "max_position_embeddings": 128}


def _build(kind: str, tok):
    torch.manual_seed(0)
    special = {"pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id,
               "decoder_start_token_id": tok.pad_token_id}
    if kind == "marian":
        return MarianMTModel(MarianConfig(vocab_size=len(tok), scale_embedding=True, **SIZES, **special))
    if kind == "pegasus":
        return PegasusForConditionalGeneration(PegasusConfig(vocab_size=len(tok), scale_embedding=True, **SIZES,
                                                             **special))
    if kind == "bart":
        return BartForConditionalGeneration(BartConfig(vocab_size=len(tok), scale_embedding=True, **SIZES, **special))
    return T5ForConditionalGeneration(T5Config(vocab_size=len(tok), d_model=64, d_ff=128, num_layers=2, num_heads=4,
                                               d_kv=16, **special))


@pytest.mark.parametrize("kind", ["marian", "pegasus", "bart", "t5"])
def test_step_scores_equal_the_models_own_forward(kind):
    tok = marian_tokenizer()
    model = _build(kind, tok).eval()
    source, target = "Hello world, this is a cat", "Le chat est noir"
    out = il.load_model(model, "saliency", tokenizer=tok).attribute(
        source, target, step_scores=["probability"], show_progress=False)
    seq = out[0]
    decoder_ids = torch.tensor([[t.id for t in seq.target]])
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[t.id for t in seq.source]]), decoder_input_ids=decoder_ids).logits[0]
    probs = logits.softmax(-1)
    expected = torch.stack([probs[i - 1, decoder_ids[0, i]] for i in range(seq.attr_pos_start, seq.attr_pos_end)])
    assert torch.allclose(seq.step_scores["probability"], expected, rtol=1e-5, atol=1e-9), (
        seq.step_scores["probability"], expected)
