"""Context attribution (PECoRe, inseq 0.7.1's ``attribute_context``): context-sensitive tokens (CTI) and their
contextual cues (CCI) on a tiny GPT-2 and a tiny Marian, checked against two plain forwards of the model and
against inseq 0.7.1 run on the same weights."""

import copy
import html
import json
import re

import pytest
import torch

import inseq_lightning as il
from inseq_lightning.context import AttributeContextArgs, AttributeContextOutput, visualize_attribute_context
from inseq_lightning.errors import InvalidInputError, UnknownStepFunctionError
from inseq_lightning.tiny_models import tiny_gpt2, tiny_marian


def greedy(tokenizer) -> dict:
    """Deterministic generation arguments that keep a random tiny model's output readable: greedy, no token
    twice, no lone space and no token holding non-ASCII bytes (both libraries get the same arguments)."""
    unreadable = [[i] for t, i in tokenizer.get_vocab().items()
                  if t == "Ġ" or any(ord(c) > 0x7E and c not in "ĠĊ" for c in t)]
    return {"max_new_tokens": 8, "do_sample": False, "no_repeat_ngram_size": 1, "bad_words_ids": unreadable}


# One case per architecture and context side: (family, arguments); "generated" cases let the model write the output
# (with greedy() arguments, in every case: the contrastive ones generate the contextless predictions).
CASES = {
    "gpt2-input-context-generated": ("gpt2", {
        "input_context_text": "The cat sat on the mat and looked at the dog.", "input_current_text": "Hello world, this is",
        "context_sensitivity_std_threshold": 0.5}),
    "gpt2-both-contexts-contrastive": ("gpt2", {
        "input_context_text": "Alice gave Bob a book.", "input_current_text": "Question: what did Bob get?",
        "output_context_text": "Answer: Bob got", "output_current_text": "a book and a cat.",
        "attributed_fn": "contrast_prob_diff"}),
    "marian-input-context-generated": ("marian", {
        "input_context_text": "The cat sat on the mat.", "input_current_text": "Hello world"}),
    "marian-both-contexts-generated-contrastive": ("marian", {
        "input_context_text": "The quick brown fox.", "input_current_text": "Le chat est noir.",
        "output_context_text": "Das ist ein", "attributed_fn": "contrast_prob_diff"}),
}


@pytest.fixture(scope="module")
def models():
    """A tiny GPT-2 and a tiny Marian whose random weights are large enough for the context to matter (with
    transformers' default initialisation a 2-layer Marian's output barely depends on its source)."""
    return {"gpt2": tiny_gpt2(initializer_range=0.1), "marian": tiny_marian(init_std=0.2)}


def _case(models, case: str) -> tuple[str, dict]:
    """``(family, arguments)`` of a case, the generation arguments included (a fresh copy)."""
    family, fields = CASES[case]
    return family, {**copy.deepcopy(fields), "generation_kwargs": greedy(models[family][1])}


def _model(models, family: str, method: str = "saliency"):
    model, tok = models[family]
    return il.load_model(copy.deepcopy(model), method, tokenizer=copy.deepcopy(tok))


def _ours(models, family: str, **fields) -> AttributeContextOutput:
    return il.attribute_context(model=_model(models, family), show_viz=False, **fields)


@pytest.fixture(scope="module")
def inseq_runs(models):
    """inseq 0.7.1's outputs of every case, computed once (its reference models: see test_parity_inseq)."""
    inseq = pytest.importorskip("inseq", reason="parity needs inseq 0.7.1")
    from inseq.commands.attribute_context.attribute_context import attribute_context_with_model
    from inseq.commands.attribute_context.attribute_context_args import AttributeContextArgs as InseqArgs
    from test_parity_inseq import inseq_reference

    runs = {}
    for name in CASES:
        family, fields = _case(models, name)
        model, tok = models[family]
        ref = inseq.load_model(inseq_reference(model), "saliency", tokenizer=copy.deepcopy(tok))
        runs[name] = attribute_context_with_model(InseqArgs(**fields, show_viz=False), ref)
    return runs


