"""The engine's cost model: one forward per batch for teacher-forced targets, whatever their length."""

import copy

import pytest
import torch

import inseq_lightning as il


def count_forwards(model):
    calls = []
    handle = model.register_forward_hook(lambda m, a, o: calls.append(1))
    return calls, handle


@pytest.mark.parametrize("method,expected", [("saliency", 1), ("input_x_gradient", 1), ("attention", 1),
                                             ("dummy", 1), ("layer_gradient_x_activation", 1)])
def test_one_forward_per_batch_for_all_steps(hf_models, method, expected):
    model, tok = hf_models["gpt2"]
    am = il.load_model(model, method, tokenizer=tok)
    calls, handle = count_forwards(model)
    try:
        out = am.attribute(["Hello", "The cat"], ["Hello world, this is a cat on the mat", "The cat sat on the mat"],
                           step_scores=["probability", "entropy"], show_progress=False)
    finally:
        handle.remove()
    assert out[0].attr_pos_end - out[0].attr_pos_start >= 8
    assert len(calls) == expected


def test_integrated_gradients_runs_one_forward_per_chunk_of_integration_points(hf_models):
    model, tok = hf_models["gpt2"]
    am = il.load_model(model, "integrated_gradients", tokenizer=tok)
    calls, handle = count_forwards(model)
    try:
        am.attribute("Hello", "Hello world, this is a cat", n_steps=12, internal_batch_size=4,
                     step_scores=["probability"], show_progress=False)
    finally:
        handle.remove()
    assert len(calls) == 12 // 4 + 1  # integration chunks + one forward at the input for step scores


def test_memory_budget_chunks_steps_without_changing_results(hf_models):
    model, tok = hf_models["llama"]
    am = il.load_model(model, "saliency", tokenizer=tok)
    whole = am.attribute("The", "The cat sat on the mat", show_progress=False)[0]
    chunked = am.attribute("The", "The cat sat on the mat", memory_budget_bytes=1, show_progress=False)[0]
    torch.testing.assert_close(whole.target_attributions.nan_to_num(), chunked.target_attributions.nan_to_num())


@pytest.mark.parametrize("method", ["saliency", "integrated_gradients", "layer_integrated_gradients"])
def test_backward_split_at_the_output_projection_gives_the_full_backward_numbers(hf_pair, texts, method):
    """The split backward (summed scores to the head's input, then vectorised below it) against the
    one-hot vectorised backward through the head, on padded batches of all three families."""
    from inseq_lightning.attr.backward import BackwardStrategy

    model, tok = hf_pair
    am = il.load_model(model, method, tokenizer=tok)
    prompt, target = texts
    inputs = [prompt, prompt]
    targets = [target, target if model.config.is_encoder_decoder else prompt + " on"]
    kwargs = {"n_steps": 4} if "integrated" in method else {}
    kwargs["attribute_target"] = method != "layer_integrated_gradients"  # layer methods attribute one side
    at_head, at_scores = BackwardStrategy(), BackwardStrategy(split_at_head=False)
    split = am.attribute(inputs, targets, show_progress=False, backward_strategy=at_head, **kwargs)
    assert at_head.records and all(r.split for r in at_head.records), "the split backward was not taken"
    full = am.attribute(inputs, targets, show_progress=False, backward_strategy=at_scores, **kwargs)
    assert at_scores.records and not any(r.split for r in at_scores.records)
    for a, b in zip(split.sequence_attributions, full.sequence_attributions):
        for side in ("source_attributions", "target_attributions"):
            if getattr(a, side) is not None:
                torch.testing.assert_close(getattr(a, side), getattr(b, side), equal_nan=True, atol=1e-6, rtol=1e-5)


