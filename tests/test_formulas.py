"""The facts of the reference semantics checked without inseq: prefix-by-prefix recomputation,
captum run directly, and the step-score formulas."""

import math

import torch
from captum.attr import LayerIntegratedGradients

import inseq_lightning as il


def _prefix_probability_fn(model, target_id):
    def f(embeds):
        logits = model(inputs_embeds=embeds).logits[:, -1, :]
        return logits.softmax(-1)[:, target_id]
    return f


def test_saliency_equals_prefix_by_prefix_gradients(hf_models):
    """One shared forward + batched backward equals one forward per prefix (inseq's way)."""
    model, tok = hf_models["gpt2"]
    out = il.load_model(model, "saliency", tokenizer=tok).attribute(
        "Hello world", "Hello world, this is a cat", show_progress=False)[0]
    ids = tok("Hello world, this is a cat")["input_ids"]
    emb = model.get_input_embeddings()
    for k, pos in enumerate(range(out.attr_pos_start, out.attr_pos_end)):
        prefix = emb(torch.tensor([ids[:pos]])).detach().requires_grad_(True)
        p = _prefix_probability_fn(model, ids[pos])(prefix)
        (grad,) = torch.autograd.grad(p.sum(), prefix)
        torch.testing.assert_close(out.target_attributions[:pos, k], grad[0].abs(), rtol=1e-4, atol=1e-9)
        assert out.target_attributions[pos:, k].isnan().all()


def test_layer_integrated_gradients_equals_captum_per_step(hf_models):
    model, tok = hf_models["llama"]
    out = il.load_model(model, "layer_integrated_gradients", tokenizer=tok).attribute(
        "The cat sat", "The cat sat on the mat", n_steps=20, show_progress=False)[0]
    ids = tok("The cat sat on the mat")["input_ids"]
    unk = tok.unk_token_id
    for k, pos in enumerate(range(out.attr_pos_start, out.attr_pos_end)):
        x = torch.tensor([ids[:pos]])
        base = torch.full_like(x, unk)
        base[x == tok.eos_token_id] = tok.eos_token_id

        def forward(input_ids, target=ids[pos]):
            return model(input_ids=input_ids).logits[:, -1, :].softmax(-1)[:, target]

        ref = LayerIntegratedGradients(forward, model.get_input_embeddings()).attribute(
            x, baselines=base, n_steps=20)
        torch.testing.assert_close(out.target_attributions[:pos, k], ref[0].detach(), rtol=1e-3, atol=1e-8)


def test_batched_runs_equal_single_runs(hf_models, family):
    model, tok = hf_models[family]
    am = il.load_model(model, "integrated_gradients", tokenizer=tok)
    if am.is_encoder_decoder:
        sources, targets = ["Hello world", "The quick brown fox jumps"], ["Le chat est noir", "Il gatto"]
    else:
        sources = ["Hello", "The quick brown fox"]
        targets = ["Hello world, this is a cat", "The quick brown fox jumps"]
    batched = am.attribute(sources, targets, step_scores=["probability"], n_steps=8, show_progress=False)
    for i in range(2):
        single = am.attribute(sources[i], targets[i], step_scores=["probability"], n_steps=8, show_progress=False)[0]
        b, s = batched[i].aggregate(), single.aggregate()
        for x, y in [(b.source_attributions, s.source_attributions), (b.target_attributions, s.target_attributions)]:
            if y is not None:
                torch.testing.assert_close(torch.nan_to_num(x), torch.nan_to_num(y), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(batched[i].step_scores["probability"], single.step_scores["probability"])


def _logits_for_steps(model, tok, prompt, full):
    ids = tok(full)["input_ids"]
    start = len(tok(prompt)["input_ids"])
    logits = model(input_ids=torch.tensor([ids])).logits[0]
    return logits[start - 1 : len(ids) - 1], torch.tensor(ids[start:])


def test_step_score_formulas(hf_models):
    model, tok = hf_models["gpt2"]
    out = il.load_model(model, "dummy", tokenizer=tok).attribute(
        "Hello world", "Hello world, this is a cat",
        step_scores=["logit", "probability", "entropy", "crossentropy", "perplexity", "top_p_size"],
        top_p=0.5, show_progress=False)[0]
    with torch.no_grad():
        z, y = _logits_for_steps(model, tok, "Hello world", "Hello world, this is a cat")
    p = z.softmax(-1)
    scores = out.step_scores
    torch.testing.assert_close(scores["logit"], z.gather(-1, y[:, None])[:, 0])
    torch.testing.assert_close(scores["probability"], p.gather(-1, y[:, None])[:, 0])
    torch.testing.assert_close(scores["entropy"], -(p * p.log()).sum(-1))
    torch.testing.assert_close(scores["crossentropy"], -p.gather(-1, y[:, None])[:, 0].log())
    # inseq's perplexity is 2 ** (cross-entropy in nats): matched on purpose, see the docs.
    torch.testing.assert_close(scores["perplexity"], 2 ** scores["crossentropy"])
    sorted_p = p.sort(-1, descending=True).values
    expected = [int((sorted_p[i].cumsum(0) < 0.5).sum()) + 1 for i in range(len(y))]
    assert scores["top_p_size"].tolist() == expected


def test_perplexity_offers_the_consistent_base(hf_models):
    model, tok = hf_models["gpt2"]
    out = il.load_model(model, "dummy", tokenizer=tok).attribute(
        "Hello world", "Hello world, this is", step_scores=["perplexity", "crossentropy"], base="e",
        show_progress=False)[0]
    torch.testing.assert_close(out.step_scores["perplexity"], out.step_scores["crossentropy"].exp())


def test_mc_dropout_prob_avg_formula_and_mode_restored(hf_models):
    from inseq_lightning.tiny_models import tiny_gpt2

    model, tok = tiny_gpt2(resid_pdrop=0.3, embd_pdrop=0.3, attn_pdrop=0.0)
    model.eval()
    am = il.load_model(model, "dummy", tokenizer=tok)
    torch.manual_seed(3)
    out = am.attribute("Hello world", "Hello world, this is", step_scores=["mc_dropout_prob_avg", "probability"],
                       n_mcd_steps=4, show_progress=False)[0]
    assert not any(m.training for m in model.modules()), "modes must be restored after the noisy forwards"
    # Recompute with the same RNG stream: the engine saves and restores RNG around attribution,
    # so the noisy forwards start from the seed set above.
    torch.manual_seed(3)
    ids = torch.tensor([tok("Hello world, this is")["input_ids"]])
    start = len(tok("Hello world")["input_ids"])
    y = ids[0, start:]
    model.train()
    with torch.no_grad():
        noisy = torch.stack([model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, start - 1 : -1]
                             .softmax(-1).gather(-1, y[:, None])[:, 0] for _ in range(4)])
    model.eval()
    expected = (out.step_scores["probability"] - noisy.mean(0)) / noisy.std(0)
    torch.testing.assert_close(out.step_scores["mc_dropout_prob_avg"], expected, rtol=1e-4, atol=1e-5)


