"""The Attributions tab: a real TensorBoard server loads the plugin from its entry point, serves the
pages two monitors wrote on one run (and nothing else) with the headers TensorBoard requires, and
headless Chromium renders both monitors' pages from the plugin's own frontend module."""

import contextlib
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import NamedTuple

import pytest
from torch.utils.tensorboard import SummaryWriter

from inseq_lightning.monitor import Probe, ProbeMonitor
from inseq_lightning.sinks import TensorBoardSink

pytestmark = pytest.mark.timeout(300)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ROUTES = "/data/plugin/inseq_lightning"
SECURITY_WARNING = "In 3.0, this warning will become an error"  # TensorBoard's security validator
METHODS = ("saliency", "input_x_gradient")


class Server(NamedTuple):
    base: str
    log: Path  # the server's stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> tuple[int, str, dict[str, str]]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode(), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(), dict(error.headers)


@contextlib.contextmanager
def tensorboard_server(logdir: Path, log: Path):
    """A real ``tensorboard --logdir`` on a free local port, stderr in ``log``; yields its base URL once
    it lists this plugin, and stops it on exit."""
    port = _free_port()
    tensorboard = shutil.which("tensorboard", path=str(Path(sys.executable).parent))
    with log.open("w") as stderr:
        process = subprocess.Popen([tensorboard, "--logdir", str(logdir), "--port", str(port), "--host", "127.0.0.1"],
                                   stdout=subprocess.DEVNULL, stderr=stderr)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                if "inseq_lightning" in json.loads(_get(base + "/data/plugins_listing")[1]):
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.5)
        else:
            pytest.fail("TensorBoard did not list the inseq_lightning plugin within 60 s")
        yield base
    finally:
        process.terminate()
        process.wait(timeout=30)


def _csp(headers: dict[str, str]) -> dict[str, str]:
    policy = {k.lower(): v for k, v in headers.items()}.get("content-security-policy", "")
    return dict(d.strip().split(" ", 1) for d in policy.split(";") if d.strip())


@pytest.fixture(scope="module")
def server(hf_models, tmp_path_factory):
    logdir = tmp_path_factory.mktemp("logs")
    model, tok = hf_models["gpt2"]
    probes = [Probe("the cat sat", " on the mat", name="cat"), Probe("<script>alert(1)</script>", " x", name="xss")]
    monitors = [ProbeMonitor(probes, method=method) for method in METHODS]  # two prefixes, one run
    writer = SummaryWriter(str(logdir / "run_a"))
    sink = TensorBoardSink(writer, log_figures=False)
    for step in (0, 3):
        for monitor in monitors:
            monitor.run(model, tok, step, sinks=[sink])
    writer.close()
    (logdir / "run_a" / "secret.txt").write_text("not for the browser")
    log = logdir.parent / "tensorboard.log"
    with tensorboard_server(logdir, log) as base:
        yield Server(base, log)


def test_tab_is_registered_and_lists_both_monitors_pages(server):
    listing = json.loads(_get(server.base + "/data/plugins_listing")[1])["inseq_lightning"]
    assert listing["tab_name"] == "Attributions" and listing["enabled"]
    pages = json.loads(_get(server.base + ROUTES + "/pages")[1])["run_a"]
    assert [(p["prefix"], p["probe"], p["step"], p["path"]) for p in pages] == [
        (f"attribution/{method}", probe, step, f"attribution_{method}/step_{step}/{probe}.html")
        for method in sorted(METHODS) for probe in ("cat", "xss") for step in (0, 3)]


def test_each_monitor_page_is_served_from_its_own_file(server):
    pages = json.loads(_get(server.base + ROUTES + "/pages")[1])["run_a"]
    for page in pages:
        status, body, _ = _get(server.base + ROUTES + f"/page?run=run_a&path={page['path']}")
        assert status == 200 and f"{page['probe']} · {page['method']} · step {page['step']}" in body


def test_only_indexed_pages_are_served(server):
    status, body, _ = _get(server.base + ROUTES + "/page?run=run_a&path=attribution_saliency/step_3/cat.html")
    assert status == 200 and "cat · saliency · step 3" in body
    for query in ("run=run_a&path=../secret.txt", "run=run_a&path=attribution_saliency/step_3/../../../secret.txt",
                  "run=run_a&path=/etc/passwd", "run=run_a&path=step_3/cat.html",
                  "run=nope&path=attribution_saliency/step_3/cat.html", "run=run_a"):
        assert _get(server.base + ROUTES + "/page?" + query)[0] == 404, query


@pytest.mark.parametrize("route", ["/index.js", "/pages", "/page?run=run_a&path=attribution_saliency/step_3/cat.html",
                                   "/page?run=run_a&path=../secret.txt", "/page?run=nope"])
def test_every_route_sends_nosniff_and_html_a_content_security_policy(server, route):
    status, _, headers = _get(server.base + ROUTES + route)
    assert headers["X-Content-Type-Options"] == "nosniff"
    if headers["Content-Type"].startswith("text/html"):
        assert status == 200 and _csp(headers)["default-src"] == "'self'"
    else:
        assert "Content-Security-Policy" not in headers


