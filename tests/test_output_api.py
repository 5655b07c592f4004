"""inseq 0.7.1's output API on this library's outputs: aggregators (slices, pair, split, scores with select_idx,
subwords), ``==``, ``-``, weighting, score dicts, per-step outputs, ``info``, ``attribute()``'s
``generate_from_target_prefix`` / ``clean_special_chars``, views and exports.

Parity tests run the same call on inseq 0.7.1 and here, on the tiny GPT-2, Llama (byte-level and SentencePiece-
style tokens) and Marian, and compare token strings and ids, positions, shapes and numbers within 1e-5; they are
skipped when inseq is not installed. The other tests need only this library."""

import copy
import functools
import math
import sys

import pytest
import torch

import inseq_lightning as il
from inseq_lightning import FeatureAttributionOutput, TokenWithId
from inseq_lightning.tiny_models import metaspace_tokenizer, tiny_gpt2, tiny_llama, tiny_marian

BUILD = {
    "gpt2": tiny_gpt2,
    "llama": tiny_llama,
    "metaspace": lambda: tiny_llama(tokenizer=metaspace_tokenizer()),
    "marian": tiny_marian,
}
TEXTS = {
    "gpt2": ("Hello world", "Hello world, this is a cat"),
    "llama": ("The cat sat", "The cat sat on the mat"),
    "metaspace": ("The cat sat", "The cat sat on the mat"),
    "marian": ("Hello world", "Le chat est noir"),
}
BATCH = {
    "gpt2": (["Hello world", "The cat"], ["Hello world, this is a cat", "The cat sat"]),
    "marian": (["Hello world", "The cat sat on"], ["Le chat est noir", "Le chat"]),
}
FAMILIES = ["gpt2", "llama", "metaspace", "marian"]


@functools.cache
def hf(name):
    return BUILD[name]()


@pytest.fixture(scope="module")
def inseq():
    return pytest.importorskip("inseq", reason="parity tests need inseq 0.7.1 (pip install --no-deps inseq==0.7.1)")


_CACHE = {}


def ours(name, texts=None, method="saliency", **kwargs) -> FeatureAttributionOutput:
    key = ("ours", name, repr(texts), method, repr(sorted(kwargs.items())))
    if key not in _CACHE:
        model, tok = hf(name)
        _CACHE[key] = il.load_model(model, method, tokenizer=tok).attribute(
            *(texts or TEXTS[name]), show_progress=False, **copy.deepcopy(kwargs))
    return copy.deepcopy(_CACHE[key])


def theirs(inseq, name, texts=None, method="saliency", **kwargs):
    key = ("inseq", name, repr(texts), method, repr(sorted(kwargs.items())))
    if key not in _CACHE:
        from test_parity_inseq import inseq_reference

        model, tok = hf(name)
        _CACHE[key] = inseq.load_model(inseq_reference(model), method, tokenizer=copy.deepcopy(tok)).attribute(
            *(texts or TEXTS[name]), show_progress=False, **copy.deepcopy(kwargs))
    return copy.deepcopy(_CACHE[key])


def both(inseq, name, texts=None, method="saliency", **kwargs):
    return ours(name, texts, method, **kwargs), theirs(inseq, name, texts, method, **kwargs)


def assert_close(a, b, what, scale: bool = False):
    if b is None:
        assert a is None, what
        return
    assert a is not None and tuple(a.shape) == tuple(b.shape), f"{what}: {None if a is None else a.shape} vs {b.shape}"
    assert torch.equal(a.isnan(), b.isnan()), f"{what}: NaN pattern differs"
    norm = b.nan_to_num().abs().max().clamp_min(1e-30) if scale else 1.0
    diff = ((a.nan_to_num() - b.nan_to_num()).abs().max() / norm).item() if a.numel() else 0.0
    assert diff < 1e-5, f"{what}: max abs diff {diff}"


def tokens(seq_tokens):
    return [(t.token, t.id) for t in seq_tokens]


