"""Word aggregation (this library's ``"words"`` aggregator; inseq's ``"subwords"`` is tested in
tests/test_output_api.py): merged outputs keep rows, columns, labels and step scores consistent, also when a
word is cut by the prompt's end (a prompt token is context, never a step)."""

import math
import random

import pytest
import torch

import inseq_lightning as il
from inseq_lightning.data.outputs import FeatureAttributionSequenceOutput, TokenWithId
from inseq_lightning.tiny_models import CORPUS, metaspace_tokenizer, tiny_gpt2, tiny_llama, tiny_marian

WORD_START = ("▁", "Ġ", " ")
# Corpus words, with and without their punctuation: the tokenizers learned the former whole and cut the latter.
WORDS = sorted({w for line in CORPUS for word in line.split() for w in (word, word.strip(".,:?"))})


@pytest.fixture(scope="module")
def gpt2_model():
    model, tok = tiny_gpt2()
    return il.load_model(model, "saliency", tokenizer=tok)


@pytest.fixture(scope="module")
def metaspace_model():
    model, tok = tiny_llama(tokenizer=metaspace_tokenizer())
    return il.load_model(model, "saliency", tokenizer=tok)


# ---- expectations, computed here from the token strings alone ------------------------------------
def word_groups(tokens: list[str], cuts: tuple[int, ...] = ()) -> list[tuple[int, int]]:
    """``[start, end)`` of every merged token: a new one starts at a word-start marker or at a cut."""
    starts = [i for i, t in enumerate(tokens) if i == 0 or t.startswith(WORD_START) or i in cuts]
    return list(zip(starts, starts[1:] + [len(tokens)]))


def absmax_block(block: torch.Tensor) -> torch.Tensor:
    """The value of largest magnitude among the block's non-NaN cells (NaN when all are NaN)."""
    values = block[~block.isnan()]
    return values[values.abs().argmax()] if values.numel() else torch.tensor(float("nan"))


def expected_cells(scores: torch.Tensor, rows: list[tuple[int, int]], columns: list[tuple[int, int]]) -> torch.Tensor:
    return torch.stack([
        torch.stack([absmax_block(scores[r0:r1, c0:c1]) for c0, c1 in columns]) for r0, r1 in rows
    ])


def check_merged(seq: FeatureAttributionSequenceOutput, merged: FeatureAttributionSequenceOutput):
    """Every invariant of a subword-merged output, against expectations built from ``seq``."""
    tokens = [t.token for t in seq.target]
    start, end = seq.attr_pos_start, seq.attr_pos_end
    groups = word_groups(tokens, cuts=(start, end))
    labels = ["".join(tokens[a:b]) for a, b in groups]
    assert [t.token for t in merged.target] == labels
    assert merged.attr_pos_start == [a for a, _ in groups].index(start)
    assert merged.attr_pos_end == len([g for g in groups if g[1] <= end])
    columns = [(a - start, b - start) for a, b in groups if start <= a and b <= end]
    n_columns = merged.attr_pos_end - merged.attr_pos_start
    assert len(merged.generated) == n_columns == len(columns)
    assert [t.token for t in merged.generated] == labels[merged.attr_pos_start : merged.attr_pos_end]
    for name, values in merged.step_scores.items():
        assert values.shape == (n_columns,), name
    if "probability" in seq.step_scores:  # probabilities of a word's tokens multiply
        p = seq.step_scores["probability"]
        torch.testing.assert_close(merged.step_scores["probability"], torch.stack([p[a:b].prod() for a, b in columns]))
    if seq.target_attributions is not None:
        rows = [g for g in groups if g[1] <= seq.target_attributions.shape[0]]
        assert merged.target_attributions.shape == (len(rows), n_columns)
        torch.testing.assert_close(merged.target_attributions, expected_cells(seq.target_attributions, rows, columns),
                                   equal_nan=True)
        if seq.target_attributions.shape[0] == len(seq.target):
            assert merged.target_attributions.shape[0] == len(merged.target)
    if seq.source_attributions is None:  # decoder-only: the source is the prompt part of the target
        assert merged.source == merged.target[: merged.attr_pos_start]
    else:
        source_tokens = [t.token for t in seq.source]
        source_groups = word_groups(source_tokens)
        assert [t.token for t in merged.source] == ["".join(source_tokens[a:b]) for a, b in source_groups]
        assert merged.source_attributions.shape == (len(merged.source), n_columns)
        torch.testing.assert_close(merged.source_attributions,
                                   expected_cells(seq.source_attributions, source_groups, columns), equal_nan=True)


def prompt_is_token_prefix(tok, prompt: str, text: str) -> bool:
    p, f = tok(prompt)["input_ids"], tok(text)["input_ids"]
    return len(p) < len(f) and f[: len(p)] == p


