"""Which prompt tokens a probe's evidence selects, across tokenizer families, and the mass measured on them.

Expected rows are worked out here from the tokenizer's character offsets (the WordPiece vocabulary
is retrained per process and may split words differently between runs); expected masses are
recomputed from the aggregated attribution map.
"""

import json
from collections.abc import Callable

import pytest

from inseq_lightning.errors import InvalidInputError
from inseq_lightning.monitor import Probe, ProbeMonitor, ProbeSet
from inseq_lightning.tiny_models import metaspace_tokenizer, tiny_gpt2, tiny_llama, wordpiece_tokenizer

PROMPT = "Mia keeps a red kite. Leo keeps a blue boat. Leonard reads."
TARGET = " Mia"  # one attributed step keeps the expected masses simple
FAMILIES = ("byte_level", "metaspace", "wordpiece")


@pytest.fixture(scope="module")
def models() -> dict[str, tuple]:
    return {"byte_level": tiny_gpt2(), "metaspace": tiny_llama(tokenizer=metaspace_tokenizer()),
            "wordpiece": tiny_llama(tokenizer=wordpiece_tokenizer())}


def _shown(tok, prompt: str) -> list[tuple[int, int] | None]:
    """Per prompt token, the characters it shows: its offsets without the whitespace around them.

    None for a token that shows none: whitespace, or Metaspace's lone "▁", whose offsets borrow the
    next word's first character.
    """
    encoding = tok(prompt, return_offsets_mapping=True, add_special_tokens=False)
    shown = []
    for token, (start, end) in zip(tok.convert_ids_to_tokens(encoding["input_ids"]), encoding["offset_mapping"]):
        text = prompt[start:end]
        if token == "▁" or not text.strip():
            shown.append(None)
        else:
            shown.append((start + len(text) - len(text.lstrip()), end - len(text) + len(text.rstrip())))
    return shown


class _Case:
    """One probe run through the monitor, with the rows a test expects worked out from offsets."""

    def __init__(self, pair: tuple, probe: Probe):
        model, self.tok = pair
        self.prompt = probe.prompt
        self.result = ProbeMonitor([probe]).run(model, self.tok, step=0).results[0]
        self.shown = _shown(self.tok, self.prompt)
        self.n_special = len(self.result.aggregated.source) - len(self.shown)  # Metaspace's BOS

    def rows_where(self, keep: Callable[[int, int], bool]) -> list[int]:
        """Rows of the tokens that show characters, ``keep(start, end)`` choosing among those."""
        return [self.n_special + i for i, span in enumerate(self.shown) if span is not None and keep(*span)]

    def text(self, rows) -> str:
        """The characters the tokens at ``rows`` show, concatenated."""
        return "".join(self.prompt[slice(*self.shown[row - self.n_special])] for row in rows)

    def mass(self, rows: list[int]) -> float:
        # Decoder-only: the prompt tokens are the first rows of target_attributions ([tokens, steps]).
        scores = self.result.aggregated.target_attributions.abs().nan_to_num()
        return float((scores[rows].sum(0) / scores.sum(0)).mean())


def _within(start: int, end: int) -> Callable[[int, int], bool]:
    return lambda s, e: start <= s and e <= end


@pytest.mark.parametrize("family", FAMILIES)
def test_evidence_ending_in_a_space_selects_only_its_word(models, family):
    case = _Case(models[family], Probe(PROMPT, TARGET, ("red ",)))
    red = PROMPT.index("red")
    expected = case.rows_where(_within(red, red + 3))
    assert list(case.result.evidence_rows) == expected
    assert case.text(expected) == "red"  # not the next word, whose token starts with the space
    assert case.result.evidence_mass == pytest.approx(case.mass(expected))


@pytest.mark.parametrize("family", FAMILIES)
def test_span_ending_in_a_space_stops_at_its_last_word(models, family):
    sentence = PROMPT.index("Leo")  # "Mia keeps a red kite. ": the span ends on the space before "Leo"
    case = _Case(models[family], Probe(PROMPT, TARGET, ((0, sentence),)))
    expected = case.rows_where(_within(0, sentence))
    assert list(case.result.evidence_rows) == expected
    assert case.text(expected) == "Miakeepsaredkite."
    assert case.result.evidence_mass == pytest.approx(case.mass(expected))