def assert_same(a, b, what="", ids: bool = True):
    """Same token strings (and ids), positions, scores and step scores."""
    pick = tokens if ids else (lambda ts: [t.token for t in ts])
    assert pick(a.source) == pick(b.source), f"{what} source"
    assert pick(a.target) == pick(b.target), f"{what} target"
    assert (a.attr_pos_start, a.attr_pos_end) == (b.attr_pos_start, b.attr_pos_end), what
    assert_close(a.source_attributions, b.source_attributions, f"{what} source_attributions")
    assert_close(a.target_attributions, b.target_attributions, f"{what} target_attributions")
    assert set(a.step_scores) == set(b.step_scores or {}), what
    for name in a.step_scores:
        assert_close(a.step_scores[name], b.step_scores[name], f"{what} {name}")


# =====================================================================================================
# Parity with inseq 0.7.1
# =====================================================================================================
def test_aggregator_and_function_names_equal_inseqs(inseq):
    assert set(inseq.list_aggregators()) <= set(il.list_aggregators())
    assert set(il.list_aggregators()) - set(inseq.list_aggregators()) == {"words"}
    assert set(il.list_aggregation_functions()) == set(inseq.list_aggregation_functions())


@pytest.mark.parametrize("family", FAMILIES)
def test_slicing_equals_inseq(inseq, family):
    kwargs = {"attribute_target": True} if family == "marian" else {}
    mine, ref = both(inseq, family, step_scores=["probability", "entropy"], **kwargs)
    a, b = mine[0], ref[0]
    assert_same(a[1:4], b[1:4], "raw slice")
    assert_same(a.aggregate()[1:4], b.aggregate()[1:4], "aggregated slice")
    assert_same(a[1:4].aggregate(), b[1:4].aggregate(), "slice then aggregate")
    spans = [(0, 2)] if family == "marian" else [(0, 1), (2, 3)]
    side = "source_spans" if family == "marian" else "target_spans"
    assert_same(a.aggregate().aggregate("slices", **{side: spans}), b.aggregate().aggregate("slices", **{side: spans}),
                "slices")


@pytest.mark.parametrize("special_chars", [("Ġ",), "▁", ("Ġ", "Ċ")])
@pytest.mark.parametrize("family", FAMILIES)
def test_subwords_equal_inseq(inseq, family, special_chars):
    kwargs = {"attribute_target": True} if family == "marian" else {}
    mine, ref = both(inseq, family, step_scores=["probability", "entropy"], **kwargs)
    a, b = mine[0], ref[0]
    options = {"special_chars": special_chars}
    assert_same(a.aggregate(["subwords", "scores"], **options), b.aggregate(["subwords", "scores"], **options),
                "raw subwords then scores")
    assert_same(a.aggregate().aggregate("subwords", **options), b.aggregate().aggregate("subwords", **options),
                "aggregated then subwords")
    assert_same(a.aggregate().aggregate("subwords", aggregate_source=False, aggregate_fn="mean", **options),
                b.aggregate().aggregate("subwords", aggregate_source=False, aggregate_fn="mean", **options),
                "target only, mean")


def test_subwords_keep_marians_end_of_sequence_token_apart_as_inseq(inseq):
    mine, ref = both(inseq, "marian", attribute_target=True)
    a = mine[0].aggregate().aggregate("subwords", special_chars=("Ġ",))
    assert_same(a, ref[0].aggregate().aggregate("subwords", special_chars=("Ġ",)))
    assert a.target[-1].token == "</s>" and a.source[-1].token == "</s>"
    # the library's own word merging is still there, by name
    assert mine[0].aggregate().aggregate("words").target[-1].token == "Ġnoir</s>"


@pytest.mark.parametrize("mode", ["single", "start", "end"])
@pytest.mark.parametrize("family", ["gpt2", "marian"])
def test_split_equals_inseq(inseq, family, mode):
    mine, ref = both(inseq, family, step_scores=["probability"])
    options = {"split_pattern": "Ġ", "split_mode": mode}
    assert_same(mine[0].aggregate().aggregate("split", **options), ref[0].aggregate().aggregate("split", **options))