class _DevTools:
    """Headless Chromium driven over the DevTools protocol on a pipe (fd 3 in, fd 4 out): stdlib only."""

    def __init__(self, profile: Path):
        commands_in, self._commands = os.pipe()
        self._replies, replies_out = os.pipe()
        args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--no-first-run", f"--user-data-dir={profile}",
                "--remote-debugging-pipe", "about:blank"]
        # bash, not sh: dash redirects single-digit descriptors only
        self.process = subprocess.Popen(["bash", "-c", f'exec "$@" 3<&{commands_in} 4>&{replies_out}', "bash", *args],
                                        pass_fds=(commands_in, replies_out), stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        os.close(commands_in)
        os.close(replies_out)
        self._buffer, self._id, self.events, self._session = b"", 0, [], None

    def open(self, url: str) -> None:
        target = self._send("Target.createTarget", url="about:blank")["targetId"]
        self._session = self._send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self._send("Network.enable")
        self._send("Page.navigate", url=url)

    def wait_for(self, expression: str, timeout: float = 60):
        """The first truthy value of ``expression`` (JavaScript), polled in the page."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self._send("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")
            if value:
                return value
            time.sleep(0.2)
        raise AssertionError(f"the page never satisfied: {expression}")

    def responses(self) -> dict[str, dict[str, str]]:
        """``{url: headers}`` of every response the page received."""
        return {e["params"]["response"]["url"]: e["params"]["response"]["headers"]
                for e in self.events if e.get("method") == "Network.responseReceived"}

    def close(self) -> None:
        os.close(self._commands)
        self.process.terminate()
        self.process.wait(timeout=30)
        os.close(self._replies)

    def _send(self, method: str, **params) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if self._session:
            message["sessionId"] = self._session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._receive()
            if reply.get("id") != self._id:
                self.events.append(reply)
            elif "error" in reply:
                raise AssertionError(f"{method}: {reply['error']}")
            else:
                return reply["result"]

    def _receive(self) -> dict:
        while b"\0" not in self._buffer:
            if not select.select([self._replies], [], [], 60)[0]:
                raise TimeoutError("Chromium sent nothing for 60 s")
            chunk = os.read(self._replies, 1 << 16)
            if not chunk:
                raise EOFError("Chromium closed the DevTools pipe")
            self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        return json.loads(message)


@pytest.fixture()
def browser(tmp_path):
    assert CHROMIUM, "headless Chromium is needed: apt-get install chromium (make test does it when run as root)"
    devtools = _DevTools(tmp_path)
    yield devtools
    devtools.close()


PAGE = "document.getElementById('attribution-page')"
PROBE_SELECT = "document.querySelectorAll('select')[1]"


def _pick_probe(browser: _DevTools, value: str) -> None:
    browser.wait_for(f"(() => {{ const s = {PROBE_SELECT}; s.value = {json.dumps(value)};"
                     " s.dispatchEvent(new Event('change')); return s.value; })()")


def test_browser_lists_and_renders_both_monitors_pages(server, browser):
    browser.open(server.base + "/data/plugin_entry.html?name=inseq_lightning")
    browser.wait_for(f"{PAGE}?.innerText.includes('step 3')")
    options = browser.wait_for(f"Array.from({PROBE_SELECT}.options).map((o) => [o.value, o.text])")
    assert options == [[f"attribution/{method}|{probe}", f"{probe} (attribution/{method})"]
                       for method in sorted(METHODS) for probe in ("cat", "xss")]
    assert "cat · input_x_gradient · step 3" in browser.wait_for(f"{PAGE}.innerText")  # first probe, newest step
    _pick_probe(browser, "attribution/saliency|cat")
    html = browser.wait_for(f"{PAGE}.innerText.includes('cat · saliency · step 3') && {PAGE}.innerHTML")
    assert "<table" in html and "background:rgb" in html.replace(" ", "")  # the colours survive (no sanitizer)
    _pick_probe(browser, "attribution/saliency|xss")
    html = browser.wait_for(f"{PAGE}.innerText.includes('xss · saliency · step 3') && {PAGE}.innerHTML")
    assert "<script" not in html  # the prompt's markup arrives as text


def test_browser_receives_tensorboards_security_headers_and_the_server_logs_no_warning(server, browser):
    browser.open(server.base + "/data/plugin_entry.html?name=inseq_lightning")
    browser.wait_for(f"{PAGE}?.innerText.includes('step 3')")
    ours = {url.split(ROUTES, 1)[1].split("?")[0]: {k.lower(): v for k, v in headers.items()}
            for url, headers in browser.responses().items() if ROUTES in url}
    assert sorted(ours) == ["/index.js", "/page", "/pages"]
    assert {route: h["x-content-type-options"] for route, h in ours.items()} == dict.fromkeys(ours, "nosniff")
    assert _csp(ours["/page"])["default-src"] == "'self'"
    assert SECURITY_WARNING not in server.log.read_text()
