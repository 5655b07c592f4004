"""Faithfulness rows on a shared key/value prefix, and chat probes whose template is never removed.

The cached rows (the positions before the first changed one run once, for one row) must give the
numbers of whole-sequence rows (``prefix_cache=False``) on every decoder-only architecture; the chat
template's tokens are not removal candidates under the default scope, and a pass runs the template's
prefix once for all its probes."""

import math

import numpy as np
import pytest
import torch

import inseq_lightning as il
from inseq_lightning.monitor import Probe, ProbeMonitor
from inseq_lightning.monitor import faithfulness as faithfulness_module
from inseq_lightning.monitor.chat import render_chat
from inseq_lightning.monitor.faithfulness import PrefixCaches, probe_faithfulness
from inseq_lightning.monitor.values import FAITHFULNESS_VALUES
from inseq_lightning.tiny_models import chat_tokenizer, tiny_gpt2, tiny_llama, tiny_marian

FACTS = "Facts: Mia keeps a red kite. Leo keeps a blue boat. What does Leo keep?"


def _sequence(wrapper, prompt="The cat sat on the red mat and", target=" looked at the dog."):
    out = wrapper.attribute(prompt, prompt + target, step_scores=["probability"], show_progress=False)
    return out.sequence_attributions[0]


def _prefix_calls(monkeypatch) -> list[int]:
    """The prefix lengths faithfulness computed a key/value cache for."""
    calls = []
    original = faithfulness_module.prefix_cache

    def spy(model, embeds, mask, start, *args):
        calls.append(start)
        return original(model, embeds, mask, start, *args)

    monkeypatch.setattr(faithfulness_module, "prefix_cache", spy)
    return calls


def _assert_same_values(a, b, tolerance=1e-5):
    assert set(a.values) == set(FAITHFULNESS_VALUES)
    for name in FAITHFULNESS_VALUES:
        assert math.isfinite(a.values[name]), name
        assert a.values[name] == pytest.approx(b.values[name], abs=tolerance), name
    assert a.probability == pytest.approx(b.probability, rel=1e-5)
    assert a.removed == b.removed