@pytest.mark.parametrize("family", ["gpt2", "marian"])
def test_scores_aggregator_and_select_idx_equal_inseq(inseq, family):
    """Attention's raw scores are [tokens, steps, layers, heads]; select_idx picks indices of the last dimension.
    inseq's default function of the bare "scores" aggregator depends on which output classes were created before
    (it mutates a shared dict), so the function is given explicitly here."""
    kwargs = {"attribute_target": True} if family == "marian" else {}
    mine, ref = both(inseq, family, method="attention", **kwargs)
    a, b = mine[0], ref[0]
    cases = [
        {"aggregator": ["scores", "scores"], "aggregate_fn": ["mean", "max"], "select_idx": (0, 2)},
        {"aggregator": ["scores", "scores"], "aggregate_fn": ["sum", "mean"], "select_idx": [0, -1]},
        {"aggregator": "scores", "aggregate_fn": "mean", "select_idx": 1, "do_post_aggregation_checks": False},
        {"aggregator": ["mean", "mean"], "rescale": True, "normalize": False},
        {"aggregator": ["subwords", "mean", "absmax"], "special_chars": "Ġ"},
    ]
    for case in cases:
        assert_same(a.aggregate(**case), b.aggregate(**case), str(case))
    granular, granular_ref = both(inseq, family, step_scores=["probability"], **kwargs)
    for case in ({"aggregator": "scores"}, {"aggregator": ["subwords", "scores"], "special_chars": ("Ġ",)},
                 {"aggregator": "vnorm", "vnorm_ord": 1}, {"aggregator": "scores", "select_idx": (0, 16)}):
        assert_same(granular[0].aggregate(**case), granular_ref[0].aggregate(**case), str(case))


def test_pair_equals_inseq_and_minus_is_a_minus_b(inseq):
    a, a_ref = both(inseq, "gpt2", method="saliency", step_scores=["probability"])
    b, b_ref = both(inseq, "gpt2", method="input_x_gradient", step_scores=["probability"])
    a, b, a_ref, b_ref = a[0].aggregate(), b[0].aggregate(), a_ref[0].aggregate(), b_ref[0].aggregate()
    assert_same(a.aggregate("pair", paired_attr=b), a_ref.aggregate("pair", paired_attr=b_ref), "pair (b - a)")
    # inseq's `a - b` is its pair default, b - a; here a - b is a - b.
    assert_same(a - b, b_ref - a_ref, "a - b")
    torch.testing.assert_close((a - b).target_attributions, a.target_attributions - b.target_attributions,
                               equal_nan=True)


@pytest.mark.parametrize("family", ["gpt2", "marian"])
def test_weight_scores_dicts_extremes_and_decoding_equal_inseq(inseq, family):
    kwargs = {"attribute_target": True} if family == "marian" else {}
    mine, ref = both(inseq, family, step_scores=["probability"], **kwargs)
    a, b = copy.deepcopy(mine[0]), copy.deepcopy(ref[0])
    assert_same(a.weight_attributions("probability"), b.weight_attributions("probability"), "weighted")
    assert_same(a.aggregate(), b.aggregate(), "weighted is aggregated")
    whole, whole_ref = copy.deepcopy(mine), copy.deepcopy(ref)
    assert whole.weight_attributions("probability") is None
    whole_ref.weight_attributions("probability")
    assert_same(whole[0], whole_ref[0], "output weighted in place")
    for x, y in ((mine[0], ref[0]), (mine[0].aggregate(), ref[0].aggregate())):
        assert math.isclose(x.minimum, y.minimum, abs_tol=1e-7) and math.isclose(x.maximum, y.maximum, abs_tol=1e-7)
    dicts, dicts_ref = mine.get_scores_dicts(), ref.get_scores_dicts()
    assert len(dicts) == len(dicts_ref) == 1
    for part in ("source_attributions", "target_attributions", "step_scores"):
        assert list(dicts[0][part]) == list(dicts_ref[0][part]), part
        for key, inner in dicts[0][part].items():
            assert list(inner) == list(dicts_ref[0][part][key]), (part, key)
            for k, v in inner.items():
                w = dicts_ref[0][part][key][k]
                assert (math.isnan(v) and math.isnan(w)) or abs(v - w) < 1e-5, (part, key, k)
    tok = hf(family)[1]
    assert_same(copy.deepcopy(mine).decode_tokens(tok)[0], copy.deepcopy(ref).decode_tokens(tok)[0], "decoded")


