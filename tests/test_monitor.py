"""The framework-free monitor: probes, drift formulas, guards, failure isolation, sinks' rendering."""

import copy
import csv
import json
import math
import random
import warnings

import numpy as np
import pytest
import torch

from inseq_lightning import FeatureAttributionOutput
from inseq_lightning.errors import InvalidInputError
from inseq_lightning.monitor import (
    AttributionMap,
    AttributionMonitorWarning,
    MonitoringError,
    Probe,
    ProbeMonitor,
    ProbeSet,
    evidence_mass,
    map_drift,
)
from inseq_lightning.monitor.drift import DRIFT_METRICS, column_drift
from inseq_lightning.sinks import FileSink, Sink
from inseq_lightning.sinks.render import markdown_table, markdown_token

PROBES = {
    "gpt2": [Probe("the cat sat", " on the mat", ("cat",)), Probe("Hello world", ", this is a cat")],
    "llama": [Probe("The cat sat", " on the mat", ("cat",)), Probe("Hello world", ", this is a cat")],
    "marian": [Probe("the cat sat", "Le chat est noir", ("cat",)), Probe("Hello world", "Il gatto dorme")],
}


# ---- drift formulas ---------------------------------------------------------------------------
def _map(scores, n_source=2, rows=None):
    scores = np.array(scores, dtype=float)
    return AttributionMap(scores, tuple(rows or range(scores.shape[0])), tuple(range(scores.shape[1])), n_source)


def test_identical_maps_have_no_drift():
    m = _map([[0.5, 0.2], [0.3, 0.3], [0.2, 0.5]])
    d = map_drift(m, m)
    assert d == pytest.approx({"cosine": 1.0, "js_divergence": 0.0, "top1_agreement": 1.0,
                               "top3_agreement": 1.0, "spearman": 1.0, "tokens_compared": 2.0,
                               "tokens_undefined": 0.0, "continuation_changed": 0.0})


def test_column_drift_matches_hand_computed_values():
    a = np.array([0.6, 0.3, 0.1, np.nan])
    b = np.array([0.1, 0.3, 0.6, 0.2])  # the 4th row is not valid in a: ignored
    d = column_drift(a, b, n_source=3)
    assert d["cosine"] == pytest.approx((0.06 + 0.09 + 0.06) / (0.46))
    m = (np.array([0.6, 0.3, 0.1]) + np.array([0.1, 0.3, 0.6])) / 2
    kl = lambda p: float((p * np.log2(p / m)).sum())
    assert d["js_divergence"] == pytest.approx(0.5 * kl(np.array([0.6, 0.3, 0.1])) + 0.5 * kl(np.array([0.1, 0.3, 0.6])))
    assert d["spearman"] == pytest.approx(-1.0)
    assert d["top1_agreement"] == 0.0
    assert d["top3_agreement"] == pytest.approx(1.0)  # 3 source rows: the top 3 sets are equal


def test_spearman_handles_ties_and_top_k_uses_source_rows_only():
    a = np.array([1.0, 1.0, 0.0, 5.0])
    b = np.array([2.0, 2.0, 1.0, 0.0])
    d = column_drift(a, b, n_source=2)
    # ranks a: [1.5, 1.5, 0, 3]; b: [2.5, 2.5, 1, 0]
    ra, rb = np.array([1.5, 1.5, 0, 3]), np.array([2.5, 2.5, 1, 0])
    assert d["spearman"] == pytest.approx(float(np.corrcoef(ra, rb)[0, 1]))
    assert d["top3_agreement"] == 1.0  # only the 2 source rows count: both maps rank {0, 1}


def test_maps_with_different_tokens_are_not_compared():
    a = _map([[0.5], [0.5]], rows=[1, 2])
    b = _map([[0.5], [0.5]], rows=[1, 3])
    drift = map_drift(a, b)
    assert all(math.isnan(drift[name]) for name in DRIFT_METRICS)
    assert drift["tokens_compared"] == 0.0