def _close(ours: list[float] | None, ref: list[float] | None, what: str) -> None:
    assert (ours is None) == (ref is None), what
    if ref is not None:
        assert len(ours) == len(ref), what
        torch.testing.assert_close(torch.tensor(ours), torch.tensor(ref), rtol=0, atol=1e-5, msg=what)


@pytest.mark.parametrize("case", list(CASES))
def test_selected_tokens_and_scores_equal_inseq(models, inseq_runs, case):
    family, fields = _case(models, case)
    ours, ref = _ours(models, family, **fields), inseq_runs[case]
    ours_dict, ref_dict = ours.to_dict(), ref.to_dict()
    assert list(ours_dict) == list(ref_dict)  # inseq's field names, in its order
    for name in ("input_context", "input_context_tokens", "output_context", "output_context_tokens",
                 "output_current", "output_current_tokens"):
        assert ours_dict[name] == ref_dict[name], name
    _close(ours.cti_scores, ref.cti_scores, "cti_scores")
    assert len(ours.cci_scores) >= 1  # the case exercises CCI
    assert [c.cti_idx for c in ours.cci_scores] == [c.cti_idx for c in ref.cci_scores]  # same tokens, same ranking
    for mine, theirs in zip(ours.cci_scores, ref.cci_scores, strict=True):
        a, b = mine.to_dict(), theirs.to_dict()
        assert list(a) == list(b)
        for key in ("cti_idx", "cti_token", "contextual_output", "contrast_token", "contextless_output"):
            assert a[key] == b[key], (case, key)
        assert a["cti_score"] == pytest.approx(b["cti_score"], abs=1e-5)
        _close(mine.input_context_scores, theirs.input_context_scores, f"{case} input cues of {mine.cti_token}")
        what = f"{case} output cues of {mine.cti_token}"
        if family == "marian" and theirs.output_context_scores is not None:
            # inseq reads an encoder-decoder's output context one row early (the decoder start token's score
            # first, the last context token's missing): its scores are here one token later
            assert len(mine.output_context_scores) == len(theirs.output_context_scores) == len(ref.output_context_tokens)
            _close(mine.output_context_scores[:-1], theirs.output_context_scores[1:], what)
        else:
            _close(mine.output_context_scores, theirs.output_context_scores, what)
    info, ref_info = ours_dict["info"], ref_dict["info"]
    assert set(info) == set(ref_info)
    for key in ("input_template", "output_template", "output_current_text", "output_context_text",
                "has_input_context", "has_output_context", "context_sensitivity_metric"):
        assert info[key] == ref_info[key], key


def test_cti_scores_are_the_kl_divergence_of_two_plain_forwards(models):
    """kl_divergence(P without context || Q with context) for every output token, from the model's own forwards
    of the two texts, the contextual output aligned right to left."""
    model, tok = models["gpt2"]
    model = copy.deepcopy(model)
    context, current, output = "The cat sat on the mat.", "Hello world,", "this is a cat"
    out = il.attribute_context(model=il.load_model(model, "saliency", tokenizer=tok), input_context_text=context,
                               input_current_text=current, output_current_text=output, show_viz=False)
    contextless = tok(f"{current} {output}")["input_ids"]
    contextual = tok(f"{context} {current} {output}")["input_ids"]
    n = len(tok(f"{current} {output}")["input_ids"]) - len(tok(current)["input_ids"])
    with torch.no_grad():
        p = model(torch.tensor([contextless])).logits[0, -n - 1 : -1].double().log_softmax(-1)
        q = model(torch.tensor([contextual])).logits[0, -n - 1 : -1].double().log_softmax(-1)
    expected = (p.exp() * (p - q)).sum(-1)
    assert out.output_current_tokens == tok.convert_ids_to_tokens(contextless[-n:])
    torch.testing.assert_close(torch.tensor(out.cti_scores, dtype=torch.float64), expected, rtol=1e-4, atol=1e-6)
    threshold = expected.mean() + expected.std()
    assert sorted(c.cti_idx for c in out.cci_scores) == [i for i, s in enumerate(expected) if s.abs() >= threshold]


