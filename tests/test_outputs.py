"""Outputs: aggregation options, merging, and JSON save/load that never unpickles."""

import gzip
import json
import pickle

import pytest
import torch

import inseq_lightning as il
from inseq_lightning.data.aggregation import subword_spans


@pytest.fixture()
def gpt2_out(hf_models):
    model, tok = hf_models["gpt2"]
    return il.load_model(model, "input_x_gradient", tokenizer=tok).attribute(
        "Hello world", "Hello world, this is a cat", step_scores=["probability", "entropy"], show_progress=False)


def test_default_aggregation_is_l2_norm_then_column_l1(gpt2_out):
    seq = gpt2_out[0]
    vnorm = torch.linalg.vector_norm(seq.target_attributions, dim=-1)
    expected = vnorm / vnorm.nan_to_num().sum(0, keepdim=True)
    torch.testing.assert_close(seq.aggregate().target_attributions.nan_to_num(), expected.nan_to_num())


def test_rescale_divides_by_global_absolute_maximum(gpt2_out):
    seq = gpt2_out[0]
    agg = seq.aggregate("sum", rescale=True).target_attributions
    raw = seq.target_attributions.sum(-1)
    torch.testing.assert_close(agg.nan_to_num(), (raw / raw.nan_to_num().abs().max()).nan_to_num())
    with pytest.raises(ValueError):
        seq.aggregate(normalize=True, rescale=True)


def test_absmax_keeps_the_sign(gpt2_out):
    seq = gpt2_out[0]
    agg = seq.aggregate("absmax", normalize=False).target_attributions
    raw = seq.target_attributions
    idx = raw.nan_to_num().abs().argmax(-1, keepdim=True)
    torch.testing.assert_close(agg.nan_to_num(), raw.gather(-1, idx)[..., 0].nan_to_num())
    assert (agg.nan_to_num() < 0).any()


def test_spans_merge_tokens_scores_and_step_scores(gpt2_out):
    seq = gpt2_out[0].aggregate()
    start = seq.attr_pos_start  # generated tokens start here; merge the first two generated tokens
    merged = seq.aggregate("spans", source_spans=None, target_spans=[(start, start + 2)])
    assert merged.target[start].token == seq.target[start].token + seq.target[start + 1].token
    assert len(merged.target) == len(seq.target) - 1
    assert merged.attr_pos_end - merged.attr_pos_start == seq.attr_pos_end - seq.attr_pos_start - 1
    p = seq.step_scores["probability"]
    torch.testing.assert_close(merged.step_scores["probability"][0], p[0] * p[1])  # probabilities multiply
    h = seq.step_scores["entropy"]
    torch.testing.assert_close(merged.step_scores["entropy"][0], h[0] + h[1])  # entropies add


def test_subword_spans_follow_word_markers():
    assert subword_spans(["Hell", "o", "Ġw", "or", "ld", ",", "Ġis"]) == [(0, 2), (2, 6)]
    assert subword_spans(["▁Le", "▁ch", "at", "</s>"], specials=["</s>"]) == [(1, 3)]


def test_subwords_aggregator_merges_word_pieces(gpt2_out):
    merged = gpt2_out[0].aggregate().aggregate("words")  # this library's word markers (every tokenizer family)
    assert merged.target[0].token == "Hello"
    inseqs = gpt2_out[0].aggregate().aggregate("subwords", special_chars=("Ġ",))  # inseq's: markers given
    assert inseqs.target[0].token == "Hello"


def test_add_merges_outputs(hf_models):
    model, tok = hf_models["gpt2"]
    am = il.load_model(model, "saliency", tokenizer=tok)
    a = am.attribute("Hello world", "Hello world, this", show_progress=False)
    b = am.attribute("The cat", "The cat sat", show_progress=False)
    merged = a + b
    assert len(merged) == 2
    assert merged.info["input_texts"] == ["Hello world", "The cat"]
    assert sum([a, b]).info["generated_texts"] == ["Hello world, this", "The cat sat"]


@pytest.mark.parametrize("compress", [False, True])
def test_save_and_load_round_trip(gpt2_out, tmp_path, compress):
    path = tmp_path / "out.json"
    gpt2_out.save(path, compress=compress)
    raw = path.read_bytes()
    assert raw[:2] == b"\x1f\x8b" if compress else json.loads(raw)["format"].startswith("inseq_lightning")
    loaded = il.FeatureAttributionOutput.load(path)
    seq, back = gpt2_out[0], loaded[0]
    assert [t.token for t in back.target] == [t.token for t in seq.target]
    assert torch.equal(back.target_attributions.isnan(), seq.target_attributions.isnan())
    torch.testing.assert_close(back.target_attributions.nan_to_num(), seq.target_attributions.nan_to_num())
    torch.testing.assert_close(back.step_scores["probability"], seq.step_scores["probability"])
    torch.testing.assert_close(back.aggregate().target_attributions.nan_to_num(),
                               seq.aggregate().target_attributions.nan_to_num())
    assert loaded.info["attribution_method"] == "input_x_gradient"
    with pytest.raises(FileExistsError):
        gpt2_out.save(path)


def test_save_in_float16_and_split_sequences(hf_models, tmp_path):
    model, tok = hf_models["gpt2"]
    out = il.load_model(model, "saliency", tokenizer=tok).attribute(
        ["Hello world", "The cat"], ["Hello world, this", "The cat sat"], show_progress=False)
    out.save(tmp_path / "a.json", split_sequences=True, scores_precision="float16")
    first = il.FeatureAttributionOutput.load(tmp_path / "a_0.json")
    second = il.FeatureAttributionOutput.load(tmp_path / "a_1.json")
    assert len(first) == len(second) == 1
    torch.testing.assert_close(first[0].target_attributions.nan_to_num(), out[0].target_attributions.nan_to_num(),
                               rtol=1e-3, atol=1e-7)


def test_loading_never_unpickles(tmp_path):
    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled!')",))

    path = tmp_path / "evil.json"
    path.write_bytes(pickle.dumps(Boom()))
    with pytest.raises((ValueError, UnicodeDecodeError, json.JSONDecodeError)):
        il.FeatureAttributionOutput.load(path)
    path.write_bytes(gzip.compress(pickle.dumps(Boom())))
    with pytest.raises((ValueError, UnicodeDecodeError, json.JSONDecodeError)):
        il.FeatureAttributionOutput.load(path)