@pytest.mark.parametrize("ranking", ["aggregated", "per_step"])
@pytest.mark.parametrize("builder", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
def test_cached_rows_equal_whole_sequences(builder, ranking, monkeypatch):
    model, tok = builder()
    wrapper = il.load_model(model, "saliency", tokenizer=tok)
    seq = _sequence(wrapper)
    candidates = list(range(3, len(seq.source)))  # the first three tokens are never removed: a 3-token prefix
    calls = _prefix_calls(monkeypatch)
    cached = probe_faithfulness(wrapper, seq, ranking=ranking, candidates=candidates)
    assert calls == [3] and cached.forwards == 2  # the prefix, then every row at once
    whole = probe_faithfulness(wrapper, seq, ranking=ranking, candidates=candidates, prefix_cache=False)
    assert calls == [3] and whole.forwards == 1
    _assert_same_values(cached, whole)
    # a budget of one row: every row its own forward, each on its own (longest possible) prefix
    calls.clear()
    split = probe_faithfulness(wrapper, seq, ranking=ranking, candidates=candidates, memory_budget_bytes=1)
    assert len(calls) == len(set(calls)) and min(calls) == 3 and max(calls) > 3
    _assert_same_values(split, whole)


def test_masked_rows_equal_the_models_own_forward_on_replaced_ids():
    """Ground truth: removing tokens (cached path) gives the probabilities the model computes itself
    from ``input_ids`` with those tokens replaced by the baseline id (UNK)."""
    model, tok = tiny_llama()
    wrapper = il.load_model(model, "saliency", tokenizer=tok)
    seq = _sequence(wrapper)
    n_context, steps = len(seq.source), seq.attr_pos_end - seq.attr_pos_start
    forward = faithfulness_module._Forward(wrapper, seq, include_eos_baseline=False)
    removal = np.zeros((3, n_context))
    removal[0, [4, 6]] = 1.0
    removal[1, 5:] = 1.0
    removal[2, [n_context - 1]] = 1.0
    with torch.no_grad():
        got = forward(removal)
    assert forward.count == 2  # the 4-token prefix once, then the three rows
    ids = torch.tensor([[t.id for t in seq.target[: seq.attr_pos_end - 1]]])
    generated = [t.id for t in seq.generated]
    unk = wrapper.special_ids.unk
    with torch.no_grad():
        for row, mask in enumerate(removal):
            replaced = ids.clone()
            replaced[0, : n_context][torch.tensor(mask > 0)] = unk
            logits = model(input_ids=replaced).logits[0, -steps:]
            expected = logits.float().softmax(-1)[torch.arange(steps), generated].numpy()
            np.testing.assert_allclose(got[row], expected, rtol=1e-5, atol=1e-7)


def _decoder_only_architectures() -> list[str]:
    from test_architectures import ARCHITECTURES, built

    return [arch for arch in ARCHITECTURES if not built(arch)[0].config.is_encoder_decoder]


WHOLE_SEQUENCE_ARCHITECTURES = {"gemma2", "gemma3", "mistral"}  # sliding-window caches: no prefix is cached


@pytest.mark.parametrize("budget", [None, 1], ids=["one-forward", "row-by-row"])
@pytest.mark.parametrize("arch", _decoder_only_architectures())
def test_every_decoder_only_architecture_gives_the_same_probabilities_cached(arch, budget):
    """Absolute, rotary, ALiBi (BLOOM), mask-derived (OPT) positions, scaled embeddings (Gemma): every
    masked row's step probabilities on the cached path equal whole sequences (relative 1e-5), rows of
    different first changed positions mixed (sorted, then mapped back); models whose cache is not a
    plain one (sliding windows) run whole sequences."""
    from test_architectures import built, texts

    wrapper = built(arch)[2]
    prompt, target = texts(arch)[0]
    seq = wrapper.attribute(prompt, target, step_scores=["probability"], show_progress=False).sequence_attributions[0]
    n = len(seq.source)
    removal = np.zeros((5, n))
    removal[0, n - 1] = 1.0  # the last context token only: the longest prefix
    removal[1, 2:] = 1.0
    removal[2, 2:] = 0.5  # a soft row
    removal[4, [2, n - 1]] = 1.0  # row 3 stays unmasked
    cached = faithfulness_module._Forward(wrapper, seq, False, memory_budget_bytes=budget)
    whole = faithfulness_module._Forward(wrapper, seq, False, prefix_cache=False)
    with torch.no_grad():
        got, expected = cached(removal), whole(removal)
    assert np.all(expected > 0) and not np.allclose(expected[1], expected[3])  # the masks change the answer
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-12)
    plain = arch not in WHOLE_SEQUENCE_ARCHITECTURES
    assert bool(cached.prefixes.entries) == plain
    # one forward: one prefix (position 2); row by row: the rows' two first changed positions (2 and the last
    # context token, the unmasked row's included), each computed once; a model without a plain cache is
    # tried once, not per forward
    assert cached.prefixes.forwards == (2 if plain and budget == 1 else 1)
    # the faithfulness values too
    candidates = list(range(2, n))
    _assert_same_values(probe_faithfulness(wrapper, seq, candidates=candidates, memory_budget_bytes=budget),
                        probe_faithfulness(wrapper, seq, candidates=candidates, prefix_cache=False))