def test_evidence_mass_is_the_share_on_evidence_rows():
    m = _map([[0.6, 0.1], [0.2, 0.1], [0.2, np.nan]])
    # column 0: 0.6 / 1.0; column 1: 0.1 / 0.2
    assert evidence_mass(m, [0]) == pytest.approx((0.6 + 0.5) / 2)
    assert math.isnan(evidence_mass(m, []))


def test_map_state_round_trips_through_json():
    m = _map([[0.5, np.nan], [0.25, 0.75]])
    back = AttributionMap.from_state(json.loads(json.dumps(m.to_state())))
    assert back.comparable(m) and np.allclose(back.scores, m.scores, equal_nan=True)


# ---- probes -----------------------------------------------------------------------------------
def test_probe_sets_from_lists_files_and_datasets(tmp_path):
    records = [{"prompt": "a b c", "target": " d", "evidence": ["b"], "name": "first"},
               {"prompt": "x y", "target": " z"}]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in records))
    csv_path = tmp_path / "p.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["prompt", "target", "evidence", "name"])
        writer.writeheader()
        writer.writerows([{**r, "evidence": "|".join(r.get("evidence", []))} for r in records])
    import datasets

    for probes in (ProbeSet.from_file(jsonl), ProbeSet.from_file(csv_path),
                   ProbeSet.from_dataset(datasets.Dataset.from_list([{**records[0]}, {**records[1], "evidence": [],
                                                                                       "name": ""}])),
                   ProbeSet.from_lists(["a b c", "x y"], [" d", " z"], [["b"], []], ["first", ""])):
        assert probes.names == ["first", "probe_1"]
        assert probes[0].evidence == ("b",) and probes[0].evidence_spans() == [(2, 3)]
        assert probes[1].target == " z"
    assert ProbeSet.coerce([("p", "t", [(0, 1)])])[0].evidence_spans() == [(0, 1)]


@pytest.mark.parametrize("build, message", [
    (lambda: ProbeSet([]), "at least one probe"),
    (lambda: ProbeSet([Probe("  ", "x")]), "empty prompt"),
    (lambda: ProbeSet([Probe("abc", None)]), "no target"),
    (lambda: ProbeSet([Probe("abc", "d", ("zz",))]), "does not occur"),
    (lambda: ProbeSet([Probe("abc", "d", ((2, 9),))]), "outside its prompt"),
    (lambda: ProbeSet([Probe("a", "b", name="x"), Probe("c", "d", name="x")]), "unique"),
    (lambda: ProbeSet.from_lists(["a", "b"], ["c"]), "one per prompt"),
    (lambda: ProbeSet.coerce([1, 2]), "probes must be"),
    (lambda: ProbeSet.from_file("missing.jsonl"), "does not exist"),
])
def test_bad_probes_get_clear_errors(build, message):
    with pytest.raises(InvalidInputError, match=message):
        build()


