"""Heatmap pixels for trackers, and renderings shared by the sinks of one pass (and by nothing else)."""

import dataclasses
import math

import numpy as np
import pytest
import torch

from inseq_lightning.data import FeatureAttributionSequenceOutput, TokenWithId
from inseq_lightning.monitor import Probe, ProbeMonitor
from inseq_lightning.sinks import FileSink, Sink, TensorBoardSink, render
from inseq_lightning.viz.colors import rgb, score_range
from inseq_lightning.viz.heatmap import BACKGROUND, CELL_HEIGHT, CELL_WIDTH, attribution_heatmap
from inseq_lightning.viz.html import attributions_html

NAN = math.nan
# rows: prefix tokens; columns: the 3 generated ones; NaN where a column's token is not generated yet
SCORES = [[0.8, -0.4, 0.1],
          [-1.0, 0.0, 0.5],
          [NAN, 0.3, -0.2],
          [NAN, NAN, 1.2],
          [NAN, NAN, NAN]]


def _sequence(scores, tokens=None) -> FeatureAttributionSequenceOutput:
    n_rows, n_cols = len(scores), len(scores[0])
    start = n_rows - n_cols
    tokens = tokens or [f"Ġt{i}" for i in range(n_rows)]
    target = [TokenWithId(t, i) for i, t in enumerate(tokens)]
    return FeatureAttributionSequenceOutput(
        source=target[:start], target=target, target_attributions=torch.tensor(scores, dtype=torch.float32),
        step_scores={"probability": torch.tensor([0.9, 0.5, 0.1][:n_cols])}, attr_pos_start=start,
        attr_pos_end=n_rows, granularity="coarse")


def _ink(pixels: np.ndarray) -> int:
    return int((pixels.sum(-1) < 200).sum())


def test_heatmap_is_hwc_uint8_pixels():
    pixels = attribution_heatmap(_sequence(SCORES), title="probe_0 · saliency · step 3").pixels
    assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3
    assert pixels.shape[0] > len(SCORES) * CELL_HEIGHT and pixels.shape[1] > len(SCORES[0]) * CELL_WIDTH


def test_heatmap_grows_by_one_cell_per_token():
    rng = np.random.default_rng(0)
    small = attribution_heatmap(_sequence(rng.random((20, 4)).tolist())).pixels
    large = attribution_heatmap(_sequence(rng.random((30, 12)).tolist())).pixels
    assert large.shape[0] - small.shape[0] == 10 * CELL_HEIGHT
    assert large.shape[1] - small.shape[1] == 8 * CELL_WIDTH


def test_each_cell_has_the_html_colour_of_its_score():
    heatmap = attribution_heatmap(_sequence(SCORES))
    lo, hi = score_range([v for row in SCORES for v in row], None, None)
    assert (lo, hi) == (-1.0, 1.2)
    for i, row in enumerate(SCORES):
        for j, value in enumerate(row):
            y, x = heatmap.cell_center(i, j)
            assert tuple(heatmap.pixels[y, x]) == rgb(value, lo, hi), (i, j, value)


def test_colour_bounds_can_be_fixed():
    heatmap = attribution_heatmap(_sequence(SCORES), min_val=-2.0, max_val=2.0)
    y, x = heatmap.cell_center(0, 0)
    assert tuple(heatmap.pixels[y, x]) == rgb(0.8, -2.0, 2.0)