def test_rows_are_sized_for_whole_sequences_when_the_cache_cannot_be_reused(monkeypatch):
    """A sliding-window model (Gemma 2): the first prefix shows the cache is not a plain one; every
    forward then holds only as many whole-sequence rows as the budget allows, and no prefix is tried again."""
    from test_architectures import built, texts

    wrapper = built("gemma2")[2]
    prompt, target = texts("gemma2")[0]
    seq = wrapper.attribute(prompt, target, step_scores=["probability"], show_progress=False).sequence_attributions[0]
    rows = []
    handle = wrapper.model.register_forward_pre_hook(
        lambda module, args, kwargs: rows.append(kwargs["inputs_embeds"].shape[:2]), with_kwargs=True)
    calls = _prefix_calls(monkeypatch)
    try:
        probe = faithfulness_module._Forward(wrapper, seq, False)
        whole_row = probe._row_bytes(0)
        forward = faithfulness_module._Forward(wrapper, seq, False, memory_budget_bytes=2 * whole_row)
        removal = np.zeros((6, len(seq.source)))
        removal[:, 2:] = 1.0
        with torch.no_grad():
            forward(removal)
    finally:
        handle.remove()
    length = forward.embeds.shape[1]
    assert calls == [2]  # one prefix tried
    assert rows[1:] == [torch.Size([2, length])] * 3  # then whole sequences, two rows per forward


def test_logprob_step_scores_are_not_read_as_probabilities():
    """``logprob=True`` turns the ``probability`` step score into a log-probability: faithfulness then
    computes its own unmasked row, and its values are those of a run without it."""
    model, tok = tiny_gpt2()
    probe = Probe("The cat sat on the mat and", " looked at the dog.")
    plain = ProbeMonitor([probe], strict=True, faithfulness=True).run(model, tok, 0).results[0]
    logprob = ProbeMonitor([probe], strict=True, faithfulness=True, method_kwargs={"logprob": True}).run(
        model, tok, 0).results[0]
    assert logprob.step_scores["probability"] < 0 < plain.step_scores["probability"]
    assert logprob.faithfulness == pytest.approx(plain.faithfulness, abs=1e-7)


def test_encoder_decoders_run_whole_sequences(monkeypatch):
    model, tok = tiny_marian()
    wrapper = il.load_model(model, "saliency", tokenizer=tok)
    seq = wrapper.attribute("the cat sat on the mat", "le chat est noir", step_scores=["probability"],
                            show_progress=False).sequence_attributions[0]
    calls = _prefix_calls(monkeypatch)
    measured = probe_faithfulness(wrapper, seq, candidates=list(range(2, len(seq.source))))
    assert calls == [] and measured.forwards == 1
    assert all(math.isfinite(measured.values[n]) for n in FAITHFULNESS_VALUES)


# ---- chat probes: the template stays, its prefix runs once per pass ---------------------------
@pytest.fixture(scope="module")
def chat_model():
    return tiny_llama(tokenizer=chat_tokenizer())


def _chat_probes():
    return [Probe([{"role": "system", "content": "Answer from the facts."}, {"role": "user", "content": FACTS},
                   {"role": "assistant", "content": "a blue boat."}], name="leo"),
            Probe([{"role": "system", "content": "Answer from the facts."},
                   {"role": "user", "content": FACTS.replace("Leo keep", "Mia keep")},
                   {"role": "assistant", "content": "a red kite."}], name="mia")]


def _content_rows(tok, probe, seq):
    """Rows of the tokens holding a non-blank character of a message's content (independent of the library)."""
    rendered = render_chat(tok, probe.messages, None)
    spans = [(start, end) for _, start, end in rendered.message_spans]
    encoding = tok(rendered.prompt_text, return_offsets_mapping=True, add_special_tokens=False)
    assert encoding["input_ids"] == [t.id for t in seq.source]
    return [i for i, (s, e) in enumerate(encoding["offset_mapping"])
            if any(rendered.prompt_text[max(s, a):min(e, b)].strip() for a, b in spans)]


