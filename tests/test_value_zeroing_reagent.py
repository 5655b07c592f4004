"""value_zeroing against scores computed independently (hand-written hooks on the model's own forward),
and reagent's defining property on a model whose answer is known; both in the monitor."""

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
import transformers
from model_state import model_state
from test_architectures import ARCHITECTURES, built, texts  # the ground-truth grid's tiny models

import inseq_lightning as il
from inseq_lightning.attr.methods.value_zeroing import value_zeroing_sites
from inseq_lightning.errors import InvalidInputError
from inseq_lightning.monitor import Probe, ProbeMonitor
from inseq_lightning.tiny_models import gpt2_tokenizer, tiny_gpt2, tiny_llama, tiny_marian

DECODER_TEXTS = ("The cat sat", "The cat sat on the mat and looked")
TWO_TEXTS = (["The cat sat", "A dog ran far away"],
             ["The cat sat on the mat and looked", "A dog ran far away from the box"])


# ---- value zeroing: the expected scores, by hand ----------------------------------------------------
def _sites(model, layer: int, cross: bool = False):
    """(module, value columns) a hand-written hook zeroes: GPT-2's value third of c_attn, Llama's v_proj,
    Marian's decoder self-attention or cross-attention v_proj."""
    if model.config.model_type == "gpt2":
        d = model.config.n_embd
        return model.transformer.h[layer].attn.c_attn, slice(2 * d, 3 * d)
    if model.config.model_type == "llama":
        return model.model.layers[layer].self_attn.v_proj, slice(None)
    block = model.model.decoder.layers[layer]
    return (block.encoder_attn if cross else block.self_attn).v_proj, slice(None)


def _states(model, source, target, layer):
    """The layer's output at every (decoder) position, as the model reports its hidden states (the last
    layer's after the final norm)."""
    if source is None:
        return model(input_ids=target, output_hidden_states=True).hidden_states[layer + 1][0]
    return model(input_ids=source, decoder_input_ids=target, output_hidden_states=True).decoder_hidden_states[layer + 1][0]


def _expected(model, source, target, layer, cross=False, columns=None, metric="cosine"):
    """``[tokens j, positions q]``: 1 - cos(h_l[q], h_l[q] with token j's values zeroed in layer l only)
    (or their L2 distance),
    distances under 1e-5 set to 0, each column divided by its sum over the tokens position q sees."""
    module, value_cols = _sites(model, layer, cross)
    tokens = (source if cross else target).shape[1]
    with torch.no_grad():
        clean = _states(model, source, target, layer)
        distances = torch.zeros(tokens, target.shape[1])
        for j in range(tokens):
            def zero(mod, args, output, j=j):
                output = output.clone()
                cols = torch.arange(output.shape[-1])[value_cols] if columns is None else columns
                output[:, j, cols] = 0
                return output
            handle = module.register_forward_hook(zero)
            try:
                zeroed = _states(model, source, target, layer)
            finally:
                handle.remove()
            distances[j] = (1 - F.cosine_similarity(clean, zeroed, dim=-1)) if metric == "cosine" else \
                (clean - zeroed).norm(dim=-1)
    seen = torch.ones_like(distances, dtype=torch.bool) if cross else (
        torch.arange(tokens).view(-1, 1) <= torch.arange(target.shape[1]).view(1, -1))
    distances = torch.where((distances < 1e-5) | ~seen, torch.zeros_like(distances), distances)
    return distances / distances.sum(0, keepdim=True).clamp(min=1e-30)


def _check_map(raw, expected, start, layer, causal=True, atol=2e-5):
    """``raw``: ``[tokens, N, layers]``; step n predicts position ``start + n`` from ``start + n - 1``."""
    for n in range(raw.shape[1]):
        q = start + n - 1
        seen = q + 1 if causal else raw.shape[0]
        torch.testing.assert_close(raw[:seen, n, layer], expected[:seen, q], atol=atol, rtol=1e-4)
        if causal:
            assert raw[seen:, n, layer].isnan().all()


