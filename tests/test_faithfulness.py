"""Faithfulness (comprehensiveness, sufficiency, soft variants, random baseline), plausibility and cue mass:
formulas on models built so the answer is known, then a real monitor pass."""

import copy
import csv
import math

import numpy as np
import pytest
import torch
from transformers import PretrainedConfig
from transformers.modeling_outputs import CausalLMOutput

from inseq_lightning.data.outputs import FeatureAttributionSequenceOutput, TokenWithId
from inseq_lightning.errors import InvalidInputError
from inseq_lightning.models.attribution_model import AttributionModel
from inseq_lightning.monitor import Probe, ProbeMonitor, ProbeSet, evidence_mass
from inseq_lightning.monitor.drift import AttributionMap
from inseq_lightning.monitor.evidence import average_precision, context_token_scores, reciprocal_rank
from inseq_lightning.monitor.faithfulness import (
    faithfulness_seed,
    probe_faithfulness,
    removal_count,
)
from inseq_lightning.monitor.values import FAITHFULNESS_VALUES, definition
from inseq_lightning.sinks import FileSink
from inseq_lightning.tiny_models import gpt2_tokenizer

ANSWER = 7  # the token every step predicts
UNK = 0  # gpt2_tokenizer(): <|endoftext|> is UNK, EOS and BOS


class PresenceLM(torch.nn.Module):
    """A causal LM built so the answer is known: every position gives the token ``ANSWER`` the probability
    ``p0 + sum_i c_i * x_i``, where ``x_i`` is the first embedding coordinate of context position ``i``
    (1 for every token, 0 for the UNK baseline), and the rest of the mass to token ``ANSWER + 1``.
    Moving a token towards the baseline by ``w`` lowers the probability by exactly ``w * c_i``."""

    def __init__(self, weights, p0: float = 0.0, vocab: int = 400):
        super().__init__()
        self.config = PretrainedConfig(is_encoder_decoder=False, eos_token_id=UNK, bos_token_id=UNK,
                                       pad_token_id=UNK)
        self.embed = torch.nn.Embedding(vocab, 2)
        with torch.no_grad():
            self.embed.weight.zero_()
            self.embed.weight[:, 0] = 1.0
            self.embed.weight[UNK, 0] = 0.0
        self.register_buffer("weights", torch.tensor(weights, dtype=torch.float32))
        self.p0, self.vocab = p0, vocab

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, use_cache=None, logits_to_keep=0):
        x = inputs_embeds if inputs_embeds is not None else self.embed(input_ids)
        n = len(self.weights)
        p = (self.p0 + (x[:, :n, 0] * self.weights).sum(-1)).clamp(1e-9, 1 - 1e-9)  # [B]
        logits = torch.full((x.shape[0], x.shape[1], self.vocab), -1e4)
        logits[:, :, ANSWER] = p.log()[:, None]
        logits[:, :, ANSWER + 1] = (1 - p).log()[:, None]
        return CausalLMOutput(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)


def _wrapper(weights, p0=0.0) -> AttributionModel:
    return AttributionModel(PresenceLM(weights, p0).eval(), gpt2_tokenizer())


def _sequence(context_ids, scores, steps=2) -> FeatureAttributionSequenceOutput:
    """A decoder-only sequence ``context + ANSWER * steps`` with the given (aggregated) context scores:
    one list (the same at every step) or one list per step."""
    ids = [*context_ids, *[ANSWER] * steps]
    columns = np.array(scores, dtype=float)
    columns = np.tile(columns[:, None], (1, steps)) if columns.ndim == 1 else columns.T
    n = len(context_ids)
    full = torch.full((n + steps, steps), float("nan"))
    full[:n] = torch.tensor(columns, dtype=torch.float32)
    for j in range(steps):  # the generated prefix: valid rows with no score
        full[n : n + j, j] = 0.0
    tokens = [TokenWithId(f"t{i}", i) for i in ids]
    return FeatureAttributionSequenceOutput(source=tokens[:n], target=tokens, target_attributions=full,
                                            attr_pos_start=n, attr_pos_end=n + steps, aggregated=True)


CONTEXT = [11, 12, 13, 14, 15, 16, 17, 18, 19, 20]  # ten context tokens, none of them the baseline