@pytest.mark.parametrize("family", FAMILIES)
def test_word_evidence_does_not_match_inside_a_longer_word(models, family):
    case = _Case(models[family], Probe(PROMPT, TARGET, ("Leo",)))
    leo = PROMPT.index("Leo ")
    expected = case.rows_where(_within(leo, leo + 3))
    assert list(case.result.evidence_rows) == expected
    assert case.text(expected) == "Leo"  # nothing of "Leonard"
    assert case.result.evidence_mass == pytest.approx(case.mass(expected))


@pytest.mark.parametrize("family", FAMILIES)
def test_substring_evidence_also_matches_inside_words(models, family):
    case = _Case(models[family], Probe(PROMPT, TARGET, ("Leo",), evidence_match="substring"))
    leo, leonard = PROMPT.index("Leo "), PROMPT.index("Leonard")
    word = case.rows_where(_within(leo, leo + 3))
    inside = case.rows_where(lambda s, e: s < leonard + 3 and e > leonard)  # the tokens spelling Leonard's "Leo"
    assert inside and list(case.result.evidence_rows) == word + inside
    assert case.text(inside).startswith("Leo")


# WordPiece drops whitespace instead of making tokens of it, so only these two families have such tokens.
@pytest.mark.parametrize("family", ["byte_level", "metaspace"])
def test_whitespace_only_tokens_are_never_evidence(models, family):
    prompt = "Mia keeps a red kite.  Leo keeps a blue boat.\nBye"
    case = _Case(models[family], Probe(prompt, TARGET, ((0, len(prompt)),)))
    assert case.shown.count(None) >= 2  # the prompt does hold tokens that show no character
    expected = case.rows_where(lambda s, e: True)
    assert list(case.result.evidence_rows) == expected
    assert case.text(expected) == prompt.replace(" ", "").replace("\n", "")
    assert case.result.evidence_mass == pytest.approx(case.mass(expected))


def test_whole_word_boundaries_apply_only_where_the_evidence_has_a_word_character():
    prompt = "Leo keeps a blue boat.\nLeonard reads."
    probe = Probe(prompt, " x", ("boat.", "Leo"))
    assert probe.evidence_spans() == [(prompt.index("boat."), prompt.index("boat.") + 5), (0, 3)]


def test_evidence_absent_as_a_whole_word_is_rejected():
    with pytest.raises(InvalidInputError, match='evidence_match="substring"'):
        ProbeSet([Probe(PROMPT, TARGET, ("Leon",))])
    probes = ProbeSet([Probe(PROMPT, TARGET, ("Leon",), evidence_match="substring")])
    start = PROMPT.index("Leonard")
    assert probes[0].evidence_spans() == [(start, start + 4)]


def test_unknown_evidence_match_is_rejected_with_the_choices():
    with pytest.raises(InvalidInputError, match='"word".*"substring"'):
        ProbeSet.from_lists([PROMPT], [TARGET], [["Leo"]], evidence_match="fuzzy")
    with pytest.raises(InvalidInputError, match='"word".*"substring"'):
        ProbeSet.from_records([{"prompt": PROMPT, "target": TARGET, "evidence": ["Leo"], "evidence_match": "Word"}])


def test_evidence_match_is_kept_however_the_probe_set_is_built(tmp_path):
    unnamed = ProbeSet([Probe(PROMPT, TARGET, ("Leo",), evidence_match="substring")])
    assert (unnamed[0].name, unnamed[0].evidence_match) == ("probe_0", "substring")
    listed = ProbeSet.from_lists([PROMPT], [TARGET], [["Leo"]], evidence_match="substring")
    assert listed[0].evidence_match == "substring"
    restored = ProbeSet.coerce(json.loads(json.dumps(listed.to_state())))
    assert restored[0].evidence_match == "substring" and len(restored[0].evidence_spans()) == 2
    path = tmp_path / "probes.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": PROMPT, "target": TARGET, "evidence": ["Leo"], "evidence_match": "substring", "name": "inside"},
        {"prompt": PROMPT, "target": TARGET, "evidence": ["Leo"], "name": "whole"},
    ]))
    from_file = ProbeSet.from_file(path)
    assert [p.evidence_match for p in from_file] == ["substring", "word"]
    assert [len(p.evidence_spans()) for p in from_file] == [2, 1]