# ---- a hand-computed example ---------------------------------------------------------------------
def test_word_cut_by_the_prompt_splits_into_a_context_row_and_a_step():
    nan = float("nan")
    target = [TokenWithId(t, i) for i, t in enumerate(["▁The", "▁ca", "t", "▁s", "at"])]
    scores = torch.tensor([  # columns: the steps predicting "t", "▁s", "at"
        [0.1, -0.2, 0.3],
        [0.4, 0.5, -0.6],
        [nan, 0.7, 0.1],
        [nan, nan, -0.8],
        [nan, nan, nan],
    ])
    seq = FeatureAttributionSequenceOutput(
        source=target[:2], target=target, target_attributions=scores,
        step_scores={"probability": torch.tensor([0.5, 0.2, 0.4])}, attr_pos_start=2, aggregated=True)
    merged = seq.aggregate("words")
    assert [t.token for t in merged.target] == ["▁The", "▁ca", "t", "▁sat"]
    assert [t.token for t in merged.source] == ["▁The", "▁ca"]
    assert (merged.attr_pos_start, merged.attr_pos_end) == (2, 4)
    assert [t.token for t in merged.generated] == ["t", "▁sat"]
    expected = torch.tensor([[0.1, 0.3], [0.4, -0.6], [nan, 0.7], [nan, -0.8]])  # absmax of each block
    torch.testing.assert_close(merged.target_attributions, expected, equal_nan=True)
    torch.testing.assert_close(merged.step_scores["probability"], torch.tensor([0.5, 0.08]))


def test_user_spans_crossing_attr_pos_start_are_split_there():
    target = [TokenWithId(t, i) for i, t in enumerate("abcdef")]
    seq = FeatureAttributionSequenceOutput(source=target[:3], target=target, target_attributions=torch.rand(6, 3),
                                           attr_pos_start=3, aggregated=True)
    merged = seq.aggregate("spans", target_spans=[(1, 5)])
    assert [t.token for t in merged.target] == ["a", "bc", "de", "f"]
    assert [t.token for t in merged.source] == ["a", "bc"]
    assert [t.token for t in merged.generated] == ["de", "f"]
    assert merged.target_attributions.shape == (4, 2)


def test_source_spans_on_a_decoder_only_output_are_refused():
    target = [TokenWithId(t, i) for i, t in enumerate("abcd")]
    seq = FeatureAttributionSequenceOutput(source=target[:2], target=target, target_attributions=torch.rand(4, 2),
                                           attr_pos_start=2, aggregated=True)
    with pytest.raises(ValueError, match="target_spans"):
        seq.aggregate("spans", source_spans=[(0, 2)])


# ---- real attributions ---------------------------------------------------------------------------
def test_word_cut_by_the_prompt_on_a_real_attribution(gpt2_model):
    prompt, text = "Paris is the capital of Fr", "Paris is the capital of France"
    tok = gpt2_model.tokenizer
    assert prompt_is_token_prefix(tok, prompt, text)
    seq = gpt2_model.attribute(prompt, text, step_scores=["probability"], show_progress=False)[0].aggregate()
    tokens = [t.token for t in seq.target]
    start = seq.attr_pos_start
    assert not tokens[start].startswith(WORD_START)  # "France" really is cut by the prompt's end
    merged = seq.aggregate("words")
    check_merged(seq, merged)
    word_start = max(i for i in range(start) if tokens[i].startswith(WORD_START))
    assert merged.source[-1].token == "".join(tokens[word_start:start])  # the prompt's piece of "France"
    assert [t.token for t in merged.generated] == ["".join(tokens[start:])]  # its continuation, one step


@pytest.mark.parametrize("model_name", ["gpt2_model", "metaspace_model"])
def test_random_prompt_boundaries_keep_merged_outputs_consistent(model_name, request):
    am = request.getfixturevalue(model_name)
    rng = random.Random(0)
    checked = cut_words = 0
    for _ in range(200):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))
        prompt = text[: rng.randint(1, len(text) - 1)]
        if not prompt_is_token_prefix(am.tokenizer, prompt, text):
            continue  # attribute() needs the prompt's tokens to start the text's tokens
        seq = am.attribute(prompt, text, step_scores=["probability"], show_progress=False)[0].aggregate()
        check_merged(seq, seq.aggregate("words"))
        checked += 1
        cut_words += not seq.target[seq.attr_pos_start].token.startswith(WORD_START)
        if checked == 40:
            break
    assert checked >= 10 and cut_words >= 3


@pytest.mark.parametrize("tokenizer", ["byte_level", "metaspace"])
def test_random_outputs_keep_merged_outputs_consistent(tokenizer):
    tok = tiny_gpt2()[1] if tokenizer == "byte_level" else metaspace_tokenizer()
    rng = random.Random(1)
    torch.manual_seed(1)
    for _ in range(200):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 8)))
        target = [TokenWithId(t, i) for t, i in zip(tok.tokenize(text), tok(text, add_special_tokens=False)["input_ids"])]
        if len(target) < 2:
            continue
        start = rng.randint(1, len(target) - 1)
        end = rng.randint(start + 1, len(target))
        scores = torch.randn(end, end - start)
        rows_not_generated = torch.arange(end)[:, None] >= start + torch.arange(end - start)[None, :]
        scores[rows_not_generated] = math.nan
        seq = FeatureAttributionSequenceOutput(
            source=target[:start], target=target, target_attributions=scores, attr_pos_start=start,
            attr_pos_end=end, step_scores={"probability": torch.rand(end - start)}, aggregated=True)
        check_merged(seq, seq.aggregate("words"))


def test_encoder_decoder_merges_source_words_and_target_steps():
    model, tok = tiny_marian()
    am = il.load_model(model, "saliency", tokenizer=tok)
    seq = am.attribute("Paris is the capital of France", "Le chat est noir", attribute_target=True,
                       step_scores=["probability"], show_progress=False)[0].aggregate()
    merged = seq.aggregate("words")
    check_merged(seq, merged)
    assert merged.target[0].token == seq.target[0].token  # the decoder start token is never merged into a step
    assert len(merged.source) < len(seq.source) and len(merged.generated) < len(seq.generated)
