"""The methods inseq 0.7.1 has beyond the first eleven: same numbers as inseq where it runs them here."""

import copy

import pytest
import torch
from model_state import model_state

import inseq_lightning as il

TEXTS = {
    "gpt2": ("Hello world", "Hello world, this is a cat"),
    "llama": ("The cat sat", "The cat sat on the mat"),
    "marian": ("Hello world", "Le chat est noir"),
}


def _both_sides(ours, ref) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (ours, inseq's) pairs of source and target maps; a side missing on one must be missing on the
    other, and at least one side is there to compare."""
    pairs = []
    for side in ("source_attributions", "target_attributions"):
        a, b = getattr(ours, side), getattr(ref, side)
        assert (a is None) == (b is None), side
        if b is not None:
            assert a.shape == b.shape, side
            pairs.append((a, b))
    assert pairs
    return pairs


@pytest.mark.parametrize("family", list(TEXTS))
def test_sequential_integrated_gradients_equals_inseq(hf_models, family):
    inseq = pytest.importorskip("inseq", reason="parity needs inseq 0.7.1")
    from test_parity_inseq import inseq_reference

    model, tok = hf_models[family]
    kwargs = {"n_steps": 8, "step_scores": ["probability"], "show_progress": False}
    ours = il.load_model(copy.deepcopy(model), "sequential_integrated_gradients", tokenizer=tok).attribute(
        *TEXTS[family], **kwargs)[0]
    ref = inseq.load_model(inseq_reference(model), "sequential_integrated_gradients",
                           tokenizer=copy.deepcopy(tok)).attribute(*TEXTS[family], **kwargs)[0]
    for side in ("source_attributions", "target_attributions"):
        a, b = getattr(ours, side), getattr(ref, side)
        if b is None:
            assert a is None
            continue
        assert a.shape == b.shape and torch.equal(a.isnan(), b.isnan())
        scale = b.abs().nan_to_num().max()
        torch.testing.assert_close(a / scale, b / scale, equal_nan=True, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours.step_scores["probability"], ref.step_scores["probability"].float())


def test_sequential_integrated_gradients_moves_one_token_at_a_time(hf_models):
    """The definition, computed by hand on one step: for each position j, the Riemann sum of the
    gradient at position j along baseline(j) -> x(j), others fixed, times x(j) - baseline(j)."""
    model, tok = hf_models["gpt2"]
    model = copy.deepcopy(model).eval()
    am = il.load_model(model, "sequential_integrated_gradients", tokenizer=tok)
    out = am.attribute("Hello world", "Hello world, this", n_steps=4, attribution_args={"method": "riemann_right"},
                       show_progress=False)[0]
    ids = torch.tensor([[t.id for t in out.target]])
    step = out.attr_pos_start  # first attributed position
    embeds = model.get_input_embeddings()(ids).detach()
    unk = am.special_ids.unk
    base = model.get_input_embeddings()(torch.full_like(ids, unk)).detach()
    for j in range(step):
        total = torch.zeros_like(embeds[0, j])
        for k in range(1, 5):
            alpha = k / 4
            x = embeds.clone()
            x[0, j] = base[0, j] + alpha * (embeds[0, j] - base[0, j])
            x.requires_grad_(True)
            p = model(inputs_embeds=x).logits[0, step - 1].softmax(-1)[ids[0, step]]
            (grad,) = torch.autograd.grad(p, x)
            total += grad[0, j] / 4
        expected = total * (embeds[0, j] - base[0, j])
        torch.testing.assert_close(out.target_attributions[j, 0], expected, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("family", ["gpt2", "marian"])
@pytest.mark.parametrize("args", [{"sliding_window_shapes": (2, 64)}, {"sliding_window_shapes": (3, 64), "strides": 2}])
def test_occlusion_sliding_windows_equal_inseq(hf_models, family, args):
    """captum's windows over what each step sees (the prefix, for decoder-only), averaged per token:
    computed from one batch of occluded variants shared by every step."""
    inseq = pytest.importorskip("inseq", reason="parity needs inseq 0.7.1")
    from test_parity_inseq import inseq_reference

    model, tok = hf_models[family]
    ours = il.load_model(copy.deepcopy(model), "occlusion", tokenizer=tok).attribute(
        *TEXTS[family], attribution_args=dict(args), show_progress=False)[0]
    ref = inseq.load_model(inseq_reference(model), "occlusion", tokenizer=copy.deepcopy(tok)).attribute(
        *TEXTS[family], attribution_args=dict(args), show_progress=False)[0]
    for a, b in _both_sides(ours, ref):
        torch.testing.assert_close(a, b, equal_nan=True, atol=1e-6, rtol=1e-5)


def test_occlusion_window_is_the_mean_change_over_the_windows_covering_a_token(hf_models):
    """By hand on a source of 6 tokens, windows of 2: token j's score is |mean over windows covering
    it of (p(x) - p(x with the window's embeddings replaced by the UNK baseline))|."""
    model, tok = hf_models["marian"]
    model = copy.deepcopy(model).eval()
    am = il.load_model(model, "occlusion", tokenizer=tok)
    out = am.attribute("Hello world", "Le chat", sliding_window_shapes=(2, 64), show_progress=False)[0]
    src = torch.tensor([[t.id for t in out.source]])
    tgt = torch.tensor([[t.id for t in out.target]])
    scale = model.get_encoder().embed_scale
    embeds = model.get_encoder().embed_tokens(src) * scale
    base = model.get_encoder().embed_tokens(torch.full_like(src, am.special_ids.unk)) * scale
    base[src == am.special_ids.eos] = embeds[src == am.special_ids.eos]  # EOS stays EOS in the baseline

    def prob(x):
        with torch.no_grad():
            return model(inputs_embeds=x, decoder_input_ids=tgt).logits[0, 0].softmax(-1)[tgt[0, 1]]

    length = src.shape[1]
    diffs = []
    for s in range(length - 1):
        x = embeds.clone()
        x[0, s : s + 2] = base[0, s : s + 2]
        diffs.append(prob(embeds) - prob(x))
    expected = torch.stack([torch.stack([d for s, d in enumerate(diffs) if s <= j < s + 2]).mean().abs()
                            for j in range(length)])
    torch.testing.assert_close(out.source_attributions[:, 0], expected, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("args,match", [
    ({"sliding_window_shapes": (9, 64)}, "does not fit"),
    ({"sliding_window_shapes": (2, 32)}, "whole embedding"),
    ({"sliding_window_shapes": (2, 64), "strides": 3}, "strides"),
])
def test_bad_occlusion_windows_get_a_typed_error_and_leave_the_model_as_it_was(hf_models, args, match):
    from inseq_lightning.errors import InvalidInputError

    model, tok = hf_models["gpt2"]
    model = copy.deepcopy(model).train()
    am = il.load_model(model, "occlusion", tokenizer=tok)
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(InvalidInputError, match=match):
        am.attribute("Hello world", "Hello world, this is a cat", show_progress=False, **args)
    assert modes == [m.training for m in model.modules()] and flags == [p.requires_grad for p in model.parameters()]


def test_mc_dropout_as_the_attributed_function_scales_each_steps_gradient(hf_models):
    """``attributed_fn="mc_dropout_prob_avg"``: (p - mean(p~)) / std(p~) with the noisy forwards
    taken without gradient (inseq's rule), so each step's saliency is the probability's divided by that
    step's std: the normalized maps are the probability's. The model's modes are restored."""
    model, tok = hf_models["gpt2"]
    model = copy.deepcopy(model).eval()
    am = il.load_model(model, "saliency", tokenizer=tok)
    texts = ("Hello world", "Hello world, this is a cat")
    mcd = am.attribute(*texts, attributed_fn="mc_dropout_prob_avg", n_mcd_steps=4, show_progress=False)[0]
    prob = am.attribute(*texts, show_progress=False)[0]
    assert not torch.allclose(mcd.target_attributions.nan_to_num(), prob.target_attributions.nan_to_num())
    torch.testing.assert_close(mcd.aggregate().target_attributions, prob.aggregate().target_attributions,
                               equal_nan=True, rtol=1e-4, atol=1e-6)
    assert not any(m.training for m in model.modules())


@pytest.mark.parametrize("family", list(TEXTS))
def test_lime_equals_inseq_given_the_same_draws(hf_models, family):
    """inseq draws lime's masks from torch's global RNG, step by step; with ``seed=s`` this library
    draws the same stream from its own generator, so after ``torch.manual_seed(s)`` both fit the same
    ridge regressions (here on one batched forward per step instead of one forward per sample).

    The regression amplifies float32 rounding in the scores: the tiny Marian's scores barely move under
    masking (their spread is ~1e-6 of their value), so 1e-7 relative differences between the two
    libraries' forwards (a whole sequence here, a prefix there) become ~1e-3 of the coefficients."""
    inseq = pytest.importorskip("inseq", reason="parity needs inseq 0.7.1")
    pytest.importorskip("sklearn")
    from test_parity_inseq import inseq_reference

    model, tok = hf_models[family]
    ours = il.load_model(copy.deepcopy(model), "lime", tokenizer=tok).attribute(
        *TEXTS[family], seed=0, n_samples=20, show_progress=False)[0]
    ref_model = inseq.load_model(inseq_reference(model), "lime", tokenizer=copy.deepcopy(tok))
    torch.manual_seed(0)
    ref = ref_model.attribute(*TEXTS[family], n_samples=20, show_progress=False)[0]
    for a, b in _both_sides(ours, ref):
        scale = b.abs().nan_to_num().max()
        tolerance = 2e-3 if family == "marian" else 1e-5
        torch.testing.assert_close(a / scale, b / scale, equal_nan=True, atol=tolerance, rtol=1e-4)


def test_lime_is_repeatable_with_a_seed_and_leaves_the_global_rng_alone(hf_models):
    pytest.importorskip("sklearn")
    model, tok = hf_models["gpt2"]
    am = il.load_model(copy.deepcopy(model), "lime", tokenizer=tok)
    state = torch.get_rng_state()
    one = am.attribute(*TEXTS["gpt2"], seed=3, n_samples=10, show_progress=False)[0]
    two = am.attribute(*TEXTS["gpt2"], seed=3, n_samples=10, show_progress=False)[0]
    other = am.attribute(*TEXTS["gpt2"], seed=4, n_samples=10, show_progress=False)[0]
    assert torch.equal(torch.get_rng_state(), state)
    torch.testing.assert_close(one.target_attributions, two.target_attributions, equal_nan=True)
    assert not torch.allclose(one.target_attributions.nan_to_num(), other.target_attributions.nan_to_num())


@pytest.mark.parametrize("family", list(TEXTS))
def test_discretized_integrated_gradients_equals_inseq(hf_models, family, tmp_path):
    """Same monotonic paths and sums as inseq. inseq caches the vocabulary's k-NN graph under the
    model's name, which is empty for a model passed as an object: every such model would reuse the
    first one's graph, so inseq gets a fresh cache directory here."""
    inseq = pytest.importorskip("inseq", reason="parity needs inseq 0.7.1")
    pytest.importorskip("sklearn")
    from test_parity_inseq import inseq_reference

    model, tok = hf_models[family]
    kwargs = {"n_steps": 8, "step_scores": ["probability"], "show_progress": False}
    ours = il.load_model(copy.deepcopy(model), "discretized_integrated_gradients", tokenizer=tok).attribute(
        *TEXTS[family], **kwargs)[0]
    ref = inseq.load_model(inseq_reference(model), "discretized_integrated_gradients", tokenizer=copy.deepcopy(tok),
                           cache_dir=tmp_path, save_cache=False).attribute(*TEXTS[family], **kwargs)[0]
    for a, b in _both_sides(ours, ref):
        scale = b.abs().nan_to_num().max()
        torch.testing.assert_close(a / scale, b / scale, equal_nan=True, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours.step_scores["probability"], ref.step_scores["probability"].float())


def test_discretized_paths_are_monotonic_and_end_at_the_token(hf_models):
    """Every path runs from the baseline's embedding to the token's, each point between the next one
    and the baseline in every dimension (the method's defining property)."""
    pytest.importorskip("sklearn")
    from inseq_lightning.attr.methods.discretized import PathBuilder, _monotonic_dims

    model, tok = hf_models["gpt2"]
    vocabulary = model.get_input_embeddings().weight.detach().float()
    builder = PathBuilder(vocabulary, n_neighbors=10, special_ids=set(tok.all_special_ids))
    for word in (5, 17, 123):
        path = builder.path(word, 0, n_steps=8, strategy="greedy")
        assert path.shape == (8, vocabulary.shape[1])
        torch.testing.assert_close(path[0], vocabulary[0])
        torch.testing.assert_close(path[-1], vocabulary[word])
        for k in range(1, 7):  # point k lies between point k+1 (closer to the word) and the baseline
            assert _monotonic_dims(path[k], path[0], path[k + 1]).all()


def test_attention_layers_and_heads_select_the_models_own_attention(hf_models):
    """``layers=``/``heads=`` keep those layers' and heads' rows of the model's own attention
    (``output_attentions``), read at the position that predicts each step; aggregation is inseq's
    mean over heads, then layers."""
    model, tok = hf_models["llama"]
    model = copy.deepcopy(model).eval()
    am = il.load_model(model, "attention", tokenizer=tok)
    out = am.attribute(*TEXTS["llama"], layers=[-1], heads=(0, 2), show_progress=False)[0]
    ids = torch.tensor([[t.id for t in out.target]])
    model.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = model(input_ids=ids, output_attentions=True).attentions
    last = attentions[-1][0, 0:2]  # [heads, Q, K]
    assert out.target_attributions.shape[-2:] == (1, 2)
    for n, p in enumerate(range(out.attr_pos_start, out.attr_pos_end)):
        expected = last[:, p - 1, :p].T  # [keys, heads]
        torch.testing.assert_close(out.target_attributions[:p, n, 0], expected)
    whole = am.attribute(*TEXTS["llama"], show_progress=False)[0]
    mean = torch.stack([a[0] for a in attentions]).mean(1).mean(0)  # mean over heads, then layers: [Q, K]
    agg = whole.aggregate().target_attributions
    for n, p in enumerate(range(whole.attr_pos_start, whole.attr_pos_end)):
        col = mean[p - 1, :p]
        torch.testing.assert_close(agg[:p, n], col / col.sum(), rtol=1e-5, atol=1e-6)


def _install_transformers_capture_hooks(model: torch.nn.Module, tok) -> None:
    """transformers (5.x) registers its own inert output-capturing forward hooks, for good, on a model's
    first ``output_attentions=True`` forward, whoever runs it: run one with the model itself, so that a
    state taken afterwards holds every hook a correct attribution call may leave, and no other."""
    implementation = model.config._attn_implementation
    model.set_attn_implementation("eager")
    ids = tok("Hello", return_tensors="pt").input_ids
    extra = {"decoder_input_ids": ids} if model.config.is_encoder_decoder else {}
    with torch.no_grad():
        model(input_ids=ids, output_attentions=True, **extra)
    model.set_attn_implementation(implementation)


def _mixed_state(model: torch.nn.Module) -> torch.nn.Module:
    """Training on, one block in eval, a few parameters frozen: a state a reset to defaults would change."""
    model.train()
    next(m for m in model.modules() if m is not model and list(m.children())).eval()
    for p in list(model.parameters())[::3]:
        p.requires_grad_(False)
    return model


def test_attention_layers_and_heads_select_the_encoder_decoders_own_attention(hf_models):
    """Encoder-decoder: ``layers=``/``heads=`` keep those decoder layers' and heads' cross-attention rows
    (source) and, with ``attribute_target=True``, self-attention rows (target) of the model's own eager
    forward (``output_attentions``, teacher-forced), read at the decoder position that predicts each step
    (``[keys, steps, layers, heads]``, in the order asked for); the default aggregation is the mean over
    heads, then layers, each column (source and target rows together) L1-normalized after each mean."""
    model, tok = hf_models["marian"]
    model = copy.deepcopy(model).eval()
    am = il.load_model(model, "attention", tokenizer=tok)
    texts = TEXTS["marian"]
    out = am.attribute(*texts, layers=[-1, 0], heads=[3, 1], attribute_target=True, show_progress=False)[0]
    src = torch.tensor([[t.id for t in out.source]])
    tgt = torch.tensor([[t.id for t in out.target]])
    implementation = model.config._attn_implementation
    model.set_attn_implementation("eager")
    with torch.no_grad():
        own = model(input_ids=src, decoder_input_ids=tgt, output_attentions=True)
    model.set_attn_implementation(implementation)
    cross = torch.stack([a[0] for a in own.cross_attentions])  # [layers, heads, Q, source keys]
    self_ = torch.stack([a[0] for a in own.decoder_attentions])  # [layers, heads, Q, target keys]
    assert cross.shape[:2] == (2, 4) and self_.shape[:2] == (2, 4)
    # the selection is observable: the heads and layers asked for differ well above the tolerance
    assert (cross[1, 3] - cross[0, 1]).abs().max() > 1e-3 and (self_[1, 3] - self_[1, 1]).abs().max() > 1e-3
    positions = range(out.attr_pos_start, out.attr_pos_end)
    assert out.attr_pos_start == 1 and out.attr_pos_end == tgt.shape[1]
    assert out.source_attributions.shape == (src.shape[1], len(positions), 2, 2)
    assert out.target_attributions.shape == (tgt.shape[1], len(positions), 2, 2)
    for n, p in enumerate(positions):
        for i, layer in enumerate((1, 0)):
            for j, head in enumerate((3, 1)):
                torch.testing.assert_close(out.source_attributions[:, n, i, j], cross[layer, head, p - 1])
                torch.testing.assert_close(out.target_attributions[:p, n, i, j], self_[layer, head, p - 1, :p])
        assert out.target_attributions[p:, n].isnan().all()  # keys the predicting position cannot see

    ranged = am.attribute(*texts, layers=(1, 2), heads=(1, 3), show_progress=False)[0]  # (start, end) ranges
    assert ranged.target_attributions is None
    assert ranged.source_attributions.shape == (src.shape[1], len(positions), 1, 2)
    for n, p in enumerate(positions):
        torch.testing.assert_close(ranged.source_attributions[:, n, 0], cross[1, 1:3, p - 1].T)

    agg = am.attribute(*texts, heads=[0, 2], attribute_target=True, show_progress=False)[0].aggregate()
    for n, p in enumerate(positions):
        column = torch.cat([cross[:, [0, 2], p - 1], self_[:, [0, 2], p - 1, :p]], -1).mean(1)  # [layers, keys]
        column = column / column.sum(-1, keepdim=True)
        column = column.mean(0)
        column = column / column.sum()
        torch.testing.assert_close(agg.source_attributions[:, n], column[: src.shape[1]], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(agg.target_attributions[:p, n], column[src.shape[1]:], rtol=1e-5, atol=1e-6)
        assert agg.target_attributions[p:, n].isnan().all()


@pytest.mark.parametrize("family", ["llama", "marian"])
@pytest.mark.parametrize("args,match", [
    ({"layers": 5}, r"layers=5 is out of range: the model has 2 layers"),
    ({"layers": 2}, r"layers=2 is out of range"),
    ({"layers": -3}, r"layers=-3 is out of range"),
    ({"heads": [0, 9]}, r"heads=\[0, 9\] is out of range: the model has 4 heads"),
    ({"heads": (2, 5)}, r"heads=\(2, 5\) is out of range"),
    ({"layers": "all"}, r"layers must be an int"),
])
def test_attention_selection_out_of_range_is_a_typed_error(hf_models, family, args, match):
    """Decoder-only and encoder-decoder (both sides attributed): a typed error naming the selection,
    and the model left as it was (modes, requires_grad flags, no hooks, the attention kernel)."""
    from inseq_lightning.errors import InvalidInputError

    model, tok = hf_models[family]
    model = _mixed_state(copy.deepcopy(model))
    _install_transformers_capture_hooks(model, tok)
    am = il.load_model(model, "attention", tokenizer=tok)
    before = model_state(model)
    assert before[3] != "eager"
    assert all(hook.__module__.startswith("transformers.")
               for hooks, pre in before[2] for hook in [*hooks.values(), *pre.values()])
    assert True in before[0] and False in before[0] and True in before[1] and False in before[1]
    kwargs = {"attribute_target": True} if family == "marian" else {}
    with pytest.raises(InvalidInputError, match=match):
        am.attribute(*TEXTS[family], show_progress=False, **args, **kwargs)
    assert model_state(model) == before
