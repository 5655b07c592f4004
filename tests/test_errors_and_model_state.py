"""Bad input gets a clear typed error, and the model is left exactly as it was, error or not."""

import copy

import pytest
import torch
from model_state import assert_same, snapshot

import inseq_lightning as il
from inseq_lightning.errors import (
    InvalidInputError,
    ModelLoadingError,
    TokenizerError,
    UnknownMethodError,
    UnknownStepFunctionError,
)


@pytest.fixture()
def messy_model(hf_pair):
    """A model in a state attribution must not disturb: train mode with a frozen eval submodule,
    some frozen parameters and existing .grad tensors."""
    model, tok = hf_pair
    model.train()
    first = next(iter(model.children()))
    first.eval()
    params = list(model.parameters())
    params[0].requires_grad_(False)
    for p in params[1:4]:
        p.grad = torch.randn_like(p)
    return model, tok


def bad_calls(am, texts):
    src, tgt = texts
    decoder_only = not am.is_encoder_decoder
    calls = {
        "empty text": (InvalidInputError, lambda: am.attribute("", tgt, show_progress=False)),
        "empty target": (InvalidInputError, lambda: am.attribute(src, "  ", show_progress=False)),
        "unknown method": (UnknownMethodError, lambda: am.attribute(src, tgt, method="magic", show_progress=False)),
        "unknown step function": (UnknownStepFunctionError,
                                  lambda: am.attribute(src, tgt, step_scores=["nope"], show_progress=False)),
        "mismatched lengths": (InvalidInputError, lambda: am.attribute([src, src], [tgt], show_progress=False)),
        "too long": (InvalidInputError, lambda: am.attribute(src, tgt + " word" * 200, show_progress=False)),
        "unknown kwarg": (InvalidInputError, lambda: am.attribute(src, tgt, n_stepz=3, show_progress=False)),
        "negative memory budget": (InvalidInputError,
                                   lambda: am.attribute(src, tgt, memory_budget_bytes=-1, show_progress=False)),
    }
    if decoder_only:
        calls["target without prompt"] = (InvalidInputError,
                                          lambda: am.attribute(src, "Something else entirely", show_progress=False))
    return calls


def test_bad_inputs_raise_typed_errors_and_leave_the_model_untouched(messy_model, texts):
    model, tok = messy_model
    am = il.load_model(model, "integrated_gradients", tokenizer=tok)
    for name, (error, call) in bad_calls(am, texts).items():
        before = snapshot(model)
        with pytest.raises(error) as info:
            call()
        assert str(info.value), name
        assert_same(before, snapshot(model))


def test_error_messages_say_what_to_do(attribution_model, texts):
    with pytest.raises(UnknownMethodError, match="saliency"):
        attribution_model.attribute(*texts, method="magic", show_progress=False)
    with pytest.raises(UnknownStepFunctionError, match="probability"):
        attribution_model.attribute(*texts, step_scores=["nope"], show_progress=False)
    if not attribution_model.is_encoder_decoder:
        with pytest.raises(InvalidInputError, match=r"generated_texts\[0\] does not start with its prompt"):
            attribution_model.attribute("Hello", "Goodbye", show_progress=False)


@pytest.mark.parametrize("method", ["saliency", "integrated_gradients", "attention", "occlusion", "layer_deeplift"])
def test_successful_attribution_leaves_the_model_untouched(messy_model, texts, method):
    model, tok = messy_model
    before = snapshot(model)
    out = il.load_model(model, method, tokenizer=tok).attribute(*texts, step_scores=["probability"],
                                                                 show_progress=False)
    assert len(out) == 1
    assert_same(before, snapshot(model))


def test_attribution_works_under_inference_mode_and_no_grad(attribution_model, texts):
    with torch.inference_mode():
        a = attribution_model.attribute(*texts, show_progress=False)[0].aggregate()
    with torch.no_grad():
        b = attribution_model.attribute(*texts, show_progress=False)[0].aggregate()
    x = a.source_attributions if a.source_attributions is not None else a.target_attributions
    y = b.source_attributions if b.source_attributions is not None else b.target_attributions
    assert torch.nan_to_num(x).abs().sum() > 0
    torch.testing.assert_close(x.nan_to_num(), y.nan_to_num())


def test_tokenizer_without_pad_unk_or_eos_is_refused(hf_models):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[x]": 2}, unk_token="[x]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=3, n_layer=1, n_embd=8, n_head=2, bos_token_id=None,
                                       eos_token_id=None))
    with pytest.raises(TokenizerError, match="pad"):
        il.load_model(model, tokenizer=tok)


def test_tokenizer_without_unk_falls_back_to_pad(hf_models):
    model, tok = copy.deepcopy(hf_models["llama"])
    tok.unk_token = None
    am = il.load_model(model, "integrated_gradients", tokenizer=tok)
    assert am.special_ids.unk == am.special_ids.pad == tok.eos_token_id


def test_load_model_never_downloads(tmp_path):
    with pytest.raises(ModelLoadingError, match="never downloads"):
        il.load_model("gpt2", "saliency")
    with pytest.raises(ModelLoadingError, match="not a local directory"):
        il.load_model(str(tmp_path / "missing"))


def test_load_model_from_a_local_directory(hf_models, tmp_path):
    model, tok = hf_models["gpt2"]
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    am = il.load_model(str(tmp_path), "saliency")
    out = am.attribute("Hello world", "Hello world, this", show_progress=False)
    direct = il.load_model(model, "saliency", tokenizer=tok).attribute("Hello world", "Hello world, this",
                                                                         show_progress=False)
    torch.testing.assert_close(out[0].target_attributions.nan_to_num(), direct[0].target_attributions.nan_to_num())


def test_loaded_model_without_tokenizer_is_refused(hf_models):
    with pytest.raises(ModelLoadingError, match="tokenizer"):
        il.load_model(hf_models["gpt2"][0])
