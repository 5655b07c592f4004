"""``inseq-lightning drift``: drift of a probe set across saved checkpoints, after the fact."""

import copy
import csv
import json
import math
import shutil
from html.parser import HTMLParser

import pytest
import torch

from inseq_lightning.cli import main
from inseq_lightning.data import FeatureAttributionOutput
from inseq_lightning.drift_checkpoints import checkpoint_step, drift_across_checkpoints
from inseq_lightning.errors import ModelLoadingError
from inseq_lightning.viz.layout import build_grid

HOSTILE = "<img src=x onerror=alert(1)>"


@pytest.fixture()
def checkpoints(hf_models, tmp_path):
    """checkpoint-0 and checkpoint-10 hold the same weights; checkpoint-20 is perturbed."""
    model, tok = hf_models["gpt2"]
    paths = []
    for step, noise in ((0, 0.0), (10, 0.0), (20, 0.3)):
        changed = copy.deepcopy(model)
        with torch.no_grad():
            generator = torch.Generator().manual_seed(step)
            for p in changed.parameters():
                p.add_(torch.randn(p.shape, generator=generator) * noise)
        path = tmp_path / f"checkpoint-{step}"
        changed.save_pretrained(path)
        tok.save_pretrained(path)
        paths.append(path)
    probes = tmp_path / "probes.jsonl"
    probes.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "the cat sat", "target": " on the mat", "evidence": ["cat"], "name": "cat"},
        {"prompt": "Hello world", "target": ", this is a cat", "name": "hello"},
    ]))
    return paths, probes


def test_cli_writes_drift_for_each_checkpoint_in_step_order(checkpoints, tmp_path, capsys):
    paths, probes = checkpoints
    out = tmp_path / "drift"
    # given out of order: the reference is still the lowest step
    assert main(["drift", str(paths[2]), str(paths[0]), str(paths[1]), "--probes", str(probes),
                 "--step-scores", "probability", "entropy", "--output-dir", str(out), "--tensorboard"]) == 0
    rows = list(csv.DictReader((out / "drift.csv").open()))
    assert [(r["step"], r["probe"]) for r in rows] == [(s, p) for s in ("0", "10", "20") for p in ("cat", "hello", "mean")]
    by = {(r["step"], r["probe"]): r for r in rows}
    assert by["0", "cat"]["drift_ref/cosine"] == ""  # the reference
    assert float(by["10", "cat"]["drift_ref/cosine"]) == pytest.approx(1.0)  # same weights
    assert float(by["20", "cat"]["drift_ref/cosine"]) < 0.999  # perturbed weights moved the map
    assert float(by["20", "cat"]["drift_ref/js_divergence"]) > 1e-4
    assert 0 < float(by["20", "cat"]["evidence_mass"]) < 1 and by["20", "hello"]["evidence_mass"] == ""
    assert (out / "step_20" / "cat.json").is_file() and (out / "step_20" / "hello.html").is_file()
    assert (out / "tensorboard" / "plugins" / "inseq_lightning" / "index.json").is_file()
    printed = capsys.readouterr().out
    assert "Attribution drift across checkpoints" in printed and "entropy" in printed


def test_bad_checkpoints_are_clear_errors(checkpoints, tmp_path):
    paths, probes = checkpoints
    with pytest.raises(ModelLoadingError, match="Not a checkpoint directory"):
        drift_across_checkpoints([paths[0], tmp_path / "nope"], probes, tmp_path / "o")
    twin = tmp_path / "other_run" / "checkpoint-10"  # another run's checkpoint at the same step
    shutil.copytree(paths[1], twin)
    with pytest.raises(ModelLoadingError, match="same step"):
        drift_across_checkpoints([paths[1], twin], probes, tmp_path / "o")


def test_checkpoint_steps_are_read_from_names(tmp_path):
    from pathlib import Path

    assert checkpoint_step(Path("run/checkpoint-500"), 3) == 500
    assert checkpoint_step(Path("epoch=1-step=120.ckpt_hf"), 3) == 120
    assert checkpoint_step(Path("final"), 3) == 3


class _Elements(HTMLParser):
    """Every start tag with its attributes, and the text, of an HTML document."""

    def __init__(self, text: str):
        super().__init__()
        self.elements: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)

    def with_attribute(self, name: str) -> list[tuple[str, dict]]:
        return [(tag, attrs) for tag, attrs in self.elements if name in attrs]


@pytest.fixture()
def report(checkpoints, tmp_path):
    """The drift command over the three checkpoints, with a probe whose prompt is markup."""
    paths, _ = checkpoints
    probes = tmp_path / "report_probes.jsonl"
    probes.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "the cat sat", "target": " on the mat", "evidence": ["cat"], "name": "cat"},
        {"prompt": HOSTILE, "target": " x", "name": "img"},
    ]))
    out = tmp_path / "drift"
    assert main(["drift", *map(str, paths), "--probes", str(probes), "--output-dir", str(out), "--tensorboard",
                 "--report", str(tmp_path / "drift report.html")]) == 0
    rows = list(csv.DictReader((out / "drift.csv").open()))
    return _Elements((tmp_path / "drift report.html").read_text(encoding="utf-8")), rows, out