def test_equality_follows_inseq(inseq):
    mine, ref = both(inseq, "marian", step_scores=["probability"], output_step_attributions=True)
    assert (mine == copy.deepcopy(mine)) and (ref == copy.deepcopy(ref))
    assert (mine[0] == copy.deepcopy(mine[0])) == (ref[0] == copy.deepcopy(ref[0])) is True
    other, other_ref = both(inseq, "marian", texts=("Hello there", "Le chat est noir"), step_scores=["probability"])
    assert (mine[0] == other[0]) == (ref[0] == other_ref[0]) is False
    assert (mine[0].aggregate() == mine[0]) is False  # shapes differ: not equal, no error
    assert (mine.step_attributions[0] == copy.deepcopy(mine.step_attributions[0])) is True


@pytest.mark.parametrize("family", ["gpt2", "marian"])
def test_info_has_every_field_inseq_records(inseq, family):
    mine, ref = both(inseq, family, step_scores=["probability"])
    assert set(ref.info) <= set(mine.info)
    for key in ("attribution_method", "input_texts", "generated_texts", "attribute_target", "step_scores",
                "attribution_args", "attributed_fn_args", "step_scores_args", "generation_args", "include_eos_baseline",
                "output_step_attributions", "constrained_decoding", "generate_from_target_prefix", "model_class",
                "tokenizer_class", "tokenizer_name"):
        assert mine.info[key] == ref.info[key], key
    generated, generated_ref = both(inseq, family, texts=(TEXTS[family][0],),
                                    generation_args={"max_new_tokens": 3, "do_sample": False})
    assert generated.info["constrained_decoding"] is generated_ref.info["constrained_decoding"] is False


def _assert_same_steps(mine, ref, what):
    assert len(mine.step_attributions) == len(ref.step_attributions), what
    for k, (a, b) in enumerate(zip(mine.step_attributions, ref.step_attributions)):
        where = f"{what} step {k}"
        for name in ("source", "prefix"):
            rows, rows_ref = getattr(a, name), getattr(b, name)
            assert (None if rows is None else [tokens(r) for r in rows]) == \
                   (None if rows_ref is None else [tokens(r) for r in rows_ref]), f"{where} {name}"
        assert [tokens(r) for r in a.target] == [tokens(r) for r in b.target], f"{where} target"
        assert set(a.step_scores) == set(b.step_scores), where
        for name in a.step_scores:
            assert_close(a.step_scores[name], b.step_scores[name], f"{where} {name}")
        for name in ("source_attributions", "target_attributions"):
            x, y = getattr(a, name), getattr(b, name)
            if y is None:
                assert x is None, where
                continue
            assert x.shape == y.shape, f"{where} {name}: {x.shape} vs {y.shape}"
            # Source rows past a sequence's source are NaN here (inseq holds the pad tokens' scores there).
            padding = x.isnan() & ~y.isnan()
            if name == "source_attributions" and a.source is not None:
                for i, row in enumerate(a.source):
                    real = len(mine[i].source) if i < len(mine.sequence_attributions) else len(row)
                    assert padding[i, :real].sum() == 0, where
            assert_close(torch.where(padding, torch.nan, y), x, f"{where} {name}", scale=True)