# ---- comprehensiveness and sufficiency on a model whose output depends on one token ----------
@pytest.mark.parametrize("key", [0, 4, 9])
def test_the_token_the_output_depends_on_ranked_first_is_fully_comprehensive_and_sufficient(key):
    weights = [0.0] * 10
    weights[key] = 1.0
    scores = [0.1] * 10
    scores[key] = 1.0
    measured = probe_faithfulness(_wrapper(weights), _sequence(CONTEXT, scores))
    assert measured.probability == pytest.approx(1.0, abs=1e-6)
    for kinds in measured.per_fraction.values():
        assert kinds["comprehensiveness"] == pytest.approx(1.0, abs=1e-6)  # removed: probability 0
        assert kinds["sufficiency"] == pytest.approx(0.0, abs=1e-6)  # kept alone: probability unchanged
    values = measured.values
    assert values["comprehensiveness"] == pytest.approx(1.0, abs=1e-6)
    assert values["sufficiency"] == pytest.approx(0.0, abs=1e-6)
    assert values["soft_comprehensiveness"] == pytest.approx(1.0, abs=1e-6)  # importance 1: moved all the way
    assert values["soft_sufficiency"] == pytest.approx(0.0, abs=1e-6)
    assert values["comprehensiveness_vs_random"] == values["comprehensiveness"] - values["comprehensiveness_random"]
    assert values["sufficiency_vs_random"] == values["sufficiency"] - values["sufficiency_random"]


def test_the_token_the_output_depends_on_ranked_last_gives_zero_comprehensiveness():
    weights = [0.0] * 10
    weights[3] = 1.0
    scores = [1.0 - 0.05 * i for i in range(10)]
    scores[3] = 0.0  # the one token that matters is ranked last: never among the top 50%
    measured = probe_faithfulness(_wrapper(weights), _sequence(CONTEXT, scores))
    assert measured.removed == {0.1: 1, 0.2: 2, 0.5: 5}
    for kinds in measured.per_fraction.values():
        assert kinds["comprehensiveness"] == pytest.approx(0.0, abs=1e-6)
        assert kinds["sufficiency"] == pytest.approx(1.0, abs=1e-6)  # the token that matters is removed
    assert measured.values["soft_comprehensiveness"] == pytest.approx(0.0, abs=1e-6)  # importance 0: untouched
    assert measured.values["soft_sufficiency"] == pytest.approx(1.0, abs=1e-6)


def test_aopc_and_soft_variants_match_a_hand_computation():
    c = [0.4, 0.3, 0.15, 0.05]  # the drop each context token causes when removed; p0 = 0.05, full 0.95
    scores = [0.1, 0.4, 0.2, 0.3]  # ranking: position 1, 3, 2, 0
    measured = probe_faithfulness(_wrapper(c, p0=0.05), _sequence(CONTEXT[:4], scores))
    assert measured.probability == pytest.approx(0.95, abs=1e-6)
    assert measured.removed == {0.1: 1, 0.2: 1, 0.5: 2}  # ceil(0.4), ceil(0.8), ceil(2.0)
    comp = {0.1: 0.3, 0.2: 0.3, 0.5: 0.3 + 0.05}
    suff = {f: 0.9 - v for f, v in comp.items()}  # the drop of everything not kept
    for fraction, kinds in measured.per_fraction.items():
        assert kinds["comprehensiveness"] == pytest.approx(comp[fraction], abs=1e-6)
        assert kinds["sufficiency"] == pytest.approx(suff[fraction], abs=1e-6)
    assert measured.values["comprehensiveness"] == pytest.approx((0.3 + 0.3 + 0.35) / 3, abs=1e-6)
    assert measured.values["sufficiency"] == pytest.approx((0.6 + 0.6 + 0.55) / 3, abs=1e-6)
    w = np.array(scores) / max(scores)  # normalized importance [0.25, 1, 0.5, 0.75]
    assert measured.values["soft_comprehensiveness"] == pytest.approx(float(w @ c), abs=1e-6)  # 0.5125
    assert measured.values["soft_sufficiency"] == pytest.approx(float((1 - w) @ c), abs=1e-6)  # 0.3875


