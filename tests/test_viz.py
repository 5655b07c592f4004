"""Views: HTML that renders tokens as text, a console table, and a heatmap figure."""

from html.parser import HTMLParser

import pytest
import torch

import inseq_lightning as il
from inseq_lightning.data import FeatureAttributionSequenceOutput, TokenWithId
from inseq_lightning.viz.figure import attribution_figure


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.text, self.attrs = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs.extend(attrs)

    def handle_data(self, data):
        self.text.append(data)


NASTY = ["<script>alert(1)</script>", '"', "<img src=x onerror=alert(2)>", "&amp;", "'"]


@pytest.fixture()
def nasty_output():
    n = len(NASTY)
    target = [TokenWithId(t, i) for i, t in enumerate(NASTY)]
    scores = torch.rand(n, n - 2)
    scores[torch.arange(n)[:, None] >= torch.arange(2, n)[None, :]] = float("nan")
    return FeatureAttributionSequenceOutput(
        source=target[:2], target=target, target_attributions=scores, step_scores={"probability": torch.rand(n - 2)},
        attr_pos_start=2, attr_pos_end=n, granularity="coarse")


def test_html_renders_hostile_tokens_as_text(nasty_output):
    html = il.show_attributions(nasty_output, display=False, return_html=True)
    parser = _Collector()
    parser.feed(html)
    assert "script" not in parser.tags and "img" not in parser.tags
    assert not any(name.startswith("on") for name, _ in parser.attrs)
    text = "".join(parser.text)
    for token in NASTY:
        assert token in text, token


def test_html_is_self_contained(hf_models):
    model, tok = hf_models["marian"]
    out = il.load_model(model, "saliency", tokenizer=tok).attribute("Hello world", "Le chat", step_scores=["probability"],
                                                                     show_progress=False)
    html = out.show(display=False, return_html=True)
    parser = _Collector()
    parser.feed(html)
    assert "script" not in parser.tags and "link" not in parser.tags
    assert "Source" in "".join(parser.text) and "probability" in "".join(parser.text)
    assert html.count("<table") == 1


def test_console_view_prints_tokens_and_scores(hf_models, capsys):
    model, tok = hf_models["gpt2"]
    out = il.load_model(model, "saliency", tokenizer=tok).attribute("Hello world", "Hello world, this",
                                                                     step_scores=["probability"], show_progress=False)
    assert il.show_attributions(out) is None
    printed = capsys.readouterr().out
    assert "Hell" in printed and "probability" in printed


def test_heatmap_figure_has_one_cell_per_token_and_step(nasty_output):
    fig = attribution_figure(nasty_output, title="probe")
    ax = fig.axes[0]
    image = ax.get_images()[0]
    assert image.get_array().shape == (len(NASTY), len(NASTY) - 2)
    assert [t.get_text() for t in ax.get_xticklabels()] == NASTY[2:]


def test_heatmaps_leave_pyplot_and_the_matplotlib_backend_alone(tmp_path):
    """A notebook or script that plots with pyplot must keep its backend and its figure list."""
    import subprocess
    import sys

    script = (
        "import matplotlib\n"
        "before = matplotlib.get_backend()\n"
        "import matplotlib.pyplot as plt\n"
        "import inseq_lightning as il\n"
        "from inseq_lightning.tiny_models import tiny_gpt2\n"
        "from inseq_lightning.viz.figure import attribution_figure, figure_to_rgb\n"
        "model, tok = tiny_gpt2()\n"
        "out = il.load_model(model, 'saliency', tokenizer=tok).attribute('Hello', 'Hello world', show_progress=False)\n"
        "pixels = figure_to_rgb(attribution_figure(out[0].aggregate()))\n"
        "assert pixels.ndim == 3 and pixels.shape[2] == 3 and pixels.std() > 0, pixels.shape\n"
        "assert plt.get_fignums() == [], plt.get_fignums()\n"
        "assert matplotlib.get_backend() == before, (before, matplotlib.get_backend())\n"
        "print('backend', before)\n"
    )
    env = {**__import__("os").environ, "MPLBACKEND": "svg"}  # any non-Agg backend a user may have chosen
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=False,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "backend svg" in done.stdout


def test_negative_scores_are_blue_and_positive_red_with_the_same_intensity():
    from inseq_lightning.viz.colors import rgb

    assert rgb(0.5, -1.0, 1.0) == (255, 128, 128)
    assert rgb(-0.5, -1.0, 1.0) == (128, 128, 255)  # was drawn red, like +0.5
    assert rgb(-1.0, -1.0, 2.0) == (0, 0, 255) and rgb(0.0, -1.0, 1.0) == (255, 255, 255)