def test_cci_scores_are_the_gradient_norms_of_the_context_tokens(models):
    """Saliency of p(token) at each context-sensitive token: the L2 norm over the hidden size of the gradient at
    each context token's embedding, computed here with autograd on the model's own forward."""
    model, tok = models["gpt2"]
    model = copy.deepcopy(model)
    context, current, output = "The cat sat on the mat.", "Hello world,", "this is a cat"
    out = il.attribute_context(model=il.load_model(model, "saliency", tokenizer=tok), input_context_text=context,
                               input_current_text=current, output_current_text=output, show_viz=False,
                               context_sensitivity_std_threshold=0.0)
    ids = torch.tensor([tok(f"{context} {current} {output}")["input_ids"]])
    n_context, n_output = len(tok(context)["input_ids"]), len(out.output_current_tokens)
    # " this" is one token after the input (Ġth|is|...) but two alone (t|h|is|...): inseq, which counts the
    # output's tokens alone, would attribute the token before each sensitive one here
    assert len(tok(output)["input_ids"]) == n_output + 1
    assert len(out.cci_scores) >= 2
    for cci in out.cci_scores:
        position = ids.shape[1] - n_output + cci.cti_idx
        assert cci.contextual_output.endswith(tok.convert_tokens_to_string([out.output_current_tokens[cci.cti_idx]]))
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        probs = model(inputs_embeds=embeds).logits[0, position - 1].softmax(-1)
        (grad,) = torch.autograd.grad(probs[ids[0, position]], embeds)
        expected = grad[0, :n_context].norm(dim=-1)
        torch.testing.assert_close(torch.tensor(cci.input_context_scores), expected, rtol=1e-4, atol=1e-7)


def test_cti_runs_one_forward_of_both_conditions_and_cci_one_batched_attribution(models):
    am = _model(models, "gpt2")
    calls = []
    handle = am.model.register_forward_hook(lambda module, args, output: calls.append(output.logits.shape[0]))
    try:
        out = il.attribute_context(model=am, input_context_text="The cat sat on the mat.",
                                   input_current_text="Hello world,", output_current_text="this is a tiny cat",
                                   context_sensitivity_std_threshold=0.0, show_viz=False)
    finally:
        handle.remove()
    assert len(out.cci_scores) >= 3
    # CTI: one forward of the contextless and the contextual (contrast) rows; CCI: one of all sensitive tokens
    assert calls == [2, len(out.cci_scores)]


def test_the_output_round_trips_through_json_and_shows_in_the_console_and_html(models, tmp_path, capsys):
    family, fields = _case(models, "gpt2-both-contexts-contrastive")
    am = _model(models, family)
    out = il.attribute_context(model=am, save_path=str(tmp_path / "out.json"), viz_path=str(tmp_path / "out.html"),
                               **fields)
    shown = capsys.readouterr().out
    loaded = AttributeContextOutput.from_dict(json.loads((tmp_path / "out.json").read_text(encoding="utf-8")))
    assert loaded.to_dict() == json.loads(json.dumps(out.to_dict()))
    assert loaded.info.output_current_text == fields["output_current_text"]
    page = (tmp_path / "out.html").read_text(encoding="utf-8")
    first = out.cci_scores[0]
    for text in (shown, html.unescape(re.sub(r"<[^>]+>", "", page))):  # the page's text, without rich's spans
        assert "Input context" in text and "Output context" in text and "Output current" in text
        assert f"({first.cti_score:.3f})" in text  # the most sensitive token, with its CTI score
        assert 'CTI = "kl_divergence", CCI = "saliency" w/ "contrast_prob_diff"' in " ".join(text.split())
    assert page.lstrip().lower().startswith("<!doctype html>")
    for cci in out.cci_scores:  # showing both contexts leaves each its own scores (inseq appends one to the other)
        assert len(cci.input_context_scores) == len(out.input_context_tokens)
        assert len(cci.output_context_scores) == len(out.output_context_tokens)
    assert visualize_attribute_context(loaded, am, show_viz=False, return_html=True) == page