def _ids(seq):
    return torch.tensor([[t.id for t in seq.target]]), torch.tensor([[t.id for t in seq.source]])


@pytest.mark.parametrize("build", ["gpt2", "llama"])
@pytest.mark.parametrize("layers", [1, 2])
def test_value_zeroing_equals_hand_computed_distances(build, layers):
    model, tok = tiny_gpt2(n_layer=layers) if build == "gpt2" else tiny_llama(num_hidden_layers=layers)
    out = il.load_model(model, "value_zeroing", tokenizer=tok).attribute(*DECODER_TEXTS)
    seq = out.sequence_attributions[0]
    raw = seq.target_attributions
    assert raw.shape == (len(seq.target), len(seq.generated), layers)
    target, _ = _ids(seq)
    for layer in range(layers):
        _check_map(raw, _expected(model, None, target, layer), seq.attr_pos_start, layer)
    # the default aggregation: mean over layers, then each step's column sums to 1
    agg = seq.aggregate()
    assert agg.target_attributions.shape == (len(seq.target), len(seq.generated))
    torch.testing.assert_close(agg.target_attributions.nansum(0), torch.ones(len(seq.generated)))


def test_value_zeroing_selected_heads_and_layers():
    model, tok = tiny_gpt2(n_layer=2)
    wrapper = il.load_model(model, "value_zeroing", tokenizer=tok)
    seq = wrapper.attribute(*DECODER_TEXTS, decoder_zeroed_units_indices={1: [0, 2]}).sequence_attributions[0]
    target, _ = _ids(seq)
    d, hd = model.config.n_embd, model.config.n_embd // model.config.n_head
    columns = torch.cat([torch.arange(2 * d + h * hd, 2 * d + (h + 1) * hd) for h in (0, 2)])
    _check_map(seq.target_attributions, _expected(model, None, target, 1, columns=columns), seq.attr_pos_start, 1)
    assert seq.target_attributions[:, :, 0].nan_to_num().abs().sum() == 0  # layer 0 not zeroed
    # out of range: a typed error, and the model as it was (a state a reset to defaults would change)
    model.train()
    model.transformer.h[0].eval()
    for p in list(model.parameters())[::3]:
        p.requires_grad_(False)
    before = model_state(model)
    assert True in before[0] and False in before[0] and True in before[1] and False in before[1]
    # the only hooks are transformers' own inert output-capturing ones (registered for good by the
    # ``output_hidden_states`` forwards of ``_expected`` above), none of this library's
    assert all(hook.__module__.startswith("transformers.")
               for hooks, pre in before[2] for hook in [*hooks.values(), *pre.values()])
    with pytest.raises(InvalidInputError, match="value heads"):
        wrapper.attribute(*DECODER_TEXTS, decoder_zeroed_units_indices=4)
    assert model_state(model) == before
    with pytest.raises(InvalidInputError, match="layers 0..1"):
        wrapper.attribute(*DECODER_TEXTS, decoder_zeroed_units_indices={2: 0})
    assert model_state(model) == before


def test_value_zeroing_encoder_decoder_source_and_target():
    # larger weights than the default init: the cross-attention's changes of the states must stand well
    # above the 1e-5 threshold (at the default init many sit right at it, where rounding decides)
    model, tok = tiny_marian(init_std=0.1)
    seq = il.load_model(model, "value_zeroing", tokenizer=tok).attribute(
        "Hello world", "Le chat est noir", attribute_target=True).sequence_attributions[0]
    target, source = _ids(seq)
    for layer in range(2):
        _check_map(seq.source_attributions, _expected(model, source, target, layer, cross=True), seq.attr_pos_start,
                   layer, causal=False)
        _check_map(seq.target_attributions, _expected(model, source, target, layer), seq.attr_pos_start, layer)


