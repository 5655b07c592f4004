"""Sequential integrated gradients with the prefix's key/value cache (decoder-only models): the same
numbers as whole-sequence forwards (``prefix_cache=False``) on absolute (GPT-2) and rotary (Llama)
positions, for one sequence and for two right-padded sequences of different lengths, with the
segmenting, point chunking and backward split varied, and the model left as it was."""

import pytest
import torch

import inseq_lightning as il
from inseq_lightning.attr.backward import BackwardStrategy
from inseq_lightning.attr.methods import gradient
from inseq_lightning.tiny_models import tiny_gpt2, tiny_llama, tiny_marian

BUILDERS = {"gpt2": tiny_gpt2, "llama": tiny_llama}
SINGLE = ("The cat sat", "The cat sat on the mat")
PADDED = (["The cat sat", "A dog ran far away"],
          ["The cat sat on the mat", "A dog ran far away from the red box and looked at the dog."])
METHOD = "sequential_integrated_gradients"


def _model_state(model: torch.nn.Module) -> tuple:
    return ([m.training for m in model.modules()], [p.requires_grad for p in model.parameters()],
            [p.grad is None for p in model.parameters()])


@pytest.fixture()
def prefix_cache_calls(monkeypatch) -> list[int]:
    """The prefix lengths the cached path computed a cache for (the probe's 1 included)."""
    calls = []
    original = gradient._prefix_cache

    def spy(ctx, x, start, repeat):
        calls.append(start)
        return original(ctx, x, start, repeat)

    monkeypatch.setattr(gradient, "_prefix_cache", spy)
    return calls


def _attribute(model, tok, texts, **kwargs):
    am = il.load_model(model, METHOD, tokenizer=tok)
    return am.attribute(*texts, step_scores=["probability"], show_progress=False, **kwargs)


def _assert_same(cached, whole):
    assert len(cached) == len(whole)
    for a, b in zip(cached, whole):
        assert [t.token for t in a.target] == [t.token for t in b.target]
        x, y = a.target_attributions, b.target_attributions
        assert x.shape == y.shape and torch.equal(x.isnan(), y.isnan())
        assert x.nan_to_num().abs().max() > 0  # something was attributed
        torch.testing.assert_close(x, y, equal_nan=True, atol=1e-6, rtol=1e-5)
        assert a.source_attributions is None and b.source_attributions is None
        torch.testing.assert_close(a.step_scores["probability"], b.step_scores["probability"])


@pytest.mark.parametrize("budget", [None, 1], ids=["default-budget", "one-position-per-forward"])
@pytest.mark.parametrize("texts", [SINGLE, PADDED], ids=["single", "padded"])
@pytest.mark.parametrize("family", list(BUILDERS))
def test_cached_path_equals_whole_sequences(family, texts, budget, prefix_cache_calls):
    model, tok = BUILDERS[family]()
    before = _model_state(model)
    whole = _attribute(model, tok, texts, n_steps=4, attribution_args={"prefix_cache": False},
                       memory_budget_bytes=budget)
    assert prefix_cache_calls == []
    cached = _attribute(model, tok, texts, n_steps=4, memory_budget_bytes=budget)
    assert prefix_cache_calls[0] == 1  # the probe
    if budget == 1:  # one position (one point) per forward: every position after the first starts from
        # its cached prefix, up to the last one a step sees (the default budget fits a short sequence's
        # positions in one forward from position 0, run in segments)
        starts = sorted(set(prefix_cache_calls[1:]))
        assert starts == list(range(1, max(len(a.target) for a in cached) - 1))
    _assert_same(cached, whole)
    assert _model_state(model) == before


@pytest.mark.parametrize("family", list(BUILDERS))
@pytest.mark.parametrize("args", [
    {"steps_per_segment": 1, "method": "riemann_right", "multiply_by_inputs": False},
    {"steps_per_segment": 100},
    {"internal_batch_size": 3},  # one position per forward, its points in chunks
], ids=["segment-1-riemann-no-multiply", "one-segment", "point-chunks"])
def test_cached_path_variants_equal_whole_sequences(family, args):
    model, tok = BUILDERS[family]()
    before = _model_state(model)
    kwargs = {k: v for k, v in args.items() if k in ("internal_batch_size",)}
    attribution_args = {k: v for k, v in args.items() if k not in kwargs}
    whole = _attribute(model, tok, PADDED, n_steps=3, **kwargs,
                       attribution_args={**attribution_args, "prefix_cache": False})
    cached = _attribute(model, tok, PADDED, n_steps=3, **kwargs, attribution_args=attribution_args)
    _assert_same(cached, whole)
    assert _model_state(model) == before