def test_chat_probes_remove_only_message_content_and_share_the_template_prefix(chat_model, monkeypatch):
    model, tok = chat_model
    seen = []
    original = faithfulness_module.probe_faithfulness

    def spy(wrapper, seq, *args, **kwargs):
        measured = original(wrapper, seq, *args, **kwargs)
        seen.append((seq, kwargs["candidates"], kwargs["prefixes"], measured))
        return measured

    monkeypatch.setattr("inseq_lightning.monitor.monitor.probe_faithfulness", spy)
    calls = _prefix_calls(monkeypatch)
    probes = _chat_probes()
    report = ProbeMonitor(probes, step_scores=("probability",), strict=True, faithfulness=True).run(model, tok, 0)
    assert [r.probe.name for r in report.results] == ["leo", "mia"]
    for probe, (seq, candidates, prefixes, measured), result in zip(probes, seen, report.results):
        assert candidates == _content_rows(tok, probe, seq)
        template = [seq.source[i].token for i in range(len(seq.source)) if i not in candidates]
        assert "<|im_start|>" in template and "<|im_end|>" in template
        content = len(candidates)
        assert measured.removed == {f: math.ceil(f * content - 1e-9) for f in (0.1, 0.2, 0.5)}
        assert result.faithfulness == pytest.approx(measured.values)
        # the rows equal whole-sequence rows on the same candidates (the prefix is only an optimisation)
        whole = original(il.load_model(model, "saliency", tokenizer=tok), seq, candidates=candidates,
                         prefix_cache=False, seed=faithfulness_module.faithfulness_seed(probe.name, 0))
        assert measured.values == pytest.approx(whole.values, abs=1e-5)
    # both probes start with the same template tokens before their first content token: one prefix run
    first_content = seen[0][1][0]
    assert seen[0][2] is seen[1][2] and calls == [first_content] and seen[0][2].forwards == 1
    assert [t.id for t in seen[0][0].source[:first_content]] == [t.id for t in seen[1][0].source[:first_content]]


def test_context_scope_removes_template_tokens_too(chat_model, monkeypatch):
    model, tok = chat_model
    seen = []
    original = faithfulness_module.probe_faithfulness
    monkeypatch.setattr("inseq_lightning.monitor.monitor.probe_faithfulness",
                        lambda *a, **k: seen.append(k["candidates"]) or original(*a, **k))
    ProbeMonitor(_chat_probes()[:1], strict=True, faithfulness=True, faithfulness_scope="context").run(model, tok, 0)
    assert seen == [None]
    with pytest.raises(ValueError, match="faithfulness_scope"):
        ProbeMonitor(_chat_probes(), faithfulness=True, faithfulness_scope="template")


def test_prefix_caches_keep_the_last_few_prefixes():
    caches = PrefixCaches(size=2)
    made = []
    for key in [(1,), (2,), (1,), (3,), (1,), (2,)]:
        caches.get(key, lambda key=key: made.append(key) or key)
    assert made == [(1,), (2,), (3,), (2,)] and caches.forwards == 4


def test_a_lora_model_caches_the_prefix_and_prefix_tuning_does_not():
    """A PEFT model hands the cache to its base model (LoRA weights applied, here not zero): the cached
    rows equal whole sequences. Prefix tuning fills the cache itself: no prefix of ours goes in."""
    from peft import LoraConfig, PrefixTuningConfig, get_peft_model

    from inseq_lightning.models.attribution_model import AttributionModel
    from inseq_lightning.utils.kv_cache import cache_argument

    model, tok = tiny_llama()
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                                            init_lora_weights=False))
    wrapper = AttributionModel(lora, tok)  # as the monitor wraps the live model
    seq = _sequence(wrapper)
    removal = np.zeros((3, len(seq.source)))
    removal[0, 3:] = 1.0
    removal[1, [3, 5]] = 1.0
    cached = faithfulness_module._Forward(wrapper, seq, False)
    whole = faithfulness_module._Forward(wrapper, seq, False, prefix_cache=False)
    with torch.no_grad():
        got, expected = cached(removal), whole(removal)
        base = faithfulness_module._Forward(AttributionModel(tiny_llama()[0], tok), seq, False)(removal)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-12)
    assert cached.prefixes.entries and not np.allclose(got, base, rtol=1e-3)  # LoRA's own numbers, cached
    prefix = get_peft_model(tiny_llama()[0], PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    assert cache_argument(lora) == cache_argument(model) and cache_argument(prefix) is None