@pytest.mark.parametrize("build", ["gpt2", "llama", "marian"])
def test_value_zeroing_eager_sdpa_batched_and_chunked_agree(build):
    model, tok = tiny_marian(init_std=0.1) if build == "marian" else {"gpt2": tiny_gpt2, "llama": tiny_llama}[build]()
    wrapper = il.load_model(model, "value_zeroing", tokenizer=tok)
    texts = (["Hello world", "The cat sat on the mat"], ["Le chat est noir", "Il gatto dorme"]) \
        if build == "marian" else TWO_TEXTS
    kwargs = {"attribute_target": True} if build == "marian" else {}
    runs = {}
    for impl in ("eager", "sdpa"):
        model.set_attn_implementation(impl)
        runs[impl] = wrapper.attribute(*texts, **kwargs)
        assert model.config._attn_implementation == impl
    alone = wrapper.attribute(texts[0][1], texts[1][1], variants_per_forward=2, **kwargs)
    for a, b in zip(runs["eager"].sequence_attributions, runs["sdpa"].sequence_attributions):
        for x, y in ((a.source_attributions, b.source_attributions), (a.target_attributions, b.target_attributions)):
            if x is not None:
                torch.testing.assert_close(x, y, atol=2e-5, rtol=1e-4, equal_nan=True)
    second = runs["sdpa"].sequence_attributions[1]
    torch.testing.assert_close(alone.sequence_attributions[0].target_attributions, second.target_attributions,
                               atol=2e-5, rtol=1e-4, equal_nan=True)


def _hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_value_zeroing_refuses_an_architecture_it_cannot_patch_and_leaves_the_model_as_it_was():
    tok = gpt2_tokenizer()
    config = transformers.FalconConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=1,
                                       num_attention_heads=4, bos_token_id=tok.bos_token_id,
                                       eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = transformers.FalconForCausalLM(config).eval()
    state = copy.deepcopy(model.state_dict())
    hooks, impl = _hooks(model), model.config._attn_implementation
    wrapper = il.load_model(model, "saliency", tokenizer=tok)
    with pytest.raises(InvalidInputError, match=r"cannot patch FalconForCausalLM.*v_proj.*Use another method"):
        wrapper.attribute("Hello world", "Hello world, this is", method="value_zeroing")
    assert _hooks(model) == hooks and model.config._attn_implementation == impl and not model.training
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with pytest.raises(InvalidInputError, match="similarity_metric"):
        model, tok = tiny_gpt2()
        il.load_model(model, "value_zeroing", tokenizer=tok).attribute(*DECODER_TEXTS, similarity_metric="dot")


def test_value_zeroing_euclidean_and_no_hooks_left():
    model, tok = tiny_gpt2(n_layer=1)
    seq = il.load_model(model, "value_zeroing", tokenizer=tok).attribute(
        *DECODER_TEXTS, similarity_metric="euclidean").sequence_attributions[0]
    assert _hooks(model) == 0
    target, _ = _ids(seq)
    _check_map(seq.target_attributions, _expected(model, None, target, 0, metric="euclidean"), seq.attr_pos_start, 0)