def test_per_step_ranking_ranks_each_attributed_token_by_its_own_column():
    c = [0.4, 0.3, 0.15, 0.05]
    per_step = [[0.1, 0.4, 0.2, 0.3], [0.9, 0.0, 0.05, 0.05]]
    wrapper, seq = _wrapper(c, p0=0.05), _sequence(CONTEXT[:4], per_step)
    aggregated = probe_faithfulness(wrapper, seq)  # summed: [1.0, 0.4, 0.25, 0.35] -> positions 0, 1, 3, 2
    assert aggregated.values["comprehensiveness"] == pytest.approx((0.4 + 0.4 + 0.7) / 3, abs=1e-6)
    steps = probe_faithfulness(wrapper, seq, ranking="per_step")
    # step 1 removes 1 / 1 / {1, 3}: 0.3, 0.3, 0.35; step 2 removes 0 / 0 / {0, 2} (tie broken by position)
    assert steps.values["comprehensiveness"] == pytest.approx(((0.3 + 0.4) + (0.3 + 0.4) + (0.35 + 0.55)) / 6,
                                                              abs=1e-6)
    w1, w2 = np.array(per_step[0]) / 0.4, np.array(per_step[1]) / 0.9
    assert steps.values["soft_comprehensiveness"] == pytest.approx(float((w1 @ c + w2 @ c) / 2), abs=1e-6)


def test_all_masked_rows_of_a_probe_run_in_one_batched_forward_unless_the_budget_splits_them():
    wrapper = _wrapper([0.4, 0.3, 0.15, 0.05], p0=0.05)
    rows = []
    wrapper.model.register_forward_pre_hook(lambda module, args, kwargs: rows.append(kwargs["inputs_embeds"].shape[0]),
                                            with_kwargs=True)
    seq = _sequence(CONTEXT[:4], [0.1, 0.4, 0.2, 0.3], steps=3)
    measured = probe_faithfulness(wrapper, seq, fractions=(0.25, 0.5))
    # unmasked + soft comprehensiveness + soft sufficiency; per fraction: ranked and random, remove and keep
    assert rows == [3 + 4 * 2] and measured.forwards == 1
    rows.clear()
    per_step = probe_faithfulness(wrapper, seq, fractions=(0.25, 0.5), ranking="per_step")
    assert rows == [1 + 2 * 3 + 4 * 3 * 2]  # one row per attributed token and mask
    rows.clear()
    # the caller's unmasked probabilities save a row and give the same numbers
    given = probe_faithfulness(wrapper, seq, fractions=(0.25, 0.5), probabilities=[measured.probability] * 3)
    assert rows == [2 + 4 * 2] and given.values == pytest.approx(measured.values, abs=1e-7)
    rows.clear()
    # probabilities of another length are not this sequence's: computed instead
    probe_faithfulness(wrapper, seq, fractions=(0.25, 0.5), probabilities=[0.5, 0.5])
    assert rows == [3 + 4 * 2]
    rows.clear()
    # a budget of one row splits the forward row by row, with the same numbers
    split = probe_faithfulness(wrapper, seq, fractions=(0.25, 0.5), ranking="per_step", memory_budget_bytes=1)
    assert rows == [1] * 31 and split.forwards == 31
    assert split.values == pytest.approx(per_step.values, abs=1e-7)


def test_candidates_restrict_what_is_removed_and_what_the_fractions_count():
    """Position 0 carries the answer but is not a candidate (a template token, say): it is never
    removed, so the ranked masks over positions 1-3 remove nothing that matters."""
    wrapper = _wrapper([0.6, 0.0, 0.0, 0.0], p0=0.1)
    seq = _sequence(CONTEXT[:4], [1.0, 0.5, 0.2, 0.1])
    everything = probe_faithfulness(wrapper, seq, fractions=(0.25,))
    assert everything.values["comprehensiveness"] == pytest.approx(0.6, abs=1e-6) and everything.removed == {0.25: 1}
    content = probe_faithfulness(wrapper, seq, fractions=(0.25, 0.5), candidates=[1, 2, 3])
    assert content.removed == {0.25: 1, 0.5: 2}  # of three candidates, rounded up
    assert content.values["comprehensiveness"] == pytest.approx(0.0, abs=1e-6)
    assert content.values["comprehensiveness_random"] == pytest.approx(0.0, abs=1e-6)
    # position 0 stays in every sufficiency row too: keeping the top candidates keeps the answer
    assert content.values["sufficiency"] == pytest.approx(0.0, abs=1e-6)