def test_a_decoder_only_output_context_with_a_generated_output(models):
    """The model continues the input and the output context (inseq 0.7.1 fails here: it looks for the whole
    prompt in the generated tokens); each cue list has one score per context token."""
    model, tok = models["gpt2"]
    out = _ours(models, "gpt2", input_context_text="Alice gave Bob a book.", output_context_text="Answer: Bob got",
                input_current_text="Question: what did Bob get?", generation_kwargs=greedy(tok),
                context_sensitivity_std_threshold=0.0)
    generated = il.load_model(copy.deepcopy(model), tokenizer=tok).generate(
        ["Alice gave Bob a book. Question: what did Bob get? Answer: Bob got "], **greedy(tok))[0]
    assert generated == "Alice gave Bob a book. Question: what did Bob get? Answer: Bob got " + out.output_current
    assert out.output_context_tokens == tok.tokenize("Answer: Bob got") and len(out.cci_scores) >= 1
    for cci in out.cci_scores:
        assert cci.contextual_output.startswith("Alice gave Bob a book. Question: what did Bob get? Answer: Bob got ")
        assert cci.contextual_output.endswith(tok.convert_tokens_to_string([out.output_current_tokens[cci.cti_idx]]))
        assert len(cci.input_context_scores) == len(out.input_context_tokens)
        assert len(cci.output_context_scores) == len(out.output_context_tokens)


def test_a_generated_output_context_is_split_from_the_current_output(monkeypatch):
    """``handle_output_context_strategy="auto"``: the context is what comes before the template's separator when
    it occurs once (inseq's rule); when no split is found, the user is asked."""
    from types import SimpleNamespace

    from inseq_lightning.context import texts

    model, asked = SimpleNamespace(is_encoder_decoder=False), []
    monkeypatch.setattr(texts, "_ask_for_context", lambda output, candidate: asked.append(candidate) or "Bob got")
    for generated, expected_asked in (("Bob got. a book and a cat", []), ("Bob got. a book. and a cat", [None])):
        monkeypatch.setattr(texts, "generate_text", lambda *args, out=generated, **kwargs: out)
        context, current = texts.prepare_outputs(model, "Alice gave Bob a book.", "Alice gave Bob a book. What?",
                                                 None, None, "{context}. {current}", "auto", {}, [], " ")
        assert (context, asked) == ("Bob got", expected_asked)
        assert current == generated.removeprefix("Bob got. ")


def test_without_info_the_output_has_none_and_scores_are_unchanged(models):
    family, fields = _case(models, "gpt2-both-contexts-contrastive")
    with_info = _ours(models, family, **fields)
    without = _ours(models, family, add_output_info=False, **copy.deepcopy(fields))
    assert without.info is None and "info" not in without.to_dict()
    assert without.cti_scores == with_info.cti_scores


def test_inseqs_import_paths_and_args_object_work():
    from inseq_lightning.commands.attribute_context import AttributeContextArgs as Args
    from inseq_lightning.commands.attribute_context.attribute_context import attribute_context

    assert Args is AttributeContextArgs and attribute_context is il.attribute_context
    args = AttributeContextArgs(input_current_text="x", input_context_text="y")
    assert (args.input_template, args.output_template, args.has_input_context, args.has_output_context) == \
        ("{context} {current}", "{current}", True, False)


def _state(model):
    return ([m.training for m in model.modules()], [p.requires_grad for p in model.parameters()],
            torch.get_rng_state())