def test_default_memory_budget_has_a_floor_and_sets_the_steps_per_backward(hf_models):
    """The default budget is a quarter of the weights but never under 64 MiB: a toy model batches all
    its steps in one vectorised backward; a zero budget takes one step per backward, same numbers."""
    from inseq_lightning.attr.backward import MEMORY_BUDGET_FLOOR_BYTES, BackwardStrategy, default_memory_budget

    model, tok = hf_models["gpt2"]
    am = il.load_model(model, "saliency", tokenizer=tok)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert weights // 4 < MEMORY_BUDGET_FLOOR_BYTES == 64 * 1024**2
    assert am.default_memory_budget == MEMORY_BUDGET_FLOOR_BYTES
    big = torch.nn.Linear(8192, 8192, bias=False)  # 256 MiB of weights: a quarter is above the floor
    assert default_memory_budget(big) == 8192 * 8192 * 4 // 4
    default, one_by_one = BackwardStrategy(), BackwardStrategy()
    batched = am.attribute("Hello", "Hello world, this is a cat", show_progress=False, backward_strategy=default)[0]
    n = batched.attr_pos_end - batched.attr_pos_start
    assert [r.steps for r in default.records] == [n]
    single = am.attribute("Hello", "Hello world, this is a cat", memory_budget_bytes=0, show_progress=False,
                          backward_strategy=one_by_one)[0]
    assert [r.steps for r in one_by_one.records] == [1] * n
    fixed = BackwardStrategy(steps_per_backward=2)
    chunked = am.attribute("Hello", "Hello world, this is a cat", show_progress=False, backward_strategy=fixed)[0]
    assert [r.steps for r in fixed.records] == [2] * (n // 2) + [n % 2] * (n % 2)
    for out in (single, chunked):
        torch.testing.assert_close(out.target_attributions, batched.target_attributions, equal_nan=True)


def test_chunks_are_capped_on_a_cpu_and_segments_are_planned_for_rows_that_share_their_steps():
    from inseq_lightning.attr.backward import (
        CPU_POSITIONS_PER_BACKWARD,
        BackwardStrategy,
        StepLayout,
        backward_bytes_per_step,
        plan_segments,
    )

    positions = torch.arange(50, 100).view(1, -1)  # 50 + 50 tokens: steps 0..49 at positions 50..99
    layout = StepLayout(positions, torch.ones_like(positions, dtype=torch.bool), 100, hidden_size=256, num_layers=6,
                        inner_size=1024, num_heads=8)
    auto = BackwardStrategy()
    # 1 row x 100 positions x 4 bytes x (2 x 1024 + 4 x 256 + 2 x 8 x 100)
    assert backward_bytes_per_step(layout, 1, 100) == 100 * 4 * (2048 + 1024 + 1600)
    assert auto.steps_per_chunk(layout, 1, 100, 64 * 2**20) == CPU_POSITIONS_PER_BACKWARD // 100 == 8
    assert auto.steps_per_chunk(layout, 1, 100, 3 * backward_bytes_per_step(layout, 1, 100)) == 3  # the budget
    assert auto.steps_per_chunk(layout, 1, 100, 0) == 1
    assert auto.steps_per_chunk(layout, 4, 100, 2**40) == 2  # four rows share the cap
    # 7 chunks of 8 steps: two segments of whole chunks; 1 chunk: one whole forward
    assert plan_segments(auto, layout, 8) == [range(32), range(32, 50)]
    assert plan_segments(BackwardStrategy(segments=3), layout, 8) == [range(16), range(16, 40), range(40, 50)]
    assert plan_segments(auto, layout, 50) is None
    assert plan_segments(BackwardStrategy(segments=1), layout, 8) is None
    # rows attributing different positions (prompts of different lengths), or padding steps: whole forwards
    two = StepLayout(torch.tensor([[3, 4, 5], [4, 5, 6]]), torch.ones(2, 3, dtype=torch.bool), 7, 64, 2)
    assert plan_segments(BackwardStrategy(segments=2), two, 1) is None
    padded = StepLayout(torch.tensor([[3, 4, 5], [3, 4, 0]]), torch.tensor([[True] * 3, [True, True, False]]), 6, 64, 2)
    assert plan_segments(BackwardStrategy(segments=2), padded, 1) is None
    for bad in ({"segments": 0}, {"steps_per_backward": 0}, {"segments": 1.5}, {"segments": True}):
        with pytest.raises(ValueError, match="positive integer"):
            BackwardStrategy(**bad)


def test_one_sequence_runs_its_forward_in_segments_and_its_steps_backpropagate_from_their_own(hf_models):
    """50 + 50 tokens on GPT-2: two forward segments (the second continuing the first's key/value cache),
    the first segment's steps never backpropagate through the second; the maps equal one whole forward's."""
    from inseq_lightning.attr.backward import BackwardStrategy
    from inseq_lightning.tiny_models import tiny_gpt2

    model, tok = tiny_gpt2(n_layer=2, n_embd=64, n_head=4)
    ids = tok(" ".join(["the quick brown fox jumps over the lazy dog"] * 12))["input_ids"]
    prompt, full = tok.decode(ids[:50]), tok.decode(ids[:100])
    am = il.load_model(model, "saliency", tokenizer=tok)
    calls, handle = count_forwards(model)
    segmented = BackwardStrategy(steps_per_backward=5)
    try:
        out = am.attribute(prompt, full, step_scores=["probability"], show_progress=False,
                           backward_strategy=segmented)[0]
    finally:
        handle.remove()
    n = out.attr_pos_end - out.attr_pos_start
    assert n == 50 and len(calls) == 2
    assert [(r.steps, r.segment) for r in segmented.records] == [(5, 0)] * 5 + [(5, 1)] * 5
    whole = am.attribute(prompt, full, step_scores=["probability"], show_progress=False,
                         backward_strategy=BackwardStrategy(steps_per_backward=5, segments=1))[0]
    a, b = out.target_attributions, whole.target_attributions
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * b.nan_to_num().abs().max().item(), equal_nan=True)
    torch.testing.assert_close(out.step_scores["probability"], whole.step_scores["probability"], rtol=1e-6, atol=0)
    # A step function's extra forward without gradient (mc_dropout_prob_avg's noisy ones) between the
    # forward and its backwards leaves the segments and the split at the output layer in place.
    noisy = BackwardStrategy(steps_per_backward=5)
    am.attribute(prompt, full, step_scores=["mc_dropout_prob_avg"], show_progress=False, backward_strategy=noisy)
    assert [(r.steps, r.split, r.segment) for r in noisy.records] == [(5, True, 0)] * 5 + [(5, True, 1)] * 5


