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


def test_a_decoder_with_its_own_embedding_table_is_embedded_from_it():
    """Marian with ``share_encoder_decoder_embeddings=False``: the decoder has its own table. The
    target side is embedded from it (attributed and fed), the source side from the encoder's; step
    scores equal the model's own forward, and attribute_target's maps are the gradients w.r.t. the
    decoder table's embeddings (checked against autograd on the model's own forward)."""
    tok = marian_tokenizer()
    torch.manual_seed(0)
    model = MarianMTModel(MarianConfig(vocab_size=len(tok), scale_embedding=True, share_encoder_decoder_embeddings=False,
                                       pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                       decoder_start_token_id=tok.pad_token_id, **SIZES)).eval()
    encoder_table, decoder_table = model.get_encoder().embed_tokens, model.get_decoder().embed_tokens
    assert encoder_table.weight.data_ptr() != decoder_table.weight.data_ptr()
    with torch.no_grad():
        decoder_table.weight.mul_(3.0)  # make the two tables visibly different
    am = il.load_model(model, "saliency", tokenizer=tok)
    ids = torch.tensor([[5, 6, 7]])
    scale = model.get_encoder().embed_scale
    torch.testing.assert_close(am.embed(ids, as_targets=True), decoder_table(ids) * scale)
    torch.testing.assert_close(am.embed(ids), encoder_table(ids) * scale)
    seq = am.attribute("Hello world", "Le chat est noir", step_scores=["probability"], attribute_target=True,
                       show_progress=False)[0]
    source_ids = torch.tensor([[t.id for t in seq.source]])
    decoder_ids = torch.tensor([[t.id for t in seq.target]])
    probs = model(input_ids=source_ids, decoder_input_ids=decoder_ids).logits[0].softmax(-1)
    positions = range(seq.attr_pos_start, seq.attr_pos_end)
    expected = torch.stack([probs[i - 1, decoder_ids[0, i]] for i in positions]).detach()
    torch.testing.assert_close(seq.step_scores["probability"], expected, rtol=1e-5, atol=1e-9)
    # ground truth for the target-side map of the first step: autograd through the decoder's own table
    decoder_embeds = (decoder_table(decoder_ids) * scale).detach().requires_grad_(True)
    hooked = model.get_decoder().embed_tokens
    handle = hooked.register_forward_hook(lambda module, args, output: decoder_embeds / scale * 1.0)
    try:
        p = model(input_ids=source_ids, decoder_input_ids=decoder_ids).logits[0, 0].softmax(-1)[decoder_ids[0, 1]]
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(p, decoder_embeds)
    torch.testing.assert_close(seq.target_attributions[:1, 0], grad[0, :1].abs(), rtol=1e-4, atol=1e-8)