OUTPUT_PROJECTIONS = ("o_proj", "dense", "c_proj", "o", "out_proj")


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_value_sites_hold_exactly_the_value_vectors(arch):
    """On every architecture of the ground-truth grid (fused q/k/v layouts included): zeroing the columns
    value zeroing patches, for every token, leaves the attention modules' output projections nothing but
    zeros to read (they cover every value vector), and zeroing one token's leaves every attention pattern
    unchanged (they touch no query or key)."""
    model, tok, _ = built(arch)
    stacks = value_zeroing_sites(model)["decoder"]
    sites = stacks.self_sites + [s for s in stacks.cross_sites if s is not None]
    names = {module: name for name, module in model.named_modules()}
    source, target = texts(arch)[0]
    ids = torch.tensor([tok(target)["input_ids"]])
    inputs = {"input_ids": torch.tensor([tok(source)["input_ids"]]), "decoder_input_ids": ids} \
        if model.config.is_encoder_decoder else {"input_ids": ids}

    def run(token: int | None, zeroed: list):
        """The output and the output projections' inputs with ``token``'s values (None: every token's)
        zeroed at the sites ``zeroed``."""
        handles, read = [], []
        for site in sites:
            attention = model.get_submodule(names[site.module].rsplit(".", 1)[0])
            projection = next(getattr(attention, n) for n in OUTPUT_PROJECTIONS if hasattr(attention, n))
            handles.append(projection.register_forward_pre_hook(lambda module, args: read.append(args[0])))
        for site in zeroed:
            columns = torch.cat(site.heads)

            def zero(module, args, output, columns=columns):
                output = output.clone()
                output[:, slice(None) if token is None else token, columns] = 0
                return output
            handles.append(site.module.register_forward_hook(zero))
        try:
            with torch.no_grad():
                return model(**inputs, output_attentions=True), read
        finally:
            for handle in handles:
                handle.remove()

    original = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        _, read = run(None, sites)
        assert len(read) == len(sites) and all(float(x.abs().max()) == 0 for x in read)
        clean, _ = run(None, [])
        # the first layer's patterns with token 1's values zeroed there (self-attention, then cross-attention)
        self_name = "decoder_attentions" if model.config.is_encoder_decoder else "attentions"
        zeroed, read = run(1, [stacks.self_sites[0]])
        assert torch.equal(getattr(clean, self_name)[0], getattr(zeroed, self_name)[0])
        assert float((read[0] - run(None, [])[1][0]).abs().max()) > 0
        if model.config.is_encoder_decoder:
            zeroed, _ = run(1, [stacks.cross_sites[0]])
            assert torch.equal(clean.cross_attentions[0], zeroed.cross_attentions[0])
            assert not torch.equal(clean.logits, zeroed.logits)
    finally:
        model.set_attn_implementation(original)


# ---- reagent ----------------------------------------------------------------------------------------
BIGRAM_TEXT = "The quick brown fox"


def bigram_gpt2():
    """A one-layer GPT-2 whose next-token distribution depends on the current (last context) token only:
    attention and MLP outputs and position embeddings are zero, so the final state is ln_f(wte[x]), and the
    output layer maps each token of ``BIGRAM_TEXT`` to its successor there (p ~ 0.99)."""
    model, tok = tiny_gpt2(n_layer=1, tie_word_embeddings=False)
    ids = tok(BIGRAM_TEXT)["input_ids"]
    assert len(set(ids)) == len(ids), "the text's tokens must be distinct"
    with torch.no_grad():
        block = model.transformer.h[0]
        for linear in (block.attn.c_proj, block.mlp.c_proj):
            linear.weight.zero_()
            linear.bias.zero_()
        model.transformer.wpe.weight.zero_()
        states = model.transformer.ln_f(model.transformer.wte.weight)
        model.lm_head.weight.zero_()
        for current, successor in itertools.pairwise(ids):
            model.lm_head.weight[successor] = 1.5 * states[current] / states[current].norm()
    return model, tok, ids


def test_reagent_ranks_the_only_token_that_matters_first_at_every_step():
    model, tok, ids = bigram_gpt2()
    prompt = tok.decode(ids[:2])
    wrapper = il.load_model(model, "reagent", tokenizer=tok)
    out = wrapper.attribute(prompt, BIGRAM_TEXT, keep_top_n=1, stopping_condition_top_k=1, seed=0,
                            step_scores=["probability"])
    seq = out.sequence_attributions[0]
    assert [t.id for t in seq.target] == ids
    assert (seq.step_scores["probability"] > 0.9).all()
    raw = seq.target_attributions  # [T, N]: one distribution over each step's context
    for n in range(raw.shape[1]):
        position = seq.attr_pos_start + n
        column = raw[:position, n]
        assert int(column.argmax()) == position - 1, (n, column)
        assert float(column.sum()) == pytest.approx(1.0, abs=1e-5)
        assert raw[position:, n].isnan().all()