def test_the_report_numbers_are_the_values_of_drift_csv(report):
    page, rows, _ = report
    csv_values = {(int(r["step"]), r["probe"], name): float(value) for r in rows for name, value in r.items()
                  if name.startswith(("drift_ref/", "drift_prev/", "step_score/")) and value != ""}
    cells = {(int(a["data-step"]), a["data-probe"], a["data-name"]): float(a["data-value"])
             for tag, a in page.with_attribute("data-value") if tag == "td" and "data-name" in a}
    shown = {key: value for key, value in csv_values.items() if not key[2].endswith(("tokens_compared",
                                                                                   "tokens_undefined", "_compared"))}
    assert shown and {key: cells[key] for key in shown} == shown  # the same floats, not rounded ones
    points = {(int(a["data-step"]), a["data-probe"], name): float(a["data-value"])
              for name in ("drift_ref/cosine", "drift_prev/js_divergence")
              for tag, a in _chart_points(page, name)}
    assert points == {key: value for key, value in csv_values.items() if key[2] in ("drift_ref/cosine",
                                                                                     "drift_prev/js_divergence")}
    assert {probe for _, probe, _ in points} == {"cat", "img", "mean"}


def _chart_points(page: _Elements, name: str) -> list[tuple[str, dict]]:
    """The circles of the chart of ``name`` (they follow its svg element)."""
    points, inside = [], False
    for tag, attrs in page.elements:
        if tag == "svg":
            inside = attrs.get("data-name") == name
        elif tag == "circle" and inside:
            points.append((tag, attrs))
    return points


def test_the_report_difference_maps_are_b_minus_a_of_the_saved_maps(report):
    page, _, out = report
    for probe in ("cat", "img"):
        grids = {step: build_grid(FeatureAttributionOutput.load(out / f"step_{step}" / f"{probe}.json")
                                  .sequence_attributions[0].aggregate()).scores for step in (0, 10, 20)}
        for before, after in ((0, 10), (10, 20)):
            shown, collecting, in_probe = {}, False, False
            for tag, attrs in page.elements:
                if tag == "section":
                    in_probe = attrs.get("data-probe") == probe
                if tag == "div" and "data-difference" in attrs:
                    collecting = in_probe and attrs["data-difference"] == f"{before}-{after}"
                elif tag == "td" and collecting and "data-value" in attrs:
                    shown[int(attrs["data-row"]), int(attrs["data-column"])] = float(attrs["data-value"])
            expected = {(i, j): grids[after][i][j] - value for i, row in enumerate(grids[before])
                        for j, value in enumerate(row) if not math.isnan(value)}
            assert shown == pytest.approx(expected, abs=1e-6), (probe, before, after)
        assert max(abs(v) for v in shown.values()) > 1e-4  # the perturbed checkpoint moved the map


def test_the_report_is_self_contained_and_shows_markup_as_text(report):
    page, _, _ = report
    tags = {tag for tag, _ in page.elements}
    assert not tags & {"script", "link", "img", "iframe", "object", "embed", "image", "use", "style", "base"}
    for name in ("src", "href", "srcset", "xlink:href", "action", "background", "onerror", "onload"):
        assert page.with_attribute(name) == [], name
    assert "url(" not in "".join(a.get("style", "") for _, a in page.elements)
    assert HOSTILE in "".join(page.text)  # the prompt, as text


def test_the_tensorboard_run_of_drift_has_the_compare_views_data(report):
    from tensorboard.plugins import base_plugin
    from werkzeug.test import Client

    from inseq_lightning.tensorboard_plugin import AttributionsPlugin

    _, rows, out = report
    plugin = AttributionsPlugin(base_plugin.TBContext(logdir=str(out / "tensorboard")))
    query = {"run": ".", "prefix": "attribution/saliency", "probe": "cat"}
    compare = Client(plugin.get_plugin_apps()["/compare"]).get("/compare", query_string={**query, "a": 0, "b": 20})
    data = compare.get_json()
    assert data["mismatch"] is None and (data["a"]["step"], data["b"]["step"]) == (0, 20)
    curves = Client(plugin.get_plugin_apps()["/curves"]).get("/curves", query_string=query).get_json()
    cosine = next(c for c in curves["curves"] if c["name"] == "drift_ref/cosine")
    by = {(r["step"], r["probe"]): r for r in rows}
    assert curves["steps"] == [0, 10, 20]
    assert cosine["values"][0] is None
    assert cosine["values"][1:] == [float(by[str(s), "cat"]["drift_ref/cosine"]) for s in (10, 20)]
