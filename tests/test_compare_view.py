"""The compare view of the Attributions tab: a real TensorBoard server over the log dir of a tiny run
(a model trained between three monitoring passes) and headless Chromium open the view, pick two
steps and read the rendered maps, the difference map, the tokens that moved and the curves back
from the DOM; each number is checked against the pass's own maps and the scalars TensorBoard
logged. A probe whose prompt is markup renders as text.

``INSEQ_LIGHTNING_SCREENSHOTS=docs/images pytest tests/test_compare_view.py -k screenshot`` renews
the screenshots of the documentation."""

import base64
import copy
import json
import math
import os
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_tensorboard_plugin import CHROMIUM, ROUTES, _DevTools, _get, tensorboard_server
from torch.utils.tensorboard import SummaryWriter

from inseq_lightning.monitor import Probe, ProbeMonitor
from inseq_lightning.monitor.report import MonitorReport
from inseq_lightning.sinks import TensorBoardSink
from inseq_lightning.viz.layout import build_grid

pytestmark = pytest.mark.timeout(300)
HOSTILE = "<img src=x onerror=alert(1)>"
PREFIX = "attribution/saliency"
STEPS = (0, 2, 4)
VIEW = "document.getElementById('compare-view')"


class Logged(NamedTuple):
    base: str  # the TensorBoard server
    run_dir: Path
    reports: dict[int, MonitorReport]
    scalars: dict[str, dict[int, float]]  # tag -> {step: value}, read back from the event files