def test_reagent_is_seeded():
    model, tok = tiny_gpt2()
    wrapper = il.load_model(model, "reagent", tokenizer=tok)
    args = {"max_probe_steps": 4, "num_probes": 4}
    rng = torch.get_rng_state()
    a = wrapper.attribute(*TWO_TEXTS, seed=3, **args)
    b = wrapper.attribute(*TWO_TEXTS, seed=3, **args, rows_per_forward=5)  # chunking draws nothing else
    c = wrapper.attribute(*TWO_TEXTS, seed=4, **args)
    assert torch.equal(torch.get_rng_state(), rng)
    for x, y, z in zip(a.sequence_attributions, b.sequence_attributions, c.sequence_attributions):
        torch.testing.assert_close(x.target_attributions, y.target_attributions, equal_nan=True)
        assert not torch.allclose(x.target_attributions.nan_to_num(), z.target_attributions.nan_to_num())
    unk = wrapper.attribute(*TWO_TEXTS, seed=3, replacement="unk", **args)
    assert all(torch.isfinite(s.target_attributions[: s.attr_pos_start]).all() for s in unk.sequence_attributions)
    with pytest.raises(InvalidInputError, match="replacing_ratio"):
        wrapper.attribute(*DECODER_TEXTS, replacing_ratio=0)
    with pytest.raises(InvalidInputError, match="keep_ratio"):
        wrapper.attribute(*DECODER_TEXTS, keep_top_n=0)


def test_reagent_encoder_decoder_with_target():
    model, tok = tiny_marian()
    seq = il.load_model(model, "reagent", tokenizer=tok).attribute(
        "Hello world", "Le chat est noir", attribute_target=True, max_probe_steps=3, seed=0).sequence_attributions[0]
    for n in range(len(seq.generated)):
        position = seq.attr_pos_start + n
        total = seq.source_attributions[:, n].sum() + seq.target_attributions[:position, n].sum()
        assert float(total) == pytest.approx(1.0, abs=1e-5)


# ---- the monitor ------------------------------------------------------------------------------------
MONITOR_CASES = {
    "value_zeroing": {},
    "reagent": {"max_probe_steps": 3, "num_probes": 4, "seed": 0},
}


@pytest.mark.parametrize("family", ["gpt2", "marian"])
@pytest.mark.parametrize("method", list(MONITOR_CASES))
def test_new_methods_run_in_the_monitor(method, family):
    # Marian with larger weights than its default init, whose cross-attention barely moves the states:
    # every value-zeroing distance under the 1e-5 threshold leaves all-zero columns (soft faithfulness NaN)
    model, tok = tiny_gpt2() if family == "gpt2" else tiny_marian(init_std=0.1)
    probes = [Probe("the cat sat", " on the mat", ("cat",))] if family == "gpt2" else \
        [Probe("the cat sat", "Le chat est noir", ("cat",))]
    monitor = ProbeMonitor(probes, method=method, method_kwargs=MONITOR_CASES[method], faithfulness=True)
    with torch.inference_mode():
        report = monitor.run(model, tok, step=0)
    result = report.results[0]
    agg = result.aggregated
    maps = [m for m in (agg.source_attributions, agg.target_attributions) if m is not None]
    assert maps and all(m.ndim == 2 for m in maps)
    for m in maps:
        assert torch.isfinite(m[~m.isnan()]).all() and (~m.isnan()).any()
    assert result.faithfulness and all(math.isfinite(v) for v in result.faithfulness.values())
    assert math.isfinite(result.step_scores["probability"])
    assert _hooks(model) == 0