@pytest.mark.parametrize(("fields", "error", "match"), [
    ({"context_sensitivity_metric": "probability"}, InvalidInputError, "contrastive one: contrast_logits"),
    ({"context_sensitivity_metric": "nope"}, UnknownStepFunctionError, "Unknown step function 'nope'"),
    ({"attributed_fn": "nope"}, UnknownStepFunctionError, "Unknown step function 'nope'"),
    ({"output_template": "Answer: {current}"}, InvalidInputError, "has 'Answer: ' around {current}"),
    ({"output_context_text": "Answer:", "output_current_text": "a cat", "contextless_output_next_tokens": ["a"],
      "attributed_fn": "contrast_prob_diff", "context_sensitivity_std_threshold": None}, InvalidInputError,
     "one per context-sensitive token"),
    ({"cannot_generate": True}, InvalidInputError, "cannot generate: pass output_current_text"),
])
def test_bad_inputs_get_a_typed_error_and_leave_the_model_as_it_was(models, fields, error, match):
    model, tok = models["gpt2"]
    model = copy.deepcopy(model).train()
    model.transformer.h[0].requires_grad_(False)
    if fields.pop("cannot_generate", False):
        model.can_generate = lambda: False
    am = il.load_model(model, "saliency", tokenizer=tok)
    torch.manual_seed(3)
    before = _state(model)
    with pytest.raises(error, match=match):
        il.attribute_context(model=am, input_context_text="The cat sat on the mat.", input_current_text="Hello",
                             generation_kwargs=greedy(tok), show_viz=False, **fields)
    after = _state(model)
    assert before[0] == after[0] and before[1] == after[1] and torch.equal(before[2], after[2])


@pytest.mark.parametrize(("fields", "match"), [
    ({"input_current_text": "x", "input_context_text": "y", "input_template": "{current}"},
     "input_template '{current}' has no {context} placeholder"),
    ({"input_current_text": "x", "input_template": "{context} {current}"}, "no input_context_text is given"),
    ({"input_current_text": ""}, "input_current_text must be a non-empty string"),
    ({"input_current_text": "x", "output_template": "{current} {context}", "output_context_text": "y"},
     "must come before {current}"),
    ({"input_current_text": "x", "output_template": "{context}: {current}", "handle_output_context_strategy": "pre"},
     "needs output_context_text"),
    ({"input_current_text": "x", "handle_output_context_strategy": "maybe"}, "one of manual, auto, pre"),
])
def test_inconsistent_arguments_are_refused_before_anything_runs(fields, match):
    with pytest.raises(InvalidInputError, match=match):
        AttributeContextArgs(**fields)


def test_each_text_is_tokenized_once_per_call_and_not_reused_across_calls(models, monkeypatch):
    """Context attribution goes back and forth between texts and tokens: inside one call every (text, flags) is
    tokenized once; a tokenizer changed between calls is seen by the next call (nothing is kept)."""
    _, fields = _case(models, "gpt2-both-contexts-contrastive")
    model = _model(models, "gpt2")
    tokenizer_type = type(model.tokenizer)
    original = tokenizer_type.__call__
    seen = []

    def counting(self, *args, **kwargs):
        text = kwargs.get("text", kwargs.get("text_target", args[0] if args else None))
        if "return_offsets_mapping" not in kwargs:
            seen.append((text, "text_target" in kwargs, kwargs.get("add_special_tokens")))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(tokenizer_type, "__call__", counting)
    first = il.attribute_context(model=model, show_viz=False, **copy.deepcopy(fields))
    assert len(seen) == len(set(seen)) >= 5, seen
    calls = len(seen)
    second = il.attribute_context(model=model, show_viz=False, **copy.deepcopy(fields))
    assert len(seen) == 2 * calls  # the second call tokenized everything again
    assert second.cti_scores == first.cti_scores
    assert [c.input_context_scores for c in second.cci_scores] == [c.input_context_scores for c in first.cci_scores]