def test_nan_cells_are_blank_up_to_their_lines():
    heatmap = attribution_heatmap(_sequence(SCORES))
    top, left = heatmap.grid_origin
    # column 0 is NaN from row 2 down: those cells and the lines only they touch are blank
    assert (heatmap.pixels[top + 2 * CELL_HEIGHT + 1 : top + 5 * CELL_HEIGHT + 1, left : left + CELL_WIDTH]
            == BACKGROUND).all()
    y, x = heatmap.cell_center(4, 1)
    assert tuple(heatmap.pixels[y, x]) == BACKGROUND
    # the scored cell above them keeps its frame
    assert tuple(heatmap.pixels[top + 2 * CELL_HEIGHT, left + CELL_WIDTH // 2]) != BACKGROUND


def test_rows_and_columns_are_labelled():
    heatmap = attribution_heatmap(_sequence(SCORES))
    top, left = heatmap.grid_origin
    for i in range(len(SCORES)):
        assert _ink(heatmap.pixels[top + i * CELL_HEIGHT : top + (i + 1) * CELL_HEIGHT, :left]) > 5, i
    for j in range(len(SCORES[0])):
        assert _ink(heatmap.pixels[:top, left + j * CELL_WIDTH : left + (j + 1) * CELL_WIDTH]) > 5, j


def test_title_is_written_above_the_map():
    plain = attribution_heatmap(_sequence(SCORES))
    titled = attribution_heatmap(_sequence(SCORES), title="probe_0 · saliency · step 3")
    assert titled.grid_origin[0] > plain.grid_origin[0] and _ink(titled.pixels[:16]) > 50


def test_evidence_rows_are_marked_in_the_margin():
    heatmap = attribution_heatmap(_sequence(SCORES), evidence_rows=(1, 2))
    top, left = heatmap.grid_origin
    margin = [heatmap.pixels[top + i * CELL_HEIGHT + CELL_HEIGHT // 2, left - 4] for i in range(len(SCORES))]
    green = [bool(g > r + 50 and g > b + 50) for r, g, b in np.array(margin, dtype=int)]
    assert green == [False, True, True, False, False]
    assert heatmap.pixels.shape[0] > attribution_heatmap(_sequence(SCORES)).pixels.shape[0]  # the legend


def test_tokens_outside_latin1_are_drawn_as_question_marks():
    tokens = ["Ġ你好", "Ġcat", "▁sat", "Ċ", "x" * 100]
    pixels = attribution_heatmap(_sequence(SCORES, tokens)).pixels
    assert pixels.shape[1] < 600  # a long token is cut


# ---- renderings shared by the sinks of one pass ---------------------------------------------------
class _Drawing(Sink):
    """A sink that keeps what it was given to log."""

    def __init__(self):
        self.images, self.pages = [], []

    def log_report(self, report):
        self.images += [render.result_image(r, report) for r in report.results]
        self.pages += [render.result_html(r, report) for r in report.results]


@pytest.fixture()
def counted(monkeypatch):
    """Counts the heatmaps and HTML pages drawn."""
    calls = {"image": 0, "html": 0}

    def heatmap(*args, **kwargs):
        calls["image"] += 1
        return attribution_heatmap(*args, **kwargs)

    def html(*args, **kwargs):
        calls["html"] += 1
        return attributions_html(*args, **kwargs)

    monkeypatch.setattr(render, "attribution_heatmap", heatmap)
    monkeypatch.setattr(render, "attributions_html", html)
    return calls


@pytest.fixture()
def gpt2_monitor(hf_models):
    model, tok = hf_models["gpt2"]
    monitor = ProbeMonitor([Probe("the cat sat", " on the mat", ("cat",)), Probe("Hello world", ", this is a cat")])
    return monitor, model, tok


def test_one_rendering_per_probe_is_shared_by_the_sinks_of_a_pass(gpt2_monitor, counted):
    monitor, model, tok = gpt2_monitor
    first, second = _Drawing(), _Drawing()
    report = monitor.run(model, tok, 0, sinks=[first, second])
    assert counted == {"image": 2, "html": 2}
    assert all(a is b for a, b in zip(first.images, second.images))
    assert first.pages == second.pages and "probe_1 · saliency · step 0" in first.pages[1]
    assert first.images[0].shape[2] == 3 and not first.images[0].flags.writeable  # shared: read-only
    render.result_image(report.results[0], report)
    assert counted["image"] == 3  # the pass is over: nothing cached


def test_a_sink_called_on_its_own_renders_without_caching(gpt2_monitor, counted):
    monitor, model, tok = gpt2_monitor
    report = monitor.run(model, tok, 0)
    sink = _Drawing()
    sink.log_report(report)
    sink.log_report(report)
    assert counted == {"image": 4, "html": 4}
    assert np.array_equal(sink.images[0], sink.images[2])


def test_renderings_are_dropped_when_a_sink_fails(gpt2_monitor, counted):
    monitor, model, tok = gpt2_monitor
    report = monitor.run(model, tok, 0)
    with pytest.raises(RuntimeError), render.shared_renderings():
        render.result_image(report.results[0], report)
        raise RuntimeError("disk full")
    render.result_image(report.results[0], report)
    assert counted["image"] == 2


def test_sinks_write_nothing_into_the_report(gpt2_monitor, tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    monitor, model, tok = gpt2_monitor
    writer = SummaryWriter(tmp_path / "tb")
    report = monitor.run(model, tok, 0, sinks=[TensorBoardSink(writer), FileSink(tmp_path / "files"), _Drawing()])
    writer.close()
    assert set(vars(report)) == {f.name for f in dataclasses.fields(report)}
    assert not hasattr(report, "cache")