@pytest.mark.parametrize(("family", "method", "kwargs"), [
    ("gpt2", "saliency", {"step_scores": ["probability"]}),
    ("marian", "saliency", {"step_scores": ["probability"], "attribute_target": True}),
    ("marian", "input_x_gradient", {"step_scores": ["probability"]}),
    ("marian", "attention", {}),
])
def test_step_outputs_equal_inseq(inseq, family, method, kwargs):
    mine, ref = both(inseq, family, BATCH[family], method, output_step_attributions=True, **kwargs)
    _assert_same_steps(mine, ref, f"{family} {method}")
    first = mine.step_attributions[0]
    assert first.sequence_scores == {} and first.prefix is not None
    # the per-step view agrees with the sequence outputs: step k of a sequence is its column k
    seq = mine[0]
    steps = [s for s in mine.step_attributions if s.target[0][0] is not None][: seq.attr_pos_end - seq.attr_pos_start]
    for k, step in enumerate(steps):
        assert step.target[0][0] == seq.generated[k] and step.target[0] == seq.generated[k]
        if seq.target_attributions is not None:
            rows = step.target_attributions.shape[1]
            assert rows == seq.attr_pos_start + k
            assert_close(step.target_attributions[0], seq.target_attributions[:rows, k], "column")


@pytest.mark.parametrize("family", ["gpt2", "marian"])
def test_clean_special_chars_equals_inseq(inseq, family):
    mine, ref = both(inseq, family, BATCH[family], step_scores=["probability"], output_step_attributions=True,
                     clean_special_chars=True)
    for a, b in zip(mine, ref):
        assert_same(a, b, "cleaned")
    assert any(t.token.startswith(" ") for t in mine[0].target) and not any("Ġ" in t.token for t in mine[0].target)
    _assert_same_steps(mine, ref, "cleaned steps")


def test_generate_from_target_prefix_equals_inseq(inseq):
    args = {"max_new_tokens": 6, "do_sample": False}
    mine, ref = both(inseq, "marian", texts=(["The cat"], ["Il"]), step_scores=["probability"],
                     generate_from_target_prefix=True, generation_args=args)
    assert mine.info["generated_texts"] == ref.info["generated_texts"]
    assert mine.info["generated_texts"][0].startswith("Il") and mine.info["generated_texts"][0] != "Il"
    assert mine.info["generate_from_target_prefix"] is ref.info["generate_from_target_prefix"] is True
    assert mine.info["constrained_decoding"] is ref.info["constrained_decoding"] is True
    assert_same(mine[0].aggregate(), ref[0].aggregate(), "generated from a prefix")
    # Decoder-only: ignored, as in inseq.
    plain = ours("gpt2", step_scores=["probability"])
    ignored = ours("gpt2", step_scores=["probability"], generate_from_target_prefix=True)
    assert ignored.info["generate_from_target_prefix"] is False
    assert_same(ignored[0], plain[0])


def test_generate_from_target_prefix_of_several_inputs_continues_each_prefix():
    """inseq 0.7.1 pads shorter prefixes in its batched ``generate`` (a prefix is then followed by pad tokens):
    here each input continues its own prefix, as it does alone."""
    args = {"max_new_tokens": 6, "do_sample": False}
    together = ours("marian", texts=(["Hello world", "The cat"], ["Le chat", "Il"]),
                    generate_from_target_prefix=True, generation_args=args)
    alone = ours("marian", texts=(["The cat"], ["Il"]), generate_from_target_prefix=True, generation_args=args)
    assert together.info["generated_texts"][1] == alone.info["generated_texts"][0]
    assert_same(together[1], alone[0])