def test_attention_without_step_scores_skips_the_output_layer_with_the_same_numbers(hf_models):
    model, tok = hf_models["llama"]
    am = il.load_model(model, "attention", tokenizer=tok)
    rows_seen = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, a, o: rows_seen.append(a[0].shape[1]))
    try:
        bare = am.attribute("The cat", "The cat sat on the mat", show_progress=False)[0]
        scored = am.attribute("The cat", "The cat sat on the mat", step_scores=["probability"], show_progress=False)[0]
    finally:
        handle.remove()
    length = len(scored.target)
    # no step scores: one position through lm_head; with them: from the first predicting position on
    assert rows_seen == [1, length - (scored.attr_pos_start - 1)]
    torch.testing.assert_close(bare.target_attributions, scored.target_attributions, equal_nan=True)
    assert scored.step_scores["probability"].shape == (scored.attr_pos_end - scored.attr_pos_start,)


@pytest.mark.parametrize("method", ["saliency", "layer_gradient_x_activation", "occlusion"])
def test_full_logits_are_freed_before_the_per_step_backwards(hf_pair, texts, method, monkeypatch):
    """Step scores are read as soon as the real-input forward returns; the ``[T, vocab]`` logits
    must not live through the per-step backwards (with a 50k vocabulary they are most of the peak)."""
    import weakref

    from inseq_lightning.attr import backward

    model, tok = hf_pair
    am = il.load_model(model, method, tokenizer=tok)
    logits_refs, alive_at_backward = [], []
    real_batched_grad = backward.batched_grad

    def observed_batched_grad(*args, **kwargs):
        alive_at_backward.append([ref() is not None for ref in logits_refs])
        return real_batched_grad(*args, **kwargs)

    monkeypatch.setattr(backward, "batched_grad", observed_batched_grad)
    handle = model.register_forward_hook(lambda m, a, out: logits_refs.append(weakref.ref(out.logits)))
    try:
        out = am.attribute(*texts, step_scores=["probability"], show_progress=False)[0]
    finally:
        handle.remove()
    plain = il.load_model(copy.deepcopy(model), "dummy", tokenizer=copy.deepcopy(tok))
    expected = plain.attribute(*texts, step_scores=["probability"], show_progress=False)[0].step_scores["probability"]
    torch.testing.assert_close(out.step_scores["probability"], expected)
    if method == "occlusion":  # no backward at all
        assert alive_at_backward == []
        return
    assert alive_at_backward and all(len(alive) == 1 for alive in alive_at_backward)  # one forward, then backwards
    assert not any(alive[0] for alive in alive_at_backward)