def test_the_random_baseline_is_seeded_per_probe_and_pass_and_reads_the_same_masks():
    weights = [0.0] * 10
    weights[5] = 1.0
    wrapper, seq = _wrapper(weights), _sequence(CONTEXT, [0.1] * 10)
    runs = {seed: probe_faithfulness(wrapper, seq, seed=seed) for seed in range(12)}
    again = probe_faithfulness(wrapper, seq, seed=3)
    assert again.values == runs[3].values  # deterministic
    for measured in runs.values():
        hits = [measured.per_fraction[f]["comprehensiveness_random"] for f in (0.1, 0.2, 0.5)]
        # the key token is in a random top-k or not, and the top-k sets are nested
        assert all(h == pytest.approx(0.0, abs=1e-6) or h == pytest.approx(1.0, abs=1e-6) for h in hits)
        assert hits == sorted(hits)
        kept = [measured.per_fraction[f]["sufficiency_random"] for f in (0.1, 0.2, 0.5)]
        assert [round(h + k) for h, k in zip(hits, kept)] == [1, 1, 1]  # removed xor kept
    assert len({m.values["comprehensiveness_random"] for m in runs.values()}) > 1  # the seed matters
    assert faithfulness_seed("probe_0", 2) == faithfulness_seed("probe_0", 2) != faithfulness_seed("probe_0", 4)
    assert faithfulness_seed("probe_0", 2) != faithfulness_seed("probe_1", 2)


def test_a_token_whose_baseline_is_itself_is_never_removed():
    weights = [0.5, 0.5, 0.0]
    # position 0 is EOS (its baseline is itself): top-ranked, yet not a candidate
    measured = probe_faithfulness(_wrapper(weights), _sequence([UNK, 12, 13], [1.0, 0.5, 0.1]))
    assert measured.removed == {0.1: 1, 0.2: 1, 0.5: 1}  # 50% of the two removable tokens
    assert measured.values["comprehensiveness"] == pytest.approx(0.5, abs=1e-6)  # position 1 removed


def test_counts_round_up_and_bad_options_fail():
    assert [removal_count(f, 10) for f in (0.1, 0.2, 0.5, 1.0)] == [1, 2, 5, 10]
    assert [removal_count(f, 3) for f in (0.1, 0.2, 0.5)] == [1, 1, 2]
    wrapper, seq = _wrapper([1.0]), _sequence([11], [1.0])
    with pytest.raises(ValueError, match="fractions"):
        probe_faithfulness(wrapper, seq, fractions=(0.0,))
    with pytest.raises(ValueError, match="ranking"):
        probe_faithfulness(wrapper, seq, ranking="columns")


def test_an_all_zero_map_has_no_soft_variants():
    measured = probe_faithfulness(_wrapper([0.5, 0.5]), _sequence([11, 12], [0.0, 0.0]))
    assert math.isnan(measured.values["soft_comprehensiveness"]) and math.isnan(measured.values["soft_sufficiency"])
    assert not math.isnan(measured.values["comprehensiveness"])


def test_the_model_is_left_as_it_was():
    wrapper = _wrapper([1.0, 0.0])
    wrapper.model.train()
    wrapper.model.embed.weight.grad = torch.ones_like(wrapper.model.embed.weight)
    grad = wrapper.model.embed.weight.grad
    rng = torch.get_rng_state()
    probe_faithfulness(wrapper, _sequence([11, 12], [1.0, 0.0]))
    assert wrapper.model.training and wrapper.model.embed.training
    assert wrapper.model.embed.weight.grad is grad and bool((grad == 1).all())
    assert wrapper.model.embed.weight.requires_grad
    assert torch.equal(torch.get_rng_state(), rng)