def test_encoder_decoder_positions_are_those_computed_where_inseq_reports_one_lower(inseq):
    """With attr_pos_end below the target's length inseq attributes positions attr_pos_start..attr_pos_end (both
    included) but reports [attr_pos_start - 1, attr_pos_end): its columns are labelled with the tokens one to the
    left of those its step outputs (and scores) are for. Same scores here, reported at the positions computed."""
    mine, ref = both(inseq, "marian", BATCH["marian"], step_scores=["probability"], attr_pos_start=2,
                     attr_pos_end=5, output_step_attributions=True)
    a, b = mine[0], ref[0]
    assert (a.attr_pos_start, a.attr_pos_end) == (2, 6) and (b.attr_pos_start, b.attr_pos_end) == (1, 5)
    assert_close(a.aggregate().source_attributions, b.aggregate().source_attributions, "same scores")
    assert_close(a.step_scores["probability"], b.step_scores["probability"], "same step scores")
    computed = [step.target[0][0].token for step in ref.step_attributions]  # inseq's own record of each step
    assert [t.token for t in a.generated] == computed
    assert [t.token for t in b.target[b.attr_pos_start : b.attr_pos_end]] == [t.token for t in a.target[1:5]]
    assert_same(mine[1], ref[1], "a sequence ending before attr_pos_end is reported right by both")


def test_cli_takes_inseqs_aggregators_selectors_and_prefix_generation(tmp_path):
    from inseq_lightning.cli import _supported_aggregators, main

    assert {"split", "slices", "pair", "scores", "subwords", "spans"} <= set(_supported_aggregators())
    model, tok = hf("marian")
    model.save_pretrained(tmp_path / "marian")
    tok.save_pretrained(tmp_path / "marian")
    common = ["attribute", "-m", str(tmp_path / "marian"), "-i", "Hello world", "--hide", "--dev", "cpu"]
    assert main([*common, "-a", "attention", "-g", "Le chat", "--attribution_aggregators", "scores", "scores",
                 "--attribution_selectors", "0", "1", "-o", str(tmp_path / "attention.json")]) in (0, None)
    loaded = FeatureAttributionOutput.load(tmp_path / "attention.json")
    raw = ours("marian", texts=("Hello world", "Le chat"), method="attention")
    expected = raw.aggregate("scores", select_idx=0).aggregate("scores", select_idx=1)
    assert_close(loaded[0].source_attributions, expected[0].source_attributions, "CLI selectors")
    assert main([*common, "-g", "Le", "--generate_from_target_prefix", "--generation_kwargs",
                 '{"max_new_tokens": 3, "do_sample": false}', "-o", str(tmp_path / "prefix.json")]) in (0, None)
    info = FeatureAttributionOutput.load(tmp_path / "prefix.json").info
    assert info["generate_from_target_prefix"] is True and info["generated_texts"][0].startswith("Le")


# =====================================================================================================
# This library alone
# =====================================================================================================
def test_equality_no_longer_raises_and_survives_a_file(tmp_path):
    out = ours("gpt2", BATCH["gpt2"], step_scores=["probability"], output_step_attributions=True)
    assert out == copy.deepcopy(out) and out[0] == copy.deepcopy(out[0])
    assert out[0] != out[1] and out != ours("gpt2", step_scores=["probability"])
    changed = copy.deepcopy(out)
    changed[0].target_attributions[0, 0, 0] += 1e-3
    assert changed != out and changed[0] != out[0]
    close = copy.deepcopy(out)
    close[0].target_attributions[0, 0, 0] += 1e-7
    assert close == out
    out.save(tmp_path / "out.json")
    assert FeatureAttributionOutput.load(tmp_path / "out.json") == out
    assert TokenWithId("Hell", 3) == "Hell" and TokenWithId("Hell", 3) == 3 and TokenWithId("a", 1) != "b"


def test_subwords_is_inseqs_and_words_is_this_librarys():
    seq = ours("gpt2")[0].aggregate()
    assert [t.token for t in seq.aggregate("subwords").target] == [t.token for t in seq.target]  # no "▁" here
    assert seq.aggregate("words").target[0].token == "Hello"
    inseqs = seq.aggregate("subwords", special_chars=("Ġ",))
    assert inseqs.target[1].token == "Ġworld,"  # inseq merges across the prompt's end ...
    assert seq.aggregate("words").target[1].token == "Ġworld"  # ... this library splits there
    with pytest.raises(ValueError, match="Unknown aggregator"):
        seq.aggregate("subword")
    with pytest.raises(TypeError, match="unexpected keyword"):
        seq.aggregate("subwords", special_char="Ġ")