@pytest.mark.parametrize("family_name", ["gpt2", "llama"])
@pytest.mark.parametrize("method", ["saliency", "integrated_gradients", "layer_gradient_x_activation", "attention"])
def test_output_layer_runs_from_the_first_predicting_position_with_the_full_numbers(hf_models, family_name, method):
    """The prompt's positions before the first attributed step predict nothing attributed: the
    output layer skips them (``logits_to_keep``), which must not change a number, also on a
    padded batch whose prompts differ in length."""
    model, tok = hf_models[family_name]
    prompts = ["The cat", "Hello world, this is"]
    targets = ["The cat sat on the mat", "Hello world, this is a cat on the mat"]
    trimmed_model = il.load_model(model, method, tokenizer=tok)
    full_model = il.load_model(model, method, tokenizer=tok)
    full_model.can_skip_logits = False
    rows_seen = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, a, o: rows_seen.append(a[0].shape[1]))
    try:
        kwargs = {"step_scores": ["probability", "entropy"], "show_progress": False, "n_steps": 4} \
            if method == "integrated_gradients" else {"step_scores": ["probability", "entropy"], "show_progress": False}
        trimmed = trimmed_model.attribute(prompts, targets, batch_size=2, **kwargs)
        seen_trimmed = list(rows_seen)
        rows_seen.clear()
        full = full_model.attribute(prompts, targets, batch_size=2, **kwargs)
    finally:
        handle.remove()
    first_predicting = min(seq.attr_pos_start for seq in trimmed) - 1
    assert seen_trimmed and all(r == rows_seen[0] - first_predicting for r in seen_trimmed)
    for a, b in zip(trimmed, full):
        torch.testing.assert_close(a.target_attributions, b.target_attributions, equal_nan=True)
        for name in ("probability", "entropy"):
            torch.testing.assert_close(a.step_scores[name], b.step_scores[name])


@pytest.mark.parametrize("method,kwargs,per_advance", [
    ("saliency", {"memory_budget_bytes": 0}, 1.0),  # one step per backward: one token per advance
    ("integrated_gradients", {"n_steps": 4, "internal_batch_size": 2, "memory_budget_bytes": 0}, 0.5),  # 2 rounds
    ("attention", {}, None),  # no per-step backward: the batch at once
])
def test_progress_bar_counts_attributed_tokens_and_moves_within_one_sequence(hf_models, monkeypatch, method, kwargs,
                                                                             per_advance):
    import functools

    from rich.console import Console
    from rich.progress import Progress

    import inseq_lightning.models.attribution_model as attribution_module

    console = Console(record=True, force_terminal=True, width=120)
    monkeypatch.setattr(attribution_module, "Progress", functools.partial(Progress, console=console,
                                                                          refresh_per_second=1000))
    advances = []
    real_enter = attribution_module._progress.__enter__

    def recording_enter(self):
        advance = real_enter(self)
        return lambda n: (advances.append(n), advance(n))

    monkeypatch.setattr(attribution_module._progress, "__enter__", recording_enter)
    model, tok = hf_models["gpt2"]
    am = il.load_model(model, method, tokenizer=tok)
    out = am.attribute("Hello", "Hello world, this is a cat on the mat", show_progress=True, **kwargs)[0]
    tokens = out.attr_pos_end - out.attr_pos_start
    assert tokens >= 8
    assert sum(advances) == pytest.approx(tokens)
    moving = [n for n in advances if n > 0]
    if per_advance is None:
        assert moving == [tokens]
    else:
        assert moving == [per_advance] * round(tokens / per_advance)
    text = console.export_text()
    assert f"Attributing with {method}" in text and "tokens" in text