# ---- plausibility ------------------------------------------------------------------------------
def test_average_precision_and_reciprocal_rank_by_hand():
    scores = [0.5, 0.1, 0.4, 0.3, 0.2]  # ranking: 0 (no), 2 (yes), 3 (no), 4 (yes), 1 (no)
    assert average_precision(scores, [2, 4]) == pytest.approx(0.5 * (1 / 2) + 0.5 * (2 / 4))
    assert reciprocal_rank(scores, [2, 4]) == pytest.approx(1 / 2)
    assert average_precision(scores, [0]) == reciprocal_rank(scores, [0]) == 1.0
    # ties enter together: one threshold, precision 1/2 at recall 1; the tied negative ranks first
    assert average_precision([0.2, 0.2, 0.1], [1]) == pytest.approx(0.5)
    assert reciprocal_rank([0.2, 0.2, 0.1], [1]) == pytest.approx(0.5)
    assert reciprocal_rank([0.0, 0.0, 0.0], [2]) == pytest.approx(1 / 3)  # an all-zero map ranks nothing first
    assert math.isnan(average_precision(scores, [])) and math.isnan(reciprocal_rank(scores, []))


def test_average_precision_matches_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(2, 12))
        scores = np.round(rng.random(n), 1)  # rounded: ties happen
        labels = rng.random(n) < 0.4
        if not labels.any():
            labels[0] = True
        assert average_precision(scores, np.flatnonzero(labels)) == pytest.approx(
            metrics.average_precision_score(labels, scores))


def test_context_token_scores_sum_the_absolute_columns():
    scores = np.array([[0.5, -0.25], [0.5, 0.25], [np.nan, 0.5]])
    assert context_token_scores(scores, 2).tolist() == [0.75, 0.75]


# ---- cue ---------------------------------------------------------------------------------------
def test_cue_is_given_like_evidence_and_kept_in_the_state():
    probe = Probe("the cat sat", " on the mat", ("cat",), cue="sat|the")
    assert probe.cue == ("sat", "the") and probe.cue_spans() == [(8, 11), (0, 3)]
    assert Probe("the cat sat", " on", cue=[(4, 7)]).cue_spans() == [(4, 7)]
    with pytest.raises(InvalidInputError, match="cue 'dog'"):
        ProbeSet([Probe("the cat sat", " on", cue=("dog",))])
    with pytest.raises(InvalidInputError, match="cue in a conversation"):
        Probe([{"role": "user", "content": "the cat"}], "on", cue=[(0, 3)])
    state = ProbeSet([probe]).to_state()
    assert ProbeSet.coerce(state).probes[0].cue == ("sat", "the")
    assert ProbeSet.from_lists(["the cat sat"], [" on"], cues=[["cat"]]).probes[0].cue == ("cat",)