def test_slices_and_pair_validate_their_inputs():
    seq = ours("marian", attribute_target=True)[0]
    with pytest.raises(TypeError, match="slice"):
        seq[2]
    with pytest.raises(ValueError, match="paired_attr"):
        seq.aggregate("pair")
    other = ours("marian", texts=("Hello world", "Le chat"), attribute_target=True)[0]
    with pytest.raises(ValueError, match="same length"):
        seq - other
    assert [t.token for t in seq[:2].source] == [t.token for t in seq.source[:2]]


def test_step_outputs_keep_inseqs_layout_and_round_trip(tmp_path):
    out = ours("marian", BATCH["marian"], step_scores=["probability"], output_step_attributions=True,
               attribute_target=True)
    steps = out.step_attributions
    assert len(steps) == 9 and all(len(s.target) == 2 for s in steps)
    assert steps[0].source_attributions.shape[:2] == (2, 7) and steps[3].target_attributions.shape[:2] == (2, 4)
    assert [t.token for t in steps[4].prefix[1]] == ["<pad>", "Le", "Ġc", "hat", "</s>"]
    assert steps[4].target[1][0].token == "<pad>" and steps[4].step_scores["probability"][1].isnan()
    out.save(tmp_path / "steps.json")
    assert FeatureAttributionOutput.load(tmp_path / "steps.json").step_attributions == steps
    out.save(tmp_path / "split.json", split_sequences=True)
    second = FeatureAttributionOutput.load(tmp_path / "split_1.json")
    assert len(second.step_attributions) == out[1].attr_pos_end - out[1].attr_pos_start
    assert second.step_attributions[0].source_attributions.shape[1] == len(out[1].source)


def test_show_takes_inseqs_options(capsys):
    import matplotlib.figure

    raw = ours("marian", method="attention", attribute_target=True)
    seq = raw[0]
    html = seq.show(do_aggregation=False, display=False, return_html=True)
    assert html.count("<table") == 2 * 2  # source and target, a panel per layer (4 heads: head 0 shown)
    assert "Model Layer #1" in html and "Attention Head #0 of 4" in html
    heads = seq.show(do_aggregation=False, show_dim="Attention Head", display=False, return_html=True)
    assert heads.count("<table") == 2 * 4 and "Model Layer #0 of 2" in heads
    sliced = seq.show_granular(slice_dims={3: (1, 3)}, show_dim=3, display=False, return_html=True)
    assert sliced.count("<table") == 2 * 2
    with pytest.raises(ValueError, match="maximum show size"):
        seq.show(do_aggregation=False, show_dim=3, max_show_size=2, display=False)
    assert isinstance(seq.show(display=False, return_figure=True), matplotlib.figure.Figure)
    assert isinstance(seq.show_granular(display=False, return_figure=True), matplotlib.figure.Figure)
    figures = raw.show(display=False, return_figure=True)
    assert isinstance(figures, list) and len(figures) == 1
    with pytest.raises(ValueError, match="Only one"):
        seq.show(display=False, return_html=True, return_figure=True)
    tokens_html = raw.show_tokens(display=False, return_html=True, step_score_highlight=None, wrap_after=2)
    assert "<details" in tokens_html and "Source attributions for" in tokens_html and "<script" not in tokens_html
    scores = ours("gpt2", step_scores=["probability"])
    highlighted = scores.show_tokens(display=False, return_html=True, step_score_highlight="probability",
                                     replace_char={"Ġ": " "})
    assert "probability highlights" in highlighted
    with pytest.raises(ValueError, match="entropy"):
        scores.show_tokens(display=False, step_score_highlight="entropy")
    assert il.show_granular_attributions(seq, display=False, return_html=True).count("<table") == 4
    assert "<details" in il.show_token_attributions(scores[0].aggregate(), display=False, return_html=True)
    capsys.readouterr()
    assert seq.show_granular() is None and raw.show_tokens() is None and seq.show(do_aggregation=False) is None
    printed = capsys.readouterr().out
    assert "Model Layer #0" in printed and "Hell" in printed