def _train(model, tok, steps: int) -> None:
    """A few real optimizer steps on a language-modelling loss: the maps move between passes."""
    batch = tok(["the cat sat on the mat and looked at the dog."] * 2, return_tensors="pt")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    for _ in range(steps):
        model(**batch, labels=batch["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def _event_scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


@pytest.fixture(scope="module")
def logged(hf_models, tmp_path_factory):
    logdir = tmp_path_factory.mktemp("compare_logs")
    model, tok = copy.deepcopy(hf_models["gpt2"][0]), hf_models["gpt2"][1]
    probes = [Probe("the cat sat", " on the mat", name="cat", evidence=("cat",)), Probe(HOSTILE, " x", name="img")]
    monitor = ProbeMonitor(probes, faithfulness=True)
    run_dir = logdir / "run"
    writer = SummaryWriter(str(run_dir))
    sink = TensorBoardSink(writer, log_text=False, log_figures=False)
    reports = {}
    for step in STEPS:
        if step:
            _train(model, tok, 2)
        reports[step] = monitor.run(model, tok, step, sinks=[sink])
    writer.close()
    swap = SummaryWriter(str(logdir / "swap"))  # one probe name, another prompt at step 1: other tokens
    for step, prompt in ((0, "the cat sat"), (1, "the big dog sat")):
        ProbeMonitor([Probe(prompt, " on the mat", name="cat")]).run(
            model, tok, step, sinks=[TensorBoardSink(swap, log_text=False, log_figures=False)])
    swap.close()
    with tensorboard_server(logdir, logdir.parent / "tensorboard_compare.log") as base:
        yield Logged(base, run_dir, reports, _event_scalars(run_dir))


class _Browser(_DevTools):
    def run(self, expression: str):
        """Evaluate ``expression`` in the page and return its value (no polling)."""
        return self._send("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def resize(self, width: int, height: int) -> None:
        self._send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def screenshot(self, path: Path, top: float = 0, bottom: float | None = None, width: int = 1280) -> bytes:
        """A PNG of the page between ``top`` and ``bottom`` (CSS pixels; None: the page's end), ``width`` wide."""
        self.resize(width, 900)
        height = self.run("document.documentElement.scrollHeight")
        self.resize(width, height)
        clip = {"x": 0, "y": top, "width": width, "height": (height if bottom is None else bottom) - top, "scale": 1}
        data = base64.b64decode(self._send("Page.captureScreenshot", format="png", clip=clip)["data"])
        path.write_bytes(data)
        return data


@pytest.fixture()
def browser(tmp_path):
    assert CHROMIUM, "headless Chromium is needed: apt-get install chromium (make test does it when run as root)"
    devtools = _Browser(tmp_path)
    yield devtools
    devtools.close()


def _open_compare(browser: _Browser, logged: Logged, probe: str) -> None:
    browser.open(logged.base + "/data/plugin_entry.html?name=inseq_lightning")
    browser.wait_for("document.getElementById('attribution-page')?.innerText.includes('step 4')")
    browser.run("window.alerted = false; window.alert = () => { window.alerted = true; }")
    browser.run("document.getElementById('mode-compare').click()")
    browser.run(f"(() => {{ const s = document.querySelectorAll('select')[1]; s.value = {json.dumps(f'{PREFIX}|{probe}')};"
                " s.dispatchEvent(new Event('change')); })()")
    browser.wait_for(f"{VIEW}.dataset.shown === '0|4' && {VIEW}.innerText.includes('{probe} · saliency')")


def _pick(browser: _Browser, side: str, step: int) -> None:
    browser.run(f"(() => {{ const s = document.getElementById('step-{side}'); s.value = '{step}';"
                " s.dispatchEvent(new Event('change')); })()")


def _table(browser: _Browser, side: str) -> dict[tuple[int, int], str]:
    cells = browser.run(f"Array.from(document.querySelectorAll('#compare-view table[data-side=\"{side}\"] "
                        "td[data-column]')).map((td) => [td.dataset.row, td.dataset.column, td.textContent])")
    return {(int(i), int(j)): text for i, j, text in cells if text}  # an undefined score is an empty cell


def _number(text: str) -> float:
    return float(text.replace("−", "-"))


def _grid(logged: Logged, step: int, probe: str) -> list[list[float]]:
    result = next(r for r in logged.reports[step].results if r.probe.name == probe)
    return build_grid(result.aggregated).scores


def _defined_cells(scores: list[list[float]]) -> dict[tuple[int, int], float]:
    return {(i, j): v for i, row in enumerate(scores) for j, v in enumerate(row) if not math.isnan(v)}  # NaN: not drawn


def test_the_view_shows_both_maps_and_b_minus_a_as_the_passes_computed_them(logged, browser):
    _open_compare(browser, logged, "cat")
    _pick(browser, "a", 2)
    browser.wait_for(f"{VIEW}.dataset.shown === '2|4'")
    a, b = _grid(logged, 2, "cat"), _grid(logged, 4, "cat")
    shown_a, shown_b, shown_diff = _table(browser, "a"), _table(browser, "b"), _table(browser, "difference")
    expected_a, expected_b = _defined_cells(a), _defined_cells(b)
    assert set(shown_a) == set(expected_a) == set(shown_b) == set(shown_diff)
    for cell, value in expected_a.items():
        assert _number(shown_a[cell]) == pytest.approx(value, abs=5e-4 + 1e-9)
        assert _number(shown_b[cell]) == pytest.approx(expected_b[cell], abs=5e-4 + 1e-9)
        assert _number(shown_diff[cell]) == pytest.approx(expected_b[cell] - value, abs=5e-4 + 1e-9)
    assert max(abs(expected_b[c] - expected_a[c]) for c in expected_a) > 0.01  # training moved the map


def test_the_tokens_that_gained_and_lost_most_are_the_rows_whose_sum_moved_most(logged, browser):
    _open_compare(browser, logged, "cat")
    a, b = _defined_cells(_grid(logged, 0, "cat")), _defined_cells(_grid(logged, 4, "cat"))
    change: dict[int, float] = {}
    for (i, j), value in a.items():
        change[i] = change.get(i, 0.0) + b[(i, j)] - value
    for list_id, sign in (("gained", 1), ("lost", -1)):
        items = browser.run(f"Array.from(document.querySelectorAll('#{list_id} li'))"
                            ".map((li) => [li.dataset.row, li.dataset.change])")
        expected = sorted((i for i in change if sign * change[i] > 0), key=lambda i: -sign * change[i])[:5]
        assert [int(row) for row, _ in items] == expected
        assert [float(c) for _, c in items] == pytest.approx([change[i] for i in expected], abs=1e-6)
    limit = max(abs(b[cell] - value) for cell, value in a.items())
    assert f"+{limit:.3f}" in browser.run("document.getElementById('difference-legend').innerText")


def test_the_curves_and_values_are_the_logged_scalars_and_a_click_opens_a_step(logged, browser):
    _open_compare(browser, logged, "cat")
    for name in ("drift_ref/cosine", "drift_prev/js_divergence", "comprehensiveness", "sufficiency_vs_random"):
        points = browser.run(f"Array.from(document.querySelectorAll('svg[data-name=\"{name}\"] circle'))"
                             ".map((c) => [c.dataset.step, c.dataset.value])")
        logged_values = logged.scalars[f"{PREFIX}/cat/{name}"]
        assert {int(s): float(v) for s, v in points} == pytest.approx(logged_values, abs=1e-6), name
    rows = browser.run("Array.from(document.querySelectorAll('#compare-values tr[data-name]'))"
                       ".map((tr) => [tr.dataset.name, ...Array.from(tr.querySelectorAll('td'), (td) => td.textContent)])")
    by_name = {name: cells for name, *cells in rows}
    assert {"drift_ref/cosine", "drift_prev/spearman", "comprehensiveness", "soft_sufficiency"} <= set(by_name)
    for name, (at_a, at_b, change) in by_name.items():
        values = logged.scalars[f"{PREFIX}/cat/{name}"]
        assert _number(at_b) == pytest.approx(values[4], abs=5e-5 + 1e-6)
        if 0 in values:  # drift against the reference is undefined at the reference itself
            assert _number(at_a) == pytest.approx(values[0], abs=5e-5 + 1e-6)
            assert _number(change) == pytest.approx(values[4] - values[0], abs=1e-4 + 1e-6)
        else:
            assert at_a == change == "–"
    browser.run("document.querySelector('svg[data-name=\"drift_ref/cosine\"] circle[data-step=\"2\"]')"
                ".dispatchEvent(new MouseEvent('click', {bubbles: true}))")
    browser.wait_for(f"{VIEW}.dataset.shown === '0|2'")
    assert browser.run("document.getElementById('step-b').value") == "2"
    shown_b = _table(browser, "b")
    for cell, value in _defined_cells(_grid(logged, 2, "cat")).items():
        assert _number(shown_b[cell]) == pytest.approx(value, abs=5e-4 + 1e-9)


def test_a_probe_written_as_markup_renders_as_text(logged, browser):
    _open_compare(browser, logged, "img")
    labels = browser.run("Array.from(document.querySelectorAll('#compare-view table[data-side=\"a\"] th[data-row]'),"
                         " (th) => th.textContent).join('')")
    assert HOSTILE in labels
    assert browser.run("document.querySelectorAll('img').length") == 0
    assert browser.run("window.alerted") is False


def test_maps_of_different_tokens_are_not_subtracted_and_the_page_says_why(logged, browser):
    browser.open(logged.base + "/data/plugin_entry.html?name=inseq_lightning")
    browser.wait_for("document.getElementById('attribution-page')?.innerText.includes('step 4')")
    browser.run("document.getElementById('mode-compare').click()")
    browser.run("(() => { const s = document.querySelectorAll('select')[0]; s.value = 'swap';"
                " s.dispatchEvent(new Event('change')); })()")
    why = browser.wait_for("document.getElementById('compare-mismatch')?.innerText")
    assert why.startswith("The two maps have different context tokens (rows)") and "step 0" in why
    assert browser.run(f"{VIEW}.dataset.shown") == "0|1"
    assert browser.run(f"{VIEW}.querySelectorAll('table[data-side=\"difference\"]').length") == 0
    assert browser.run(f"{VIEW}.querySelectorAll('table[data-side=\"b\"]').length") == 1  # both maps still shown


def test_screenshot_of_the_compare_view(logged, browser, tmp_path):
    _open_compare(browser, logged, "cat")
    folder = Path(os.environ.get("INSEQ_LIGHTNING_SCREENSHOTS") or tmp_path)
    browser.resize(1280, 900)  # the layout the screenshots have
    curves_top = browser.run("(() => { const h = Array.from(document.querySelectorAll('#compare-view h4'))"
                             ".find((e) => e.textContent.startsWith('Drift per step'));"
                             " return h.getBoundingClientRect().top + window.scrollY - 16; })()")
    for name, top, bottom in (("tensorboard_compare_view.png", 0, curves_top),
                              ("tensorboard_compare_curves.png", curves_top, None)):
        data = browser.screenshot(folder / name, top, bottom)
        assert data.startswith(b"\x89PNG") and len(data) > 20_000, name


def test_the_json_routes_only_answer_for_indexed_probes_and_steps(logged):
    def get(query: str) -> tuple[int, str]:
        status, body, headers = _get(logged.base + ROUTES + query)
        assert headers["X-Content-Type-Options"] == "nosniff"
        return status, body

    status, body = get(f"/compare?run=run&prefix={PREFIX}&probe=cat&a=0&b=4")
    assert status == 200 and json.loads(body)["b"]["step"] == 4
    status, body = get(f"/curves?run=run&prefix={PREFIX}&probe=cat")
    assert status == 200 and json.loads(body)["steps"] == list(STEPS)
    for query in (f"/compare?run=run&prefix={PREFIX}&probe=cat&a=0&b=3",  # no pass at step 3
                  f"/compare?run=run&prefix={PREFIX}&probe=cat&a=0&b=4.0",
                  f"/compare?run=run&prefix={PREFIX}&probe=../cat&a=0&b=4",
                  f"/compare?run=nope&prefix={PREFIX}&probe=cat&a=0&b=4",
                  "/compare?run=run&prefix=attribution/other&probe=cat&a=0&b=4",
                  f"/curves?run=run&prefix={PREFIX}&probe=dog", "/curves?run=../run"):
        assert get(query)[0] == 404, query