# ---- the monitor on live models -----------------------------------------------------------------
def _snapshot(model):
    return ({n: m.training for n, m in model.named_modules()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            {n: (p.grad, None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()})


def test_monitor_leaves_the_model_and_rng_untouched_under_inference_mode(hf_pair, family):
    model, tok = hf_pair
    model.train()
    first_block = next(m for n, m in model.named_modules() if n.endswith((".0", "layers.0")))
    first_block.eval()  # a frozen submodule must stay in eval mode
    model.get_input_embeddings().weight.requires_grad_(False)
    for p in list(model.parameters())[-3:]:
        p.grad = torch.randn_like(p)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    before = _snapshot(model)
    torch.manual_seed(7), np.random.seed(7), random.seed(7)
    rng = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    monitor = ProbeMonitor(PROBES[family], step_scores=("probability", "entropy"))
    with torch.inference_mode():  # as in trainer.validate()/test()
        report = monitor.run(model, tok, step=3)
    assert [r.probe.name for r in report.results] == ["probe_0", "probe_1"]
    assert all(r.aggregated.source_attributions is not None or r.aggregated.target_attributions is not None
               for r in report.results)
    # gradients flowed: scores are not all zero
    seq = report.results[0].output[0]
    total = sum(float(t.nan_to_num().abs().sum()) for t in (seq.source_attributions, seq.target_attributions)
                if t is not None)
    assert total > 0
    after = _snapshot(model)
    assert after[0] == before[0] and after[1] == before[1]
    for name, (obj, values) in before[2].items():
        assert after[2][name][0] is obj
        if values is not None:
            assert torch.equal(obj, values)
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    assert torch.equal(torch.get_rng_state(), rng[0])
    assert np.array_equal(np.random.get_state()[1], rng[1]) and random.getstate() == rng[2]


def test_drift_history_moves_with_the_weights(hf_models):
    model, tok = copy.deepcopy(hf_models["gpt2"][0]), hf_models["gpt2"][1]
    monitor = ProbeMonitor(PROBES["gpt2"], step_scores=("probability",))
    first = monitor.run(model, tok, step=0)
    assert first.results[0].drift_reference == {} and first.results[0].reference_step is None
    same = monitor.run(model, tok, step=1)
    assert same.results[0].drift_reference["cosine"] == pytest.approx(1.0)
    assert same.results[0].drift_reference["js_divergence"] == pytest.approx(0.0, abs=1e-9)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    moved = monitor.run(model, tok, step=2)
    r = moved.results[0]
    assert r.reference_step == 0 and r.previous_step == 1
    assert r.drift_reference["cosine"] < 0.999 and r.drift_reference["js_divergence"] > 1e-4
    assert r.score_change_reference["probability"] == pytest.approx(
        r.step_scores["probability"] - first.results[0].step_scores["probability"])
    assert 0 < r.evidence_mass < 1
    rows = monitor.history.probes["probe_0"].rows
    assert [row["step"] for row in rows] == [0, 1, 2]
    # The state is JSON and restores into a fresh monitor that continues the same history.
    state = json.loads(json.dumps(monitor.state_dict()))
    fresh = ProbeMonitor(PROBES["gpt2"], step_scores=("probability",))
    fresh.load_state_dict(state)
    again = fresh.run(model, tok, step=3)
    assert again.results[0].reference_step == 0 and again.results[0].previous_step == 2
    assert again.results[0].drift_previous["cosine"] == pytest.approx(1.0, abs=1e-5)


def test_evidence_mass_counts_the_evidence_tokens(hf_models):
    model, tok = hf_models["gpt2"]
    prompt = "the cat sat"  # no whitespace-only token (those are never evidence)
    whole = ProbeMonitor([Probe(prompt, " and", ((0, len(prompt)),))]).run(model, tok, 0)
    assert whole.results[0].evidence_mass == pytest.approx(1.0)  # one step, every prompt token is evidence
    part = ProbeMonitor([Probe(prompt, " and", ("cat",))]).run(model, tok, 0).results[0]
    seq = part.aggregated
    offsets = tok(prompt, return_offsets_mapping=True)["offset_mapping"]
    start = prompt.index("cat")
    rows = [i for i, (s, e) in enumerate(offsets) if s < start + 3 and e > start]
    assert rows and [seq.source[i].id for i in rows] == [tok(prompt)["input_ids"][i] for i in rows]
    column = seq.target_attributions[:, 0]
    expected = float(column[rows].abs().sum() / column.nan_to_num().abs().sum())
    assert part.evidence_mass == pytest.approx(expected)


def test_generate_mode_attributes_the_models_own_continuation(hf_models):
    model, tok = hf_models["gpt2"]
    probes = ProbeSet([Probe("the cat sat", None)], generate=True, generation_args={"max_new_tokens": 3})
    report = ProbeMonitor(probes).run(model, tok, 0)
    assert len(report.results[0].aggregated.generated) == 3


class _Recorder(Sink):
    def __init__(self):
        self.steps = []

    def log_report(self, report):
        self.steps.append((report.step, [r.probe.name for r in report.results]))


class _Broken(Sink):
    def log_report(self, report):
        raise RuntimeError("disk full")


def test_long_probe_and_broken_sink_are_skipped_with_one_warning(hf_models):
    model, tok = hf_models["gpt2"]
    probes = PROBES["gpt2"] + [Probe("the cat " * 200, " x", name="too_long")]
    monitor = ProbeMonitor(probes)
    recorder = _Recorder()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(3):
            report = monitor.run(model, tok, step, sinks=[_Broken(), recorder])
    messages = [str(w.message) for w in caught if issubclass(w.category, AttributionMonitorWarning)]
    assert len([m for m in messages if "too_long" in m]) == 1 and "positions" in messages[0]
    assert len([m for m in messages if "_Broken" in m]) == 1
    assert recorder.steps == [(s, ["probe_0", "probe_1"]) for s in range(3)]
    assert "too_long" in report.skipped


def test_strict_mode_raises_for_probes_and_sinks(hf_models):
    model, tok = hf_models["gpt2"]
    with pytest.raises(MonitoringError, match="too_long"):
        ProbeMonitor([Probe("the cat " * 200, " x", name="too_long")], strict=True).run(model, tok, 0)
    with pytest.raises(MonitoringError, match="disk full"):
        ProbeMonitor(PROBES["gpt2"], strict=True).run(model, tok, 0, sinks=[_Broken()])


def test_files_sink_writes_loadable_json_html_and_a_drift_csv(hf_models, tmp_path):
    model, tok = hf_models["marian"]
    monitor = ProbeMonitor(PROBES["marian"], step_scores=("probability",))
    sink = FileSink(tmp_path)
    reports = [monitor.run(model, tok, step, sinks=[sink]) for step in (0, 5)]
    loaded = FeatureAttributionOutput.load(tmp_path / "step_5" / "probe_0.json")
    original = reports[1].results[0].output[0]
    assert torch.allclose(loaded[0].source_attributions, original.source_attributions)
    assert [t.token for t in loaded[0].target] == [t.token for t in original.target]
    assert "hat" in (tmp_path / "step_5" / "probe_0.html").read_text()
    rows = list(csv.DictReader((tmp_path / "drift.csv").open()))
    assert [(r["step"], r["probe"]) for r in rows] == [(s, p) for s in ("0", "5") for p in ("probe_0", "probe_1", "mean")]
    assert rows[0]["drift_ref/cosine"] == "" and float(rows[3]["drift_ref/cosine"]) == pytest.approx(1.0)
    assert float(rows[3]["step_score/probability"]) == pytest.approx(reports[1].results[0].step_scores["probability"])
    scores = [r.step_scores["probability"] for r in reports[1].results]
    assert float(rows[5]["step_score/probability"]) == pytest.approx(sum(scores) / 2)


def test_markdown_table_escapes_tokens_and_marks_the_top_three(hf_models):
    assert markdown_token("<script>alert(1)</script>") == "&lt;script&gt;alert\\(1\\)&lt;/script&gt;"
    assert markdown_token("a|b") == "a\\|b" and markdown_token("Ġthe") == "␣the"
    model, tok = hf_models["gpt2"]
    result = ProbeMonitor(PROBES["gpt2"][:1]).run(model, tok, 0).results[0]
    table = markdown_table(result, 0)
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    n_columns = len(result.aggregated.generated)
    body = lines[1: 1 + len(result.aggregated.target)]
    assert len(body) == len(result.aggregated.target)
    for j in range(n_columns):
        cells = [row.split(" | ")[1 + j] for row in body]
        valid = [c for c in cells if c.strip(" |")]
        assert sum(c.startswith("**") for c in valid) == min(3, len(valid))
    assert any(line.startswith("| *probability*") for line in lines)
    assert "Evidence mass" in table
    evidence_lines = [line for line in body if line.startswith("| ▸ ")]
    assert len(evidence_lines) == len(result.evidence_rows) >= 1
    assert all(body.index(line) in result.evidence_rows for line in evidence_lines)