def test_registered_step_function_works_as_score_and_attributed_fn(hf_models):
    model, tok = hf_models["gpt2"]

    def surprisal_bits(args, scale: float = 1.0):
        logits = args.forward_output.logits[:, -1, :]
        return -scale * logits.log_softmax(-1).gather(-1, args.target_ids[:, None])[:, 0] / math.log(2)

    il.register_step_function(surprisal_bits, "surprisal_bits", aggregate_map={"spans": "sum"}, overwrite=True)
    assert "surprisal_bits" in il.list_step_functions()
    am = il.load_model(model, "saliency", tokenizer=tok)
    out = am.attribute("Hello world", "Hello world, this is", step_scores=["surprisal_bits", "crossentropy"],
                       attributed_fn="surprisal_bits", scale=2.0, show_progress=False)[0]
    torch.testing.assert_close(out.step_scores["surprisal_bits"], 2.0 * out.step_scores["crossentropy"] / math.log(2))
    by_logprob = am.attribute("Hello world", "Hello world, this is", logprob=True, show_progress=False)[0]
    # d(-2 log2 p)/de = -2/ln2 * d(log p)/de: same normalized saliency map as the log-probability.
    torch.testing.assert_close(out.aggregate().target_attributions.nan_to_num(),
                               by_logprob.aggregate().target_attributions.nan_to_num(), atol=1e-5, rtol=1e-4)


def test_an_unhashable_callable_object_works_as_attributed_fn_with_its_keyword_arguments(hf_models):
    """Keyword routing caches signatures by function; an object with ``__eq__`` and no ``__hash__``
    cannot be a cache key and must still be routed its arguments."""
    model, tok = hf_models["gpt2"]

    class ScaledLogit:
        __hash__ = None  # what defining __eq__ without __hash__ leaves

        def __eq__(self, other):
            return isinstance(other, ScaledLogit)

        def __call__(self, args, factor: float = 1.0):
            return factor * args.forward_output.logits[:, -1, :].gather(-1, args.target_ids[:, None])[:, 0]

    am = il.load_model(model, "input_x_gradient", tokenizer=tok)
    plain = am.attribute("Hello world", "Hello world, this is", attributed_fn="logit", show_progress=False)[0]
    scaled = am.attribute("Hello world", "Hello world, this is", attributed_fn=ScaledLogit(), factor=3.0,
                          show_progress=False)[0]
    torch.testing.assert_close(scaled.target_attributions, 3.0 * plain.target_attributions, equal_nan=True)


def test_normalized_columns_sum_to_one_and_occlusion_is_not_normalized(hf_models):
    model, tok = hf_models["marian"]
    am = il.load_model(model, "integrated_gradients", tokenizer=tok)
    agg = am.attribute("Hello world", "Le chat", attribute_target=True, n_steps=5, show_progress=False)[0].aggregate()
    col = torch.cat([agg.source_attributions, agg.target_attributions]).nan_to_num().sum(0)
    torch.testing.assert_close(col, torch.ones_like(col))
    occ = am.attribute("Hello world", "Le chat", method="occlusion", show_progress=False)[0]
    assert torch.equal(occ.aggregate().source_attributions, occ.source_attributions)