def test_monitor_logs_cue_mass_plausibility_and_faithfulness(hf_models, tmp_path):
    model, tok = copy.deepcopy(hf_models["gpt2"][0]), hf_models["gpt2"][1]
    probes = [Probe("the cat sat", " on the mat", ("cat",), cue=("sat",)), Probe("Hello world", ", this is a cat")]
    monitor = ProbeMonitor(probes, step_scores=("probability",), strict=True, faithfulness=True)
    model.train()
    flags = [p.requires_grad for p in model.parameters()]
    rng = torch.get_rng_state()
    report = monitor.run(model, tok, step=0, sinks=[FileSink(tmp_path)])
    assert model.training and [p.requires_grad for p in model.parameters()] == flags
    assert torch.equal(torch.get_rng_state(), rng)

    first, second = report.results
    current = AttributionMap.from_sequence(first.aggregated)
    offsets = tok("the cat sat", return_offsets_mapping=True)["offset_mapping"]
    sat = [i for i, (start, end) in enumerate(offsets) if start < 11 and end > 8 and "the cat sat"[start:end].strip()]
    assert sat
    assert list(first.cue_rows) == sat and first.cue_mass == pytest.approx(evidence_mass(current, sat))
    token_scores = context_token_scores(current.scores, current.n_source)
    assert first.evidence_average_precision == pytest.approx(average_precision(token_scores, first.evidence_rows))
    assert first.evidence_reciprocal_rank == pytest.approx(reciprocal_rank(token_scores, first.evidence_rows))
    assert math.isnan(second.cue_mass) and math.isnan(second.evidence_average_precision)

    names = [*FAITHFULNESS_VALUES, "evidence_average_precision", "evidence_reciprocal_rank", "cue_mass"]
    assert set(names) <= set(monitor.value_names)
    rows = {row["probe"]: row for row in report.rows()}
    means = report.means()
    for name in FAITHFULNESS_VALUES:
        assert math.isfinite(rows["probe_0"][name]) and math.isfinite(rows["probe_1"][name]), name
        assert means[name] == pytest.approx((rows["probe_0"][name] + rows["probe_1"][name]) / 2)
        assert f"{monitor.prefix}/mean/{name}" in report.scalars()
    for name in ("evidence_average_precision", "evidence_reciprocal_rank", "cue_mass"):
        assert means[name] == pytest.approx(rows["probe_0"][name]) and name not in rows["probe_1"]
    with (tmp_path / "drift.csv").open() as handle:  # a sink carries them under the same names
        logged = {row["probe"]: row for row in csv.DictReader(handle)}
    for probe in ("probe_0", "probe_1", "mean"):
        for name in FAITHFULNESS_VALUES:
            assert float(logged[probe][name]) == pytest.approx(rows[probe][name], rel=1e-5, abs=1e-9), name
    assert float(logged["probe_0"]["cue_mass"]) == pytest.approx(first.cue_mass, rel=1e-5)
    assert definition("comprehensiveness").better == "higher" and definition("sufficiency").better == "lower"
    assert definition("cue_mass").better == "lower" and definition("comprehensiveness_random").better is None
    # the unmasked probability is the attribution's own step score: the same model, the same inputs
    wrapper = AttributionModel(model, tok)
    measured = probe_faithfulness(wrapper, first.output.sequence_attributions[0], seed=faithfulness_seed("probe_0", 0))
    assert measured.probability == pytest.approx(first.step_scores["probability"], rel=1e-5)
    # (the monitor reuses that step score for the unmasked row; here it is computed: float rounding apart)
    assert measured.values == pytest.approx(first.faithfulness, rel=1e-4, abs=1e-8)


@pytest.mark.parametrize("name", ["llama", "marian"])
def test_faithfulness_reads_the_attributions_own_probabilities_on_every_architecture(hf_models, name):
    model, tok = hf_models[name]
    probe = Probe("The cat sat", " on the mat") if name == "llama" else Probe("the cat sat", "Le chat est noir")
    report = ProbeMonitor([probe], step_scores=("probability",), strict=True, faithfulness=True).run(model, tok, 0)
    result = report.results[0]
    assert all(math.isfinite(result.faithfulness[n]) for n in FAITHFULNESS_VALUES)
    measured = probe_faithfulness(AttributionModel(model, tok), result.output.sequence_attributions[0])
    assert measured.probability == pytest.approx(result.step_scores["probability"], rel=1e-5)


def test_generate_mode_measures_the_generated_ids(hf_models):
    model, tok = hf_models["gpt2"]
    probes = ProbeSet([Probe("the cat sat", None)], generate=True, generation_args={"max_new_tokens": 3})
    monitor = ProbeMonitor(probes, step_scores=("probability",), strict=True, faithfulness=True)
    result = monitor.run(model, tok, step=0).results[0]
    measured = probe_faithfulness(AttributionModel(model, tok), result.output.sequence_attributions[0])
    assert measured.probability == pytest.approx(result.step_scores["probability"], rel=1e-5)
    assert all(math.isfinite(result.faithfulness[n]) for n in FAITHFULNESS_VALUES)


def test_faithfulness_is_off_by_default_and_costs_one_forward_per_probe_when_on(hf_models):
    model, tok = hf_models["gpt2"]
    calls = []
    handle = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        on = ProbeMonitor([Probe("the cat sat", " on the mat")], step_scores=("probability",), faithfulness=True)
        on.run(model, tok, step=0)
        with_faithfulness, calls[:] = len(calls), []
        off = ProbeMonitor([Probe("the cat sat", " on the mat")], step_scores=("probability",))
        report = off.run(model, tok, step=0)
    finally:
        handle.remove()
    # every masked row in one forward; the unmasked probabilities are the attribution's step scores
    assert with_faithfulness - len(calls) == 1
    assert not set(FAITHFULNESS_VALUES) & set(off.value_names) and not report.results[0].faithfulness
    with pytest.raises(ValueError, match="ranking"):
        ProbeMonitor([Probe("a", " b")], faithfulness_ranking="nope")