def test_cached_path_without_head_split_and_with_small_budget():
    """Seeds on the scores themselves (no split at the output projection) and a budget that leaves
    one position per forward: the steps a segment does not predict must get no gradient."""
    model, tok = tiny_gpt2()
    whole = _attribute(model, tok, PADDED, n_steps=3, attribution_args={"prefix_cache": False})
    strategy = BackwardStrategy(split_at_head=False)
    cached = _attribute(model, tok, PADDED, n_steps=3, backward_strategy=strategy, memory_budget_bytes=1)
    assert strategy.records and not any(record.split for record in strategy.records)
    _assert_same(cached, whole)


def test_cached_path_runs_fewer_backward_steps():
    """One position per forward: a forward from a step's own position on skips the steps before it,
    so the cached path runs fewer per-step backwards than whole sequences (every step per position)."""
    model, tok = tiny_gpt2()
    cached, whole = BackwardStrategy(steps_per_backward=1), BackwardStrategy(steps_per_backward=1)
    kwargs = {"n_steps": 1, "memory_budget_bytes": 1}
    out = _attribute(model, tok, SINGLE, backward_strategy=whole, attribution_args={"prefix_cache": False}, **kwargs)
    _attribute(model, tok, SINGLE, backward_strategy=cached, **kwargs)
    steps = len(out[0].target) - out[0].attr_pos_start
    assert sum(r.steps for r in whole.records) == len(out[0].target) * steps
    assert 0 < sum(r.steps for r in cached.records) < sum(r.steps for r in whole.records)


def test_encoder_decoder_keeps_whole_sequences(prefix_cache_calls):
    model, tok = tiny_marian()
    before = _model_state(model)
    out = il.load_model(model, METHOD, tokenizer=tok).attribute(
        "Hello world", "Le chat est noir", n_steps=2, show_progress=False)[0]
    assert prefix_cache_calls == []
    assert torch.isfinite(out.source_attributions).all()
    assert _model_state(model) == before


def _decoder_only_architectures() -> list[str]:
    from test_architectures import ARCHITECTURES, built

    return [arch for arch in ARCHITECTURES if not built(arch)[0].config.is_encoder_decoder]


@pytest.mark.parametrize("arch", _decoder_only_architectures())
def test_every_decoder_only_architecture_gives_the_same_numbers(arch):
    """Absolute, rotary, ALiBi (BLOOM), mask-derived (OPT) positions, scaled embeddings (Gemma): the
    cached path (one position per forward, so every prefix is cached) equals whole sequences on a
    padded batch; models with sliding windows keep whole sequences."""
    from test_architectures import _attribute as attribute_arch

    kwargs = {"n_steps": 1, "memory_budget_bytes": 1}
    cached = attribute_arch(arch, [0, 1], METHOD, **kwargs)
    whole = attribute_arch(arch, [0, 1], METHOD, **kwargs, attribution_args={"prefix_cache": False})
    for a, b in zip(cached, whole):
        x, y = a.target_attributions, b.target_attributions
        assert torch.equal(x.isnan(), y.isnan())
        scale = y.nan_to_num().abs().max()
        assert scale > 0
        torch.testing.assert_close(x / scale, y / scale, equal_nan=True, atol=1e-5, rtol=1e-4)


def test_cached_path_with_a_contrastive_attributed_function():
    model, tok = tiny_gpt2()
    kwargs = {"n_steps": 3, "attributed_fn": "contrast_prob_diff", "contrast_targets": "The cat sat in the box"}
    whole = _attribute(model, tok, SINGLE, **kwargs, attribution_args={"prefix_cache": False}, memory_budget_bytes=1)
    cached = _attribute(model, tok, SINGLE, **kwargs, memory_budget_bytes=1)
    _assert_same(cached, whole)
