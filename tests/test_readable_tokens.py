"""Token labels people can read: byte-level tokens shown as the characters they encode, in every view.

GPT-2's byte-level BPE stores each UTF-8 byte as a printable stand-in: the tiny tokenizer splits "🎉"
into the four tokens ``ð Ł İ ī`` and "é" into ``Ã ©``. Views show "🎉" and "é" on the first token of
each character and a faint "+" on the others; the outputs keep the raw tokens.
"""

import numpy as np
import pytest
import torch
from rich.console import Console

import inseq_lightning as il
from inseq_lightning.data import FeatureAttributionOutput, FeatureAttributionSequenceOutput, TokenWithId
from inseq_lightning.monitor import Probe, ProbeMonitor
from inseq_lightning.sinks.render import markdown_table, markdown_token
from inseq_lightning.tiny_models import metaspace_tokenizer, wordpiece_tokenizer
from inseq_lightning.viz.console import sequence_table
from inseq_lightning.viz.figure import attribution_figure
from inseq_lightning.viz.heatmap import CELL_HEIGHT, attribution_heatmap
from inseq_lightning.viz.layout import build_grid
from inseq_lightning.viz.tokens import CONTINUATION, readable_labels

PROMPT, TARGET = "Party 🎉 café", "Party 🎉 café 🎉 café"
RAW = ["Par", "t", "y", "Ġ", "ð", "Ł", "İ", "ī", "Ġc", "a", "f", "Ã", "©"]  # the prompt, as the tokenizer splits it
READABLE = ["Par", "t", "y", " ", "🎉", "+", "+", "+", " c", "a", "f", "é", "+"]
STAND_INS = ["ð", "Ł", "İ", "ī", "Ã", "©"]


@pytest.fixture(scope="module")
def party(hf_models) -> FeatureAttributionOutput:
    model, tok = hf_models["gpt2"]
    return il.load_model(model, "saliency", tokenizer=tok).attribute(PROMPT, TARGET, step_scores=["probability"],
                                                                     show_progress=False)


def _sequence(tokens: list[str], start: int) -> FeatureAttributionSequenceOutput:
    """A decoder-only output over ``tokens`` whose continuation begins at ``start``."""
    target = [TokenWithId(t, i) for i, t in enumerate(tokens)]
    return FeatureAttributionSequenceOutput(
        source=target[:start], target=target, target_attributions=torch.rand(len(tokens), len(tokens) - start),
        attr_pos_start=start, granularity="coarse")


def test_the_tokenizer_splits_the_characters_into_byte_tokens(party):
    assert [t.token for t in party[0].source] == RAW


def test_byte_level_tokens_are_labelled_with_the_characters_they_encode():
    assert readable_labels(RAW) == READABLE
    assert CONTINUATION == "+"


def test_the_grid_decodes_the_whole_sequence_and_flags_continuations(party):
    grid = build_grid(party[0])
    assert grid.row_labels == READABLE + READABLE[3:]
    assert grid.column_labels == READABLE[3:]
    assert grid.column_continues == [False, False, True, True, True, False, False, False, False, True]
    assert grid.row_continues == [label == "+" for label in grid.row_labels]


def test_html_shows_the_characters(party):
    html = il.show_attributions(party, display=False, return_html=True)
    assert html.count("🎉") == html.count("é") == 3  # two rows, one column
    assert not any(ch in html for ch in STAND_INS)
    assert html.count(";color:#aaa;") == html.count(">+</th>") == 8 + 4  # the continuations, faint


def test_markdown_shows_the_characters(hf_models):
    model, tok = hf_models["gpt2"]
    result = ProbeMonitor([Probe(PROMPT, " 🎉 café")]).run(model, tok, 0).results[0]
    table = markdown_table(result, 0)
    header = table.splitlines()[2]
    assert header == "| token | ␣ | 🎉 | *\\+* | *\\+* | *\\+* | ␣c | a | f | é | *\\+* |"
    rows = [line.split(" | ")[0] for line in table.splitlines()[4:]]
    assert rows[:13] == ["| Par", "| t", "| y", "| ␣", "| 🎉", "| *\\+*", "| *\\+*", "| *\\+*", "| ␣c", "| a", "| f",
                         "| é", "| *\\+*"]
    assert not any(ch in table for ch in STAND_INS)


