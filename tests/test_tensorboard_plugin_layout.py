"""Where the TensorBoard sink puts the Attributions tab's pages, and how the plugin serves them:
each monitor (report prefix) has its own folder, older indexes stay readable, and every response
carries the headers TensorBoard requires. The plugin is driven through werkzeug's test client."""

import json

import pytest
from tensorboard.backend import security_validator
from tensorboard.plugins import base_plugin
from werkzeug.test import Client

from inseq_lightning.monitor.report import MonitorReport
from inseq_lightning.sinks import write_plugin_html
from inseq_lightning.tensorboard_plugin import AttributionsPlugin


def _report(step: int, method: str, prefix: str | None = None) -> MonitorReport:
    return MonitorReport(step=step, epoch=None, stage="fit", method=method, prefix=prefix or f"attribution/{method}",
                         results=[])


def _page(report: MonitorReport, probe: str) -> str:
    return f"<!DOCTYPE html><html><body><h3>{probe} · {report.prefix} · step {report.step}</h3></body></html>"


def _log(run_dir, report: MonitorReport, probes=("cat",)) -> None:
    write_plugin_html(run_dir, report, {probe: _page(report, probe) for probe in probes})


@pytest.fixture()
def plugin(tmp_path, monkeypatch):
    """The plugin over ``tmp_path``; TensorBoard's own security validator fails the test on any warning."""
    def fail(message):
        raise AssertionError(message)

    monkeypatch.setattr(security_validator, "_maybe_raise_value_error", fail)
    plugin = AttributionsPlugin(base_plugin.TBContext(logdir=str(tmp_path)))

    def get(route: str, **query):
        app = security_validator.SecurityValidatorMiddleware(plugin.get_plugin_apps()[route])
        return Client(app).get(route, query_string=query)

    return get


def test_two_monitors_write_their_pages_to_different_folders(tmp_path):
    for method in ("saliency", "input_x_gradient"):
        _log(tmp_path / "run", _report(3, method))
    index = json.loads((tmp_path / "run" / "plugins" / "inseq_lightning" / "index.json").read_text())
    assert [(p["prefix"], p["path"]) for p in index["pages"]] == [
        ("attribution/saliency", "attribution_saliency/step_3/cat.html"),
        ("attribution/input_x_gradient", "attribution_input_x_gradient/step_3/cat.html"),
    ]
    root = tmp_path / "run" / "plugins" / "inseq_lightning"
    assert "cat · attribution/saliency · step 3" in (root / "attribution_saliency/step_3/cat.html").read_text()


def test_each_prefix_is_served_its_own_page(tmp_path, plugin):
    for step in (0, 3):
        for method in ("saliency", "input_x_gradient"):
            _log(tmp_path / "run", _report(step, method))
    listing = json.loads(plugin("/pages").get_data(as_text=True))["run"]
    assert [(p["prefix"], p["step"]) for p in listing] == [
        ("attribution/input_x_gradient", 0), ("attribution/input_x_gradient", 3),
        ("attribution/saliency", 0), ("attribution/saliency", 3)]
    for entry in listing:
        body = plugin("/page", run="run", path=entry["path"]).get_data(as_text=True)
        assert f"cat · {entry['prefix']} · step {entry['step']}" in body


def test_prefixes_that_become_the_same_folder_do_not_share_files(tmp_path, plugin):
    _log(tmp_path / "run", _report(3, "saliency", prefix="attribution_saliency"))
    _log(tmp_path / "run", _report(3, "saliency", prefix="attribution/saliency"))
    _log(tmp_path / "run", _report(4, "saliency", prefix="attribution_saliency"))  # keeps its folder
    listing = json.loads(plugin("/pages").get_data(as_text=True))["run"]
    paths = {(p["prefix"], p["step"]): p["path"] for p in listing}
    assert paths[("attribution_saliency", 3)] == "attribution_saliency/step_3/cat.html"
    assert paths[("attribution_saliency", 4)] == "attribution_saliency/step_4/cat.html"
    assert paths[("attribution/saliency", 3)].startswith("attribution_saliency-")
    for (prefix, step), path in paths.items():
        assert f"cat · {prefix} · step {step}" in plugin("/page", run="run", path=path).get_data(as_text=True)


def test_an_index_of_the_older_layout_stays_readable_and_is_extended(tmp_path, plugin):
    root = tmp_path / "run" / "plugins" / "inseq_lightning"
    (root / "step_0").mkdir(parents=True)
    (root / "step_0" / "cat.html").write_text("<p>cat · old layout · step 0</p>")
    (root / "step_0" / "dog.html").write_text("<p>dog · older layout · step 0</p>")
    (root / "index.json").write_text(json.dumps({"pages": [
        {"step": 0, "probe": "cat", "prefix": "attribution/saliency", "method": "saliency", "path": "step_0/cat.html"},
        {"step": 0, "probe": "dog", "path": "step_0/dog.html"},  # an entry without prefix or method
    ]}))
    _log(tmp_path / "run", _report(3, "saliency"))
    listing = json.loads(plugin("/pages").get_data(as_text=True))["run"]
    assert [(p["prefix"], p["probe"], p["step"], p["path"]) for p in listing] == [
        ("", "dog", 0, "step_0/dog.html"),
        ("attribution/saliency", "cat", 0, "step_0/cat.html"),
        ("attribution/saliency", "cat", 3, "attribution_saliency/step_3/cat.html"),
    ]
    assert "cat · old layout" in plugin("/page", run="run", path="step_0/cat.html").get_data(as_text=True)
    assert "dog · older layout" in plugin("/page", run="run", path="step_0/dog.html").get_data(as_text=True)


def test_relogging_a_step_of_the_older_layout_points_the_entry_at_the_new_page(tmp_path, plugin):
    root = tmp_path / "run" / "plugins" / "inseq_lightning"
    (root / "step_3").mkdir(parents=True)
    (root / "step_3" / "cat.html").write_text("<p>stale</p>")
    (root / "index.json").write_text(json.dumps({"pages": [
        {"step": 3, "probe": "cat", "prefix": "attribution/saliency", "method": "saliency", "path": "step_3/cat.html"},
    ]}))
    _log(tmp_path / "run", _report(3, "saliency"))
    listing = json.loads(plugin("/pages").get_data(as_text=True))["run"]
    assert [p["path"] for p in listing] == ["attribution_saliency/step_3/cat.html"]


@pytest.mark.parametrize(("route", "query", "status", "content_type"), [
    ("/index.js", {}, 200, "text/javascript; charset=utf-8"),
    ("/pages", {}, 200, "application/json"),
    ("/page", {"run": "run", "path": "attribution_saliency/step_3/cat.html"}, 200, "text/html; charset=utf-8"),
    ("/page", {"run": "run", "path": "../index.json"}, 404, "text/plain; charset=utf-8"),
    ("/page", {"run": "nope", "path": "attribution_saliency/step_3/cat.html"}, 404, "text/plain; charset=utf-8"),
])
def test_every_route_sends_the_headers_tensorboard_requires(tmp_path, plugin, route, query, status, content_type):
    _log(tmp_path / "run", _report(3, "saliency"))
    response = plugin(route, **query)
    assert response.status_code == status
    assert response.headers["Content-Type"] == content_type
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Cache-Control"] == "no-cache, must-revalidate"
    csp = response.headers.get("Content-Security-Policy")
    if content_type.startswith("text/html"):
        directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
        assert directives["default-src"] == "'self'" and directives["object-src"] == "'none'"
        assert "'unsafe-inline'" not in directives["script-src"]  # the pages carry no scripts
    else:
        assert csp is None
