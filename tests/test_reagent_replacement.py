"""reagent's ``replacement="pos_tag"``: replaced tokens keep their tag (a custom tagger, or nltk's when it
and its data are installed, faked here), the vocabulary is tagged once per (tokenizer, tagger), draws are
seeded, and every misuse is a typed error that leaves the model as it was."""

import copy
import sys
import types

import pytest
import torch
from model_state import assert_same, snapshot

import inseq_lightning as il
from inseq_lightning.attr.methods import reagent as R
from inseq_lightning.errors import InvalidInputError

DECODER_TEXTS = ("The cat sat", "The cat sat on the mat")
TWO_TEXTS = (["The cat sat", "A dog ran far away"],
             ["The cat sat on the mat and looked", "A dog ran far away from the box"])
ARGS = {"max_probe_steps": 3, "num_probes": 4}
SINGLETON = "The"  # one vocabulary token of the tiny tokenizers strips to "The": its tag has no other token


def tag_of(text: str) -> str:
    if text == SINGLETON:
        return "ONLY"
    if not text:
        return "EMPTY"
    if text[0].isalpha():
        return f"WORD{min(len(text), 3)}"
    return "DIGIT" if text[0].isdigit() else "OTHER"


class CountingTagger:
    """A deterministic tagger (a pure function of each string) that counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, words):
        self.calls += 1
        return [tag_of(w) for w in words]


def text_of(tok, token_id: int) -> str:
    return tok.convert_tokens_to_string([tok.convert_ids_to_tokens(int(token_id))]).strip()


def check_replacements(tok, original: torch.Tensor, replaced: torch.Tensor) -> int:
    """Every changed token has its original's tag, unless the original has no same-tag partner (a special
    token or the singleton), when it is any non-special token; returns how many were checked."""
    special = set(tok.all_special_ids)
    changed = (original != replaced).nonzero().tolist()
    for where in changed:
        old, new = int(original[tuple(where)]), int(replaced[tuple(where)])
        assert new not in special, (old, new)
        if old in special or text_of(tok, old) == SINGLETON:
            continue
        assert tag_of(text_of(tok, new)) == tag_of(text_of(tok, old)), (text_of(tok, old), text_of(tok, new))
    return len(changed)


@pytest.fixture()
def pair(hf_models, request):
    model, tok = hf_models[request.param]
    return copy.deepcopy(model), copy.deepcopy(tok)


# ---- the draws themselves ---------------------------------------------------------------------------
def test_pos_tag_replacements_keep_the_tag_and_fall_back_to_uniform(hf_models):
    _, tok = hf_models["llama"]  # three special tokens
    tagger = CountingTagger()
    table = R.pos_tag_table(tok, len(tok), tagger)
    assert R.pos_tag_table(tok, len(tok), tagger) is table and tagger.calls == 1  # cached
    special = set(tok.all_special_ids)
    vocab = [i for i in range(len(tok)) if i not in special]
    assert table.candidates.tolist() == vocab
    ids = torch.arange(len(tok)).repeat(40).view(8, 5, -1)  # every id, specials included, 40 times
    out = R.pos_tag_replacements(ids, table, torch.Generator().manual_seed(0))
    assert out.shape == ids.shape
    again = R.pos_tag_replacements(ids, table, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    singleton = next(i for i in vocab if text_of(tok, i) == SINGLETON)
    drawn_for = {}
    for old, new in zip(ids.flatten().tolist(), out.flatten().tolist()):
        assert new not in special
        drawn_for.setdefault(old, set()).add(new)
        if old in special or old == singleton:
            continue
        assert new != old  # a draw among the *other* tokens with the tag
        assert tag_of(text_of(tok, new)) == tag_of(text_of(tok, old))
    # the fallback is a uniform draw over the whole non-special vocabulary, not one tag's tokens
    for old in [*special, singleton]:
        assert len({tag_of(text_of(tok, new)) for new in drawn_for[old]}) > 1
    # a small group is covered: every other member is drawn for each of its tokens
    digits = [i for i in vocab if tag_of(text_of(tok, i)) == "DIGIT"]
    assert len(digits) > 2
    for old in digits:
        assert drawn_for[old] == set(digits) - {old}


# ---- through attribute() ----------------------------------------------------------------------------
@pytest.mark.parametrize("pair", ["gpt2", "llama", "marian"], indirect=True)
def test_reagent_pos_tag_replaces_within_tags_and_scores_are_distributions(pair, monkeypatch):
    model, tok = pair
    encdec = model.config.is_encoder_decoder
    texts = ("Hello world", "Le chat est noir") if encdec else TWO_TEXTS
    kwargs = {"attribute_target": True} if encdec else {}
    forwards, draws = [], []
    forward, draw = R._Probing._forward, R.pos_tag_replacements

    def spy_forward(self, ids, read):
        forwards.append((self.ids.clone(), ids.clone()))
        return forward(self, ids, read)

    def spy_draw(ids, table, generator):
        out = draw(ids, table, generator)
        draws.append((ids.clone(), out.clone()))
        return out

    monkeypatch.setattr(R._Probing, "_forward", spy_forward)
    monkeypatch.setattr(R, "pos_tag_replacements", spy_draw)
    tagger = CountingTagger()
    wrapper = il.load_model(model, "reagent", tokenizer=tok)
    out = wrapper.attribute(*texts, replacement="pos_tag", tagger=tagger, seed=0, **ARGS, **kwargs)
    assert draws and forwards
    assert sum(check_replacements(tok, ids, replaced) for ids, replaced in draws) > 0
    for ids, replaced in draws:  # a token with same-tag partners is never "replaced" by itself
        fallback = [i for i in torch.unique(ids).tolist() if i in tok.all_special_ids or text_of(tok, i) == SINGLETON]
        keeps_tag = ~torch.isin(ids, torch.tensor(fallback, dtype=ids.dtype))
        assert (replaced != ids)[keeps_tag].all()
    perturbed = sum(check_replacements(tok, original.expand_as(ids), ids) for original, ids in forwards)
    assert perturbed > 0  # the perturbed inputs the model saw
    for seq in out.sequence_attributions:
        for n in range(len(seq.generated)):
            position = seq.attr_pos_start + n
            column = seq.target_attributions[:position, n]
            total = column.sum() + (seq.source_attributions[:, n].sum() if encdec else 0)
            assert torch.isfinite(column).all()
            assert float(total) == pytest.approx(1.0, abs=1e-5)
    # the vocabulary is tagged once per (tokenizer, tagger), not per call or round
    wrapper.attribute(*texts, replacement="pos_tag", tagger=tagger, seed=1, **ARGS, **kwargs)
    assert tagger.calls == 1
    other = CountingTagger()  # another tagger object: its own table
    wrapper.attribute(*texts, replacement="pos_tag", tagger=other, seed=1, **ARGS, **kwargs)
    assert other.calls == 1 and tagger.calls == 1


def test_an_unhashable_tagger_is_cached_by_identity():
    """A tagger need not be hashable (a dataclass with eq is not): its table is cached by identity."""
    from dataclasses import dataclass, field

    from inseq_lightning.tiny_models import tiny_gpt2

    @dataclass
    class DataclassTagger:
        calls: list = field(default_factory=list)

        def __call__(self, words):
            self.calls.append(len(words))
            return [tag_of(w) for w in words]

    _, tok = tiny_gpt2()
    tagger = DataclassTagger()
    with pytest.raises(TypeError):
        hash(tagger)
    table = R.pos_tag_table(tok, len(tok), tagger)
    assert R.pos_tag_table(tok, len(tok), tagger) is table and len(tagger.calls) == 1


@pytest.mark.parametrize("pair", ["gpt2"], indirect=True)
def test_reagent_pos_tag_is_seeded(pair):
    model, tok = pair
    wrapper = il.load_model(model, "reagent", tokenizer=tok)
    tagger = CountingTagger()
    args = {"replacement": "pos_tag", "tagger": tagger, **ARGS}
    rng = torch.get_rng_state()
    a = wrapper.attribute(*TWO_TEXTS, seed=3, **args)
    b = wrapper.attribute(*TWO_TEXTS, seed=3, rows_per_forward=5, **args)  # chunking draws nothing else
    c = wrapper.attribute(*TWO_TEXTS, seed=4, **args)
    uniform = wrapper.attribute(*TWO_TEXTS, seed=3, **ARGS)
    assert torch.equal(torch.get_rng_state(), rng)
    for x, y, z, u in zip(a.sequence_attributions, b.sequence_attributions, c.sequence_attributions,
                          uniform.sequence_attributions):
        torch.testing.assert_close(x.target_attributions, y.target_attributions, equal_nan=True)
        assert not torch.allclose(x.target_attributions.nan_to_num(), z.target_attributions.nan_to_num())
        assert not torch.allclose(x.target_attributions.nan_to_num(), u.target_attributions.nan_to_num())


# ---- nltk, faked: present with its data, present without it, absent -----------------------------------
def fake_nltk(monkeypatch, data: bool):
    """``nltk``, ``nltk.tag`` and ``nltk.tag.perceptron`` modules whose perceptron tagger tags with
    :func:`tag_of` (``data=False``: its data is not found); ``nltk.download`` must never be called."""
    class PerceptronTagger:
        def __init__(self):
            if not data:
                raise LookupError("Resource averaged_perceptron_tagger_eng not found.")

        def tag(self, words):
            assert len(words) == 1  # each vocabulary token tagged alone, as inseq does
            return [(w, tag_of(w)) for w in words]

    def find(resource):
        assert resource == "taggers/averaged_perceptron_tagger_eng/"
        if not data:
            raise LookupError(f"Resource {resource} not found.")
        return resource

    def download(*args, **kwargs):
        raise AssertionError("nltk.download must never be called")

    nltk = types.ModuleType("nltk")
    nltk.data = types.SimpleNamespace(find=find)
    nltk.download = download
    tag = types.ModuleType("nltk.tag")
    perceptron = types.ModuleType("nltk.tag.perceptron")
    perceptron.PerceptronTagger = PerceptronTagger
    nltk.tag, tag.perceptron = tag, perceptron
    for name, module in (("nltk", nltk), ("nltk.tag", tag), ("nltk.tag.perceptron", perceptron)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(R, "_nltk_tagger", None)


@pytest.mark.parametrize("pair", ["gpt2"], indirect=True)
def test_reagent_pos_tag_uses_nltk_when_it_and_its_data_are_installed(pair, monkeypatch):
    model, tok = pair
    fake_nltk(monkeypatch, data=True)
    draws, draw = [], R.pos_tag_replacements
    monkeypatch.setattr(R, "pos_tag_replacements", lambda ids, table, gen: draws.append(
        (ids, draw(ids, table, gen))) or draws[-1][1])
    wrapper = il.load_model(model, "reagent", tokenizer=tok)
    seq = wrapper.attribute(*DECODER_TEXTS, replacement="pos_tag", seed=0, **ARGS).sequence_attributions[0]
    assert sum(check_replacements(tok, ids, out) for ids, out in draws) > 0
    for n in range(len(seq.generated)):
        assert float(seq.target_attributions[: seq.attr_pos_start + n, n].sum()) == pytest.approx(1.0, abs=1e-5)
    assert R.default_tagger() is R._nltk_tagger  # one tagger object: the vocabulary's tags stay cached


@pytest.mark.parametrize("pair", ["gpt2", "marian"], indirect=True)
def test_reagent_replacement_errors_are_typed_and_leave_the_model_as_it_was(pair, monkeypatch):
    model, tok = pair
    # a state attribution must not disturb: train mode, a frozen eval submodule, a frozen parameter, grads
    model.train()
    next(iter(model.children())).eval()
    params = list(model.parameters())
    params[0].requires_grad_(False)
    for p in params[1:4]:
        p.grad = torch.randn_like(p)
    texts = ("Hello world", "Le chat est noir") if model.config.is_encoder_decoder else DECODER_TEXTS
    wrapper = il.load_model(model, "reagent", tokenizer=tok)
    before = snapshot(model)

    def refused(match, **kwargs):
        with pytest.raises(InvalidInputError, match=match):
            wrapper.attribute(*texts, **ARGS, **kwargs)
        assert_same(before, snapshot(model))

    refused(r"replacement must be one of uniform, unk, pos_tag, got 'pos'", replacement="pos")
    refused(r"tagger= is only used with replacement='pos_tag'.*'uniform'", tagger=CountingTagger())
    refused(r"tagger= is only used with replacement='pos_tag'.*'unk'", replacement="unk", tagger=CountingTagger())
    refused(r"tagger must be a callable", replacement="pos_tag", tagger={"cat": "NN"})
    refused(r"tagger returned 1 tags for \d+ token strings", replacement="pos_tag", tagger=lambda words: ["NN"])
    refused(r"tagger must return a list of hashable tags", replacement="pos_tag",
            tagger=lambda words: [[w] for w in words])
    # nltk absent (whether or not this machine has it): the error says what to do
    monkeypatch.setitem(sys.modules, "nltk", None)
    monkeypatch.setattr(R, "_nltk_tagger", None)
    refused(r"install nltk.*averaged_perceptron_tagger_eng.*or pass tagger=.*nltk is not installed",
            replacement="pos_tag")
    # nltk present without its tagger data: refused too, nothing downloaded
    fake_nltk(monkeypatch, data=False)
    refused(r"averaged_perceptron_tagger_eng.*or pass tagger=.*data is not installed", replacement="pos_tag")
    assert R._nltk_tagger is None
    # and the model still attributes afterwards, state untouched
    wrapper.attribute(*texts, replacement="pos_tag", tagger=CountingTagger(), seed=0, **ARGS)
    assert_same(before, snapshot(model))
