"""Outputs in a real Jupyter kernel (nbclient + ipykernel): a bare output, ``show()`` and the other views come
out as HTML, never as a console table or a dataclass repr."""

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]

SETUP = (
    "import warnings\nwarnings.filterwarnings('ignore')\n"
    "import inseq_lightning as il\n"
    "from inseq_lightning.tiny_models import tiny_gpt2, tiny_marian\n"
    "model, tok = tiny_gpt2()\n"
    "out = il.load_model(model, 'saliency', tokenizer=tok).attribute(\n"
    "    'Hello world', 'Hello world, this is', step_scores=['probability'], show_progress=False)\n"
    "marian, marian_tok = tiny_marian()\n"
    "attention = il.load_model(marian, 'attention', tokenizer=marian_tok).attribute(\n"
    "    'Hello world', 'Le chat', show_progress=False)"
)
CELLS = [
    SETUP,
    "out",  # a bare output
    "out[0]",  # a bare sequence output
    "out.show()",
    "out.show_tokens(step_score_highlight='probability')",
    "attention[0].show(do_aggregation=False)",  # granular panels
    "from inseq_lightning.viz import in_notebook\nprint(in_notebook())",
]


def _html(outputs: list) -> list[str]:
    return [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]


def _text(outputs: list) -> str:
    return "".join(o.get("text", "") for o in outputs if o["output_type"] == "stream")


@pytest.fixture(scope="module")
def executed():
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(source) for source in CELLS]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(ROOT)}})
    try:
        client.execute()
    except Exception as err:
        if "CellExecutionError" in type(err).__name__:
            raise
        # ipykernel and nbclient are in the test extra that `make test` installs: a kernel that cannot
        # start is a broken setup, never a pass.
        pytest.fail(f"no Jupyter kernel could run here ({type(err).__name__}: {err}); install the test extra")
    return nb


def test_a_bare_output_shows_its_heatmap(executed):
    for cell in executed.cells[1:3]:
        (result,) = [o for o in cell.outputs if o["output_type"] == "execute_result"]
        assert "<table" in result["data"]["text/html"]
        assert "Hell" in result["data"]["text/html"] and "probability" in result["data"]["text/html"]


def test_show_displays_html_and_prints_no_console_table(executed):
    for index in (3, 4, 5):
        cell = executed.cells[index]
        html = _html(cell.outputs)
        assert len(html) == 1, cell.source
        assert "\x1b[" not in _text(cell.outputs) and "┃" not in _text(cell.outputs), cell.source
    assert "<table" in _html(executed.cells[3].outputs)[0]
    assert "<details" in _html(executed.cells[4].outputs)[0]
    assert "Model Layer #0" in _html(executed.cells[5].outputs)[0]
    assert _text(executed.cells[6].outputs).strip() == "True"