def test_exports_without_a_notebook(tmp_path):
    pd = pytest.importorskip("pandas")
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    out = ours("gpt2", BATCH["gpt2"], step_scores=["probability", "entropy"])
    page = out.save_html(tmp_path / "out.html")
    assert page.read_text().count("<table") == 2
    png = out[0].save_figure(tmp_path / "seq.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svgs = out.save_figure(tmp_path / "out.svg")
    assert [p.name for p in svgs] == ["out_0.svg", "out_1.svg"] and "<svg" in svgs[1].read_text()
    records = out.to_records()
    aggregated = out.aggregate()
    n_scores = sum(int((~s.target_attributions.isnan()).sum()) for s in aggregated)
    assert len(records) == n_scores
    first = records[0]
    assert list(first)[:8] == ["sequence", "step", "generated_position", "generated_token", "side", "position",
                               "token", "score"]
    assert first["probability"] == pytest.approx(aggregated[0].step_scores["probability"][0].item())
    assert first["score"] == pytest.approx(aggregated[0].target_attributions[0, 0].item())
    frame = out.to_dataframe()
    frame.to_parquet(tmp_path / "scores.parquet")
    back = pq.read_table(tmp_path / "scores.parquet").to_pandas()
    assert len(back) == n_scores and set(back["sequence"]) == {0, 1} and set(back["side"]) == {"target"}
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "arrow.parquet")
    assert pq.read_table(tmp_path / "arrow.parquet").num_rows == n_scores
    encdec = ours("marian", attribute_target=True).to_dataframe()
    assert set(encdec["side"]) == {"source", "target"}
    assert isinstance(frame, pd.DataFrame)


def test_to_dataframe_without_pandas_says_what_to_do(monkeypatch):
    out = ours("gpt2")
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ImportError, match="pip install pandas"):
        out.to_dataframe()
    assert out.to_records()  # needs nothing


def test_a_bare_output_renders_its_heatmap_in_a_notebook():
    out = ours("marian", step_scores=["probability"])
    for obj in (out, out[0], out.aggregate(), out[0].aggregate()):
        html = obj._repr_html_()
        assert html.startswith("<div") and html.count("<table") == 1 and "probability" in html
    granular = ours("marian", method="attention")[0]
    assert granular._repr_html_().count("<table") >= 1
    assert len(repr(out)) < 1500 and "tensor[" in repr(out[0])


class _FakeShell:
    def __init__(self, cls_name: str, module: str, kernel=None):
        self.__class__ = type(cls_name, (_FakeShell,), {"__module__": module})
        self.kernel = kernel


@pytest.mark.parametrize(("cls_name", "module", "kernel", "expected"), [
    ("ZMQInteractiveShell", "ipykernel.zmqshell", object(), True),  # Jupyter, JupyterLab, VS Code
    ("Shell", "google.colab._shell", None, True),  # Colab
    ("TerminalInteractiveShell", "IPython.terminal.interactiveshell", None, False),
    ("DatabricksShell", "dbruntime", object(), True),  # any other shell with a kernel
])
def test_notebook_front_ends_get_html(monkeypatch, capsys, cls_name, module, kernel, expected):
    pytest.importorskip("IPython")
    import IPython
    import IPython.display

    from inseq_lightning import viz

    shown = []
    monkeypatch.setattr(IPython, "get_ipython", lambda: _FakeShell(cls_name, module, kernel))
    monkeypatch.setattr(IPython.display, "display", lambda obj: shown.append(obj))
    assert viz.in_notebook() is expected
    out = ours("gpt2", step_scores=["probability"])
    assert out.show() is None
    printed = capsys.readouterr().out
    if expected:
        assert len(shown) == 1 and "<table" in shown[0].data and printed == ""
    else:
        assert shown == [] and "Hell" in printed
