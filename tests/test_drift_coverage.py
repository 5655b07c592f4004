"""Drift is computed over what two maps share, says how much that is, and never invents agreement.

Expected values come from scipy (cosine, Jensen-Shannon, Spearman) on columns picked by hand.
"""

import csv
import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cosine as cosine_distance
from scipy.spatial.distance import jensenshannon
from scipy.stats import spearmanr

from inseq_lightning.monitor import AttributionMap, ProbeMonitor, ProbeSet, map_drift
from inseq_lightning.monitor.drift import DRIFT_METRICS, column_drift
from inseq_lightning.monitor.probes import Probe
from inseq_lightning.sinks import FileSink
from inseq_lightning.tiny_models import tiny_gpt2


def _scipy_column(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    valid = ~np.isnan(a) & ~np.isnan(b)
    x, y = a[valid], b[valid]
    return {"cosine": 1 - cosine_distance(x, y),
            "js_divergence": jensenshannon(np.abs(x), np.abs(y), base=2) ** 2,
            "spearman": spearmanr(x, y).statistic}


def _decoder_map(prompt: list[int], generated: list[int], rng: np.random.Generator) -> AttributionMap:
    """A decoder-only map: rows prompt + generated tokens, column j sees the rows before position len(prompt)+j."""
    rows = len(prompt) + len(generated)
    scores = np.full((rows, len(generated)), np.nan)
    for j in range(len(generated)):
        scores[: len(prompt) + j, j] = rng.random(len(prompt) + j)
    return AttributionMap(scores, tuple(prompt + generated), tuple(generated), len(prompt))


def test_changed_continuations_are_compared_over_their_common_prefix():
    rng = np.random.default_rng(0)
    prompt = [10, 11, 12]
    a = _decoder_map(prompt, [20, 21, 22, 23], rng)
    b = _decoder_map(prompt, [20, 21, 30, 31, 32], rng)  # the continuations part after two tokens
    drift = map_drift(a, b)
    assert drift["tokens_compared"] == 2 and drift["continuation_changed"] == 1.0
    expected = [_scipy_column(a.scores[:5, j], b.scores[:5, j]) for j in range(2)]
    for name in ("cosine", "js_divergence", "spearman"):
        assert drift[name] == pytest.approx(np.mean([e[name] for e in expected]), rel=1e-9)


def test_a_continuation_that_changes_at_once_compares_nothing():
    rng = np.random.default_rng(1)
    drift = map_drift(_decoder_map([1, 2], [3, 4], rng), _decoder_map([1, 2], [5, 4], rng))
    assert drift["tokens_compared"] == 0 and drift["continuation_changed"] == 1.0
    assert all(math.isnan(drift[name]) for name in DRIFT_METRICS)


def test_an_all_zero_column_has_no_top_k_agreement():
    zero, other = np.zeros(4), np.array([0.4, 0.3, 0.2, 0.1])
    drift = column_drift(zero, other, n_source=3)
    assert math.isnan(drift["top1_agreement"]) and math.isnan(drift["top3_agreement"])
    assert math.isnan(drift["cosine"]) and math.isnan(drift["js_divergence"]) and math.isnan(drift["spearman"])
    assert all(math.isnan(v) for v in column_drift(zero, zero, n_source=3).values())


def test_undefined_columns_are_left_out_of_the_means_and_counted():
    # column 0 is all zero in `a`; column 1: the top source row agrees (row 0), the top 3 share 2 of 3
    a = np.array([[0.0, 0.5], [0.0, 0.1], [0.0, 0.3], [0.0, 0.05]])
    b = np.array([[0.2, 0.6], [0.3, 0.3], [0.5, 0.02], [0.1, 0.08]])
    ma = AttributionMap(a, (1, 2, 3, 4), (7, 8), 4)
    mb = AttributionMap(b, (1, 2, 3, 4), (7, 8), 4)
    drift = map_drift(ma, mb)
    assert drift["tokens_compared"] == 2 and drift["tokens_undefined"] == 1
    assert drift["top1_agreement"] == 1.0
    assert drift["top3_agreement"] == pytest.approx(2 / 3)  # top 3: {0, 2, 1} against {0, 1, 3}
    assert drift["cosine"] == pytest.approx(1 - cosine_distance(a[:, 1], b[:, 1]))


def _forcing(prompt_ids: int, choices: dict[str, list[int]], current: dict):
    """Makes generate produce ``choices[current["name"]]`` after the prompt (the test switches it between passes)."""
    return lambda batch_id, ids: [choices[current["name"]][min(len(ids) - prompt_ids, 3)]]


def _column_cosines(seq_a, seq_b, columns: int) -> list[float]:
    a, b = seq_a.target_attributions.numpy(), seq_b.target_attributions.numpy()
    rows = min(a.shape[0], b.shape[0])
    return [_scipy_column(a[:rows, j], b[:rows, j])["cosine"] for j in range(columns)]


def test_generate_mode_logs_drift_over_the_matching_tokens_and_its_coverage(tmp_path):
    model, tok = tiny_gpt2()
    prompt = "the cat sat"
    n_prompt = len(tok(prompt)["input_ids"])
    ids = tok(" on the mat and", add_special_tokens=False)["input_ids"][:4]
    changed = ids[:2] + tok(" cat dog", add_special_tokens=False)["input_ids"][:2]
    choices = {"first": ids, "second": changed}
    current = {"name": "first"}
    args = {"max_new_tokens": 4, "do_sample": False, "prefix_allowed_tokens_fn": _forcing(n_prompt, choices, current)}
    probes = ProbeSet([Probe(prompt, None, name="moves"), Probe(prompt + " on", None, name="stays")],
                      generate=True, generation_args=args)
    monitor = ProbeMonitor(probes)
    sink = FileSink(tmp_path)
    first = monitor.run(model, tok, 0, sinks=[sink])
    with torch.no_grad():  # new weights: the maps move
        model.transformer.h[0].mlp.c_fc.weight.add_(0.05 * torch.randn_like(model.transformer.h[0].mlp.c_fc.weight))
    current["name"] = "second"
    second = monitor.run(model, tok, 10, sinks=[sink])

    moves, stays = second.results
    assert [t.id for t in moves.output[0].generated] == changed
    assert moves.drift_reference["tokens_compared"] == 2 and moves.drift_reference["continuation_changed"] == 1.0
    expected = np.mean(_column_cosines(moves.aggregated, first.results[0].aggregated, 2))
    assert moves.drift_reference["cosine"] == pytest.approx(expected, rel=1e-5)
    # "stays" starts one token later, so its forced continuation is the same shifted choice in both passes
    assert stays.drift_reference["continuation_changed"] == float(
        [t.id for t in stays.output[0].generated] != [t.id for t in first.results[1].output[0].generated])

    scalars = second.scalars()
    prefix = "attribution/saliency"
    compared = [r.drift_reference["tokens_compared"] for r in second.results]
    assert scalars[f"{prefix}/mean/drift_ref/tokens_compared"] == sum(compared)
    assert scalars[f"{prefix}/mean/drift_ref/probes_compared"] == sum(c > 0 for c in compared)
    assert scalars[f"{prefix}/mean/drift_ref/continuation_changed"] == pytest.approx(
        np.mean([r.drift_reference["continuation_changed"] for r in second.results]))
    cosines = [r.drift_reference["cosine"] for r in second.results if not math.isnan(r.drift_reference["cosine"])]
    assert scalars[f"{prefix}/mean/drift_ref/cosine"] == pytest.approx(np.mean(cosines))

    rows = list(csv.DictReader((tmp_path / "drift.csv").open()))
    logged = {(r["step"], r["probe"]): r for r in rows}
    assert float(logged[("10", "moves")]["drift_ref/tokens_compared"]) == 2
    assert float(logged[("10", "moves")]["drift_ref/continuation_changed"]) == 1


def test_teacher_forced_probes_compare_every_token_and_log_no_continuation_change():
    model, tok = tiny_gpt2()
    monitor = ProbeMonitor([Probe("the cat sat", " on the mat")])
    monitor.run(model, tok, 0)
    result = monitor.run(model, tok, 1).results[0]
    assert result.drift_reference["tokens_compared"] == len(result.aggregated.generated)
    assert "continuation_changed" not in result.drift_reference
    assert result.drift_reference["cosine"] == pytest.approx(1.0)