def test_step_functions_that_forward_again_keep_the_backward_split(hf_models):
    """Step scores are read between the forward and the backward; mc_dropout's extra no-grad
    forwards must not replace the recorded output-layer input the split backward starts from."""
    from inseq_lightning.attr.backward import BackwardStrategy

    model, tok = hf_models["gpt2"]
    am = il.load_model(model, "saliency", tokenizer=tok)
    expected = am.attribute("Hello", "Hello world, this is a cat", show_progress=False)[0]
    strategy = BackwardStrategy()
    out = am.attribute("Hello", "Hello world, this is a cat", step_scores=["mc_dropout_prob_avg"],
                       show_progress=False, backward_strategy=strategy)[0]
    assert strategy.records and all(r.split for r in strategy.records), "the split point was lost"
    torch.testing.assert_close(out.target_attributions, expected.target_attributions, equal_nan=True)
    assert out.step_scores["mc_dropout_prob_avg"].shape == (out.attr_pos_end - out.attr_pos_start,)


@pytest.mark.parametrize("method,kwargs", [("integrated_gradients", {"n_steps": 8}),
                                           ("layer_integrated_gradients", {"n_steps": 8}),
                                           ("gradient_shap", {"n_samples": 4, "seed": 0})])
def test_integration_points_are_summed_as_the_backwards_come(hf_models, monkeypatch, method, kwargs):
    """Per-point gradients would be n_steps times the result: the engine keeps only the weighted
    sum over points ([B, L, N, D]), and the numbers equal summing the per-point gradients after."""
    from inseq_lightning.attr import engine
    from inseq_lightning.attr.backward import BackwardStrategy

    model, tok = hf_models["llama"]
    am = il.load_model(model, method, tokenizer=tok)
    prompts, targets = ["The cat", "The"], ["The cat sat on the mat", "The mat is red"]
    shapes = []
    real = engine.step_gradients

    def recording(*args, **kw):
        out = real(*args, **kw)
        shapes.append(tuple(out[0].shape))
        return out

    monkeypatch.setattr(engine, "step_gradients", recording)
    summed = am.attribute(prompts, targets, show_progress=False, **kwargs)
    assert shapes and all(shape[0] == 2 for shape in shapes)  # B rows, whatever the number of points
    reference = am.attribute(prompts, targets, show_progress=False, backward_strategy=BackwardStrategy(sum_points=False),
                             **kwargs)
    for a, b in zip(summed, reference):
        torch.testing.assert_close(a.target_attributions, b.target_attributions, equal_nan=True)


@pytest.mark.parametrize("method,kwargs", [("saliency", {}), ("integrated_gradients", {"n_steps": 8}),
                                           ("gradient_shap", {"n_samples": 4, "seed": 0})])
def test_bfloat16_model_gives_the_float32_maps_to_half_precision(hf_models, method, kwargs):
    """Half-precision weights (what large models run in on GPUs) work end to end; sums over
    integration points accumulate in float32, so the maps stay within bfloat16's resolution."""
    model, tok = hf_models["llama"]
    half = copy.deepcopy(model).to(torch.bfloat16)
    texts = ("The cat", "The cat sat on the mat")
    full = il.load_model(model, method, tokenizer=tok).attribute(*texts, step_scores=["probability"],
                                                                 show_progress=False, **kwargs)[0]
    low = il.load_model(half, method, tokenizer=tok).attribute(*texts, step_scores=["probability"],
                                                               show_progress=False, **kwargs)[0]
    assert low.target_attributions.dtype == torch.float32  # outputs are float32 whatever the model
    a, b = full.aggregate(), low.aggregate()
    torch.testing.assert_close(b.target_attributions, a.target_attributions, atol=5e-3, rtol=0, equal_nan=True)
    torch.testing.assert_close(low.step_scores["probability"], full.step_scores["probability"], atol=1e-3, rtol=0)
    assert next(half.parameters()).dtype == torch.bfloat16  # the model is left in its dtype