def test_markdown_token_decodes_a_token_on_its_own():
    assert markdown_token("ĠcafÃ©") == "␣café"
    assert markdown_token("Ġthe") == "␣the" and markdown_token("▁the") == "␣the"


def test_console_shows_the_characters(party):
    console = Console(record=True, width=200)
    console.print(sequence_table(party[0]))
    text = console.export_text()
    assert "🎉" in text and "é" in text
    assert not any(ch in text for ch in STAND_INS)


def test_console_draws_continuations_dim(party):
    table = sequence_table(party[0])
    headers = [column.header for column in table.columns[1:]]
    assert [h.plain for h in headers] == READABLE[3:]
    assert [h.style == "dim" for h in headers] == build_grid(party[0]).column_continues


def test_figure_ticks_show_the_characters(party):
    ax = attribution_figure(party[0]).axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == READABLE[3:]
    assert [t.get_text() for t in ax.get_yticklabels()] == READABLE + READABLE[3:]


def test_heatmap_draws_accented_letters():
    """The bitmap font draws Latin-1: "é" decoded from ``Ã ©`` is drawn as a real "é" is."""
    def row_label(tokens: list[str], row: int) -> np.ndarray:
        heatmap = attribution_heatmap(_sequence(tokens, 3))
        top, left = heatmap.grid_origin
        return heatmap.pixels[top + row * CELL_HEIGHT : top + (row + 1) * CELL_HEIGHT, :left]

    decoded = row_label(["Ġcaf", "Ã", "©", "Ġx", "Ġy"], 1)
    assert np.array_equal(decoded, row_label([" caf", "é", "x", "y", "z"], 1))
    assert not np.array_equal(decoded, row_label([" caf", "Ã", "x", "y", "z"], 1))


def test_a_character_split_across_the_prompt_end_is_shown_on_the_prompt_token():
    grid = build_grid(_sequence(["Ġcaf", "Ã", "©", "Ġis", "Ġopen"], 2))
    assert grid.row_labels[:3] == [" caf", "é", "+"]
    assert grid.column_labels == ["+", " is", " open"] and grid.column_continues == [True, False, False]


def test_special_tokens_stay_as_they_are():
    tokens = ["<|endoftext|>", "Ġcaf", "Ã", "©", "</s>", "<s>"]
    assert readable_labels(tokens) == ["<|endoftext|>", " caf", "é", "+", "</s>", "<s>"]


def test_bytes_that_are_not_utf8_are_shown_as_escapes():
    assert readable_labels(["Ġcaf", "Ã"]) == [" caf", "\\xc3"]  # generation stopped inside "é"
    assert readable_labels(["Ġa", "Ã", "Ġb"]) == [" a", "\\xc3", " b"]
    assert readable_labels(["Ċ", "ĉ", "č"]) == ["\\n", "\\t", "\\r"]


@pytest.mark.parametrize("tokenizer", [metaspace_tokenizer, wordpiece_tokenizer])
def test_other_tokenizers_keep_their_tokens_with_spaces_shown(tokenizer):
    tok = tokenizer()
    tokens = tok.convert_ids_to_tokens(tok(f"{TARGET} déjà vu")["input_ids"])
    assert any("##" in t or "▁" in t for t in tokens)
    assert readable_labels(tokens) == [t.replace("▁", " ") for t in tokens]


def test_plain_latin1_tokens_are_not_read_as_bytes():
    assert readable_labels(["caf", "é", "Ã", "©", "¿"]) == ["caf", "é", "Ã", "©", "¿"]


def test_outputs_and_saved_files_keep_the_raw_tokens(party, tmp_path):
    party.show(display=False, return_html=True)
    assert [t.token for t in party[0].target] == RAW + RAW[3:]
    party.save(tmp_path / "party.json")
    loaded = FeatureAttributionOutput.load(tmp_path / "party.json")
    assert [t.token for t in loaded[0].target] == RAW + RAW[3:]