def test_attention_on_sdpa_model_switches_back(hf_models):
    model, tok = hf_models["llama"]
    assert model.config._attn_implementation == "sdpa"
    out = il.load_model(model, "attention", tokenizer=tok).attribute(
        "The cat sat", "The cat sat on the mat", show_progress=False)[0]
    assert model.config._attn_implementation == "sdpa"
    assert out.target_attributions.shape[-2:] == (2, 4)  # layers x heads
    agg = out.aggregate().target_attributions
    torch.testing.assert_close(agg.nan_to_num().sum(0), torch.ones(agg.shape[1]))


def test_generation_when_no_target_is_given(hf_models):
    model, tok = hf_models["gpt2"]
    args = {"max_new_tokens": 4, "do_sample": False}
    out = il.load_model(model, "saliency", tokenizer=tok).attribute("Hello world", generation_args=args,
                                                                     show_progress=False)
    assert args == {"max_new_tokens": 4, "do_sample": False}, "generation_args must not be mutated"
    assert out.info["generated_texts"][0].startswith("Hello world")
    # Every token the model's own greedy generation adds is a step (fewer than 4 only if it stops at EOS).
    prompt = tok("Hello world", return_tensors="pt")
    with torch.no_grad():
        own = model.generate(**prompt, **args, pad_token_id=tok.pad_token_id or tok.eos_token_id)
    new_tokens = own.shape[1] - prompt["input_ids"].shape[1]
    assert 1 <= new_tokens <= 4
    assert out[0].attr_pos_end - out[0].attr_pos_start == new_tokens


def test_output_step_attributions_match_sequence_columns(hf_models):
    model, tok = hf_models["gpt2"]
    out = il.load_model(model, "saliency", tokenizer=tok).attribute(
        "Hello world", "Hello world, this is", output_step_attributions=True, step_scores=["probability"],
        show_progress=False)
    seq = out[0]
    assert len(out.step_attributions) == seq.attr_pos_end - seq.attr_pos_start
    for k, step in enumerate(out.step_attributions):
        rows = step.target_attributions.shape[1]  # the prefix the step sees (inseq's shape)
        torch.testing.assert_close(step.target_attributions[0], seq.target_attributions[:rows, k])
        assert step.target[0] == seq.generated[k]


def test_layer_deeplift_equals_captum_per_step(hf_models):
    from captum.attr import LayerDeepLift

    model, tok = hf_models["gpt2"]
    out = il.load_model(model, "layer_deeplift", tokenizer=tok).attribute(
        "Hello world", "Hello world, this is", show_progress=False)[0]
    ids = tok("Hello world, this is")["input_ids"]

    class StepProbability(torch.nn.Module):
        def __init__(self, target):
            super().__init__()
            self.model, self.target = model, target

        def forward(self, input_ids):
            return self.model(input_ids=input_ids).logits[:, -1, :].softmax(-1)[:, self.target]

    for k, pos in enumerate(range(out.attr_pos_start, out.attr_pos_end)):
        x = torch.tensor([ids[:pos]])
        base = torch.full_like(x, tok.unk_token_id)
        base[x == tok.eos_token_id] = tok.eos_token_id
        wrapper = StepProbability(ids[pos])
        ref = LayerDeepLift(wrapper, model.get_input_embeddings()).attribute(x, baselines=base)
        torch.testing.assert_close(out.target_attributions[:pos, k], ref[0].detach(), rtol=1e-3, atol=1e-8)


def test_mc_dropout_as_attributed_fn_on_an_encoder_decoder_scales_each_steps_gradient():
    """Encoder-decoder, ``attributed_fn="mc_dropout_prob_avg"``: the noisy forwards are taken without
    gradient, so each step's saliency is the probability's times one positive factor per step (1 / the
    step's std over the noisy forwards), the same at every source position and embedding dimension.
    Differentiating through the noisy forwards, as inseq 0.7.1 does on encoder-decoders only (their noisy
    forwards read the attributed embeddings; a decoder-only model's read ids), would break that
    proportionality: here both architectures attribute the same function (README, "Coming from inseq")."""
    from inseq_lightning.tiny_models import tiny_marian

    model, tok = tiny_marian(dropout=0.3)
    model.eval()
    am = il.load_model(model, "saliency", tokenizer=tok)
    texts = ("Hello world", "Le chat est noir")
    torch.manual_seed(5)
    mcd = am.attribute(*texts, attributed_fn="mc_dropout_prob_avg", n_mcd_steps=4, show_progress=False)[0]
    prob = am.attribute(*texts, show_progress=False)[0]
    assert not any(m.training for m in model.modules())
    ratio = mcd.source_attributions / prob.source_attributions  # [source, steps, hidden]
    per_step = ratio[0, :, 0]
    assert per_step.shape[0] == len(tok(text_target=texts[1])["input_ids"])
    expected = prob.source_attributions * per_step[None, :, None]
    torch.testing.assert_close(mcd.source_attributions, expected, rtol=1e-4,
                               atol=1e-5 * float(mcd.source_attributions.abs().max()))
    assert (per_step > 0).all() and per_step.std() / per_step.mean() > 0.05, "dropout noise must scale the steps"
