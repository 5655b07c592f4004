"""The Attributions tab: a real TensorBoard server loads the plugin from its entry point, serves the
pages the monitor wrote (and nothing else), and headless Chromium renders them from the plugin's
own frontend module."""

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from torch.utils.tensorboard import SummaryWriter

from inseq_lightning.monitor import Probe, ProbeMonitor
from inseq_lightning.sinks import TensorBoardSink

pytestmark = pytest.mark.timeout(300)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


@pytest.fixture(scope="module")
def server(hf_models, tmp_path_factory):
    logdir = tmp_path_factory.mktemp("logs")
    model, tok = hf_models["gpt2"]
    probes = [Probe("the cat sat", " on the mat", name="cat"), Probe("<script>alert(1)</script>", " x", name="xss")]
    monitor = ProbeMonitor(probes)
    writer = SummaryWriter(str(logdir / "run_a"))
    sink = TensorBoardSink(writer, log_figures=False)
    for step in (0, 3):
        monitor.run(model, tok, step, sinks=[sink])
    writer.close()
    (logdir / "run_a" / "secret.txt").write_text("not for the browser")
    port = _free_port()
    tensorboard = shutil.which("tensorboard", path=str(Path(sys.executable).parent))
    process = subprocess.Popen([tensorboard, "--logdir", str(logdir), "--port", str(port), "--host", "127.0.0.1"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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


def test_tab_is_registered_and_lists_the_pages(server):
    listing = json.loads(_get(server + "/data/plugins_listing")[1])["inseq_lightning"]
    assert listing["tab_name"] == "Attributions" and listing["enabled"]
    pages = json.loads(_get(server + "/data/plugin/inseq_lightning/pages")[1])
    assert [(p["probe"], p["step"]) for p in pages["run_a"]] == [("cat", 0), ("cat", 3), ("xss", 0), ("xss", 3)]


def test_only_indexed_pages_are_served(server):
    status, body = _get(server + "/data/plugin/inseq_lightning/page?run=run_a&path=step_3/cat.html")
    assert status == 200 and "cat · saliency · step 3" in body
    for query in ("run=run_a&path=../secret.txt", "run=run_a&path=step_3/../../secret.txt",
                  "run=run_a&path=/etc/passwd", "run=nope&path=step_3/cat.html", "run=run_a"):
        assert _get(server + "/data/plugin/inseq_lightning/page?" + query)[0] == 404, query


def test_browser_renders_the_newest_page_with_tokens_as_text(server, tmp_path):
    assert CHROMIUM, "headless Chromium is needed: apt-get install chromium (make test does it when run as root)"
    dom = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path}", "--virtual-time-budget=15000",
         "--dump-dom", server + "/data/plugin_entry.html?name=inseq_lightning"],
        capture_output=True, text=True, timeout=120, check=False).stdout
    assert 'id="attribution-page"' in dom
    assert "cat · saliency · step 3" in dom  # the first probe's newest step is shown
    assert "<table" in dom and "background:rgb" in dom.replace(" ", "")  # the colours survive (no sanitizer)
    assert '<option value="attribution/saliency|xss">xss (saliency)</option>' in dom
    assert "<script>alert" not in dom.split('id="attribution-page"')[1]
