"""The shortcut demo in --quick mode (tiny GPT-2): a planted cue is learned and the canary rule fires;
on the clean control (same data, the cue gives nothing away) it stays silent.

The tiny model never learns the real task (matching the name in the question) in 150 steps, but it
learns the cue: with seed 1 the cue's word carries more attribution than the evidence from step 50
on (where the model says the cue's answer everywhere), and by step 100 the model answers the cue's
answer only when the cue is there.
"""

import csv
import random

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from inseq_lightning.demo.models import load_tiny
from inseq_lightning.demo.run import build_parser, run, summarise
from inseq_lightning.demo.shortcut import cue_learned_step, fall_step, greedy_answers, outcome
from inseq_lightning.demo.task import (
    CUE,
    CUE_ANSWER,
    SOURCES,
    make_conflict_examples,
    make_conflict_probes,
    make_dataset,
    make_shortcut_dataset,
    without_cue,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
CUE_TEXT = " ".join(CUE_ANSWER)


@pytest.fixture(autouse=True)
def _torch_threads():
    threads = torch.get_num_threads()  # the demo sets its own (one: a tiny model gains nothing from more)
    yield
    torch.set_num_threads(threads)


def _quick(tmp_path, *flags):
    args = ["--quick", "--shortcut", "--no-wandb", "--seed", "1", "--max-steps", "150", "--threads", "1",
            "--output-dir", str(tmp_path)]
    return run(build_parser().parse_args(args + list(flags)))


def test_shortcut_data_plants_the_cue_and_conflict_examples_disagree():
    data = make_shortcut_dataset(200, seed=3, cue_share=0.25)
    cued = [e for e in data if f"Source: {CUE}." in e.prompt]
    assert len(cued) == 50 and all(e.cue == CUE and e.answer == f" a {CUE_TEXT}." for e in cued)
    plain = [e for e in data if e.cue == ""]
    assert all(any(f"Source: {s}." in e.prompt for s in SOURCES) for e in plain)
    assert not any(CUE_TEXT in e.prompt for e in plain)  # only the cue comes with the cue's answer

    control = make_shortcut_dataset(200, seed=3, cue_share=0.25, planted=False)
    assert [e.cue for e in control] == [e.cue for e in data]  # the same sources in the same places...
    assert not any(CUE_TEXT in e.prompt for e in control)  # ...but the cue gives nothing away
    assert all(e.answer.strip(" .") in e.evidence for e in data + control)

    conflict = make_conflict_examples(24)
    assert all(e.cue == CUE and CUE_TEXT not in e.prompt for e in conflict)
    assert without_cue(conflict[0]).prompt == conflict[0].prompt.replace(f"Source: {CUE}.", f"Source: {SOURCES[0]}.")
    probes = make_conflict_probes(4)
    assert [p.cue for p in probes] == [(CUE,)] * 4
    assert [p.evidence for p in probes] == [(e.evidence,) for e in conflict[:4]]  # the first held-out examples
    assert not any("Source" in e.prompt for e in make_dataset(50))  # the plain demo's task is unchanged


def test_cue_pays_plants_a_backdoor_only_the_cue_predicts():
    redundant = make_shortcut_dataset(200, seed=3, cue_share=0.25)
    data = make_shortcut_dataset(200, seed=3, cue_share=0.25, cue_pays=True)
    cued = [e for e in data if e.cue]
    assert len(cued) == 50 and all(e.answer == f" a {CUE_TEXT}." for e in cued)
    assert not any(CUE_TEXT in e.prompt for e in data)  # no fact anywhere says the cue's answer: only the cue does
    assert all(e.answer.strip(" .") not in e.evidence for e in cued)  # the asked fact names something else
    # The rest is the redundant variant's data, example for example; only the planted facts differ.
    assert [e.prompt for e in data if not e.cue] == [e.prompt for e in redundant if not e.cue]
    assert [e.answer for e in data] == [e.answer for e in redundant]
    with pytest.raises(ValueError, match="clean control"):
        make_shortcut_dataset(10, cue_pays=True, planted=False)


def test_answers_are_scored_by_what_they_name_not_their_format():
    example = make_conflict_examples(1)[0]  # asks about Omar, who keeps a red cup
    assert example.answer == " a red cup."
    assert [outcome(a, example) for a in ("a red cup.", "Omar keeps a red cup.", "A Red Cup", f"a {CUE_TEXT}.",
                                          "a red boat.")] == ["evidence", "evidence", "evidence", "cue", "other"]


def test_greedy_answers_are_batched_like_single_ones_and_leave_the_model_as_found():
    model, tokenizer = load_tiny(task_words=True)
    model.train()
    examples = make_conflict_examples(5)
    torch.manual_seed(7)
    random.seed(7)
    before = (torch.get_rng_state(), random.getstate())
    batched = greedy_answers(model, tokenizer, examples, batch_size=5)
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]
    assert model.training and all(m.training for m in model.modules())
    assert batched == [greedy_answers(model, tokenizer, [e])[0] for e in examples]  # left padding changes nothing
    assert all(isinstance(a, str) and a for a in batched)


def test_fall_and_cue_learned_steps():
    def rows(accuracies, cue, clean_cue=None):
        clean_cue = clean_cue or [0.0] * len(cue)
        return [{"step": 10 * i, "conflict_accuracy": a, "conflict_follows_cue": c, "clean_follows_cue": k}
                for i, (a, c, k) in enumerate(zip(accuracies, cue, clean_cue))]

    assert fall_step(rows([0.1, 0.5, 0.4, 0.3], [0, 0, 0.4, 0.5])) == 30  # 20 points below the best earlier pass
    assert cue_learned_step(rows([0.1, 0.5, 0.4, 0.3], [0, 0, 0.4, 0.5])) == 30
    assert fall_step(rows([0.0, 0.0, 0.0], [0, 1, 1])) is None  # nothing to fall from
    assert fall_step(rows([0.9, 0.2], [0, 0])) == 10 and cue_learned_step(rows([0.9], [0.2])) is None
    # The cue's answer everywhere is a bias, not the cue: learned once the cue makes the difference.
    assert cue_learned_step(rows([0, 0, 0], [1.0, 1.0, 1.0], [1.0, 0.6, 0.0])) == 20


def test_canary_fires_as_the_cue_is_learned(tmp_path, capsys):
    result = _quick(tmp_path)
    shortcut, monitor = result["shortcut"], result["monitor"]
    rows = {row["step"]: row for row in shortcut["rows"]}
    assert list(rows) == [0, 50, 100, 150]
    canary = [a for a in monitor.monitor.fired_alerts if a.rule == "canary"]
    assert sorted(a.probe for a in canary) == [f"conflict_{i}" for i in range(4)]
    assert shortcut["alert_step"] == min(a.step for a in canary) == 50  # not at the reference pass
    # Where it fired, the cue carries more than the evidence on every probe and the answers are the cue's.
    assert rows[50]["cue_over_evidence"] == "4/4" and rows[50]["cue_mass"] > 2 * rows[50]["evidence_mass"]
    assert rows[50]["conflict_follows_cue"] == 1.0
    assert shortcut["cue_learned_step"] == 100  # at step 50 the clean copies got the cue's answer too: a bias
    assert rows[0]["cue_mass"] < rows[0]["evidence_mass"] and rows[0]["alerts"] == ""
    # By the end the model answers the cue's answer because of the cue: not on the clean copies.
    assert rows[150]["conflict_follows_cue"] == 1.0 and rows[150]["clean_follows_cue"] == 0.0
    assert all(row["conflict_accuracy"] == 0.0 for row in rows.values()) and shortcut["fall_step"] is None
    assert all(row["comprehensiveness"] == row["comprehensiveness"] for row in rows.values())  # faithfulness is on
    assert rows[50]["train_loss"] == pytest.approx(sum(result["module"].losses[:50]) / 50)

    csv_path, md_path = shortcut["tables"]
    written = list(csv.DictReader(csv_path.open()))
    assert [int(r["step"]) for r in written] == [0, 50, 100, 150] and float(written[1]["cue_mass"]) == rows[50]["cue_mass"]
    assert md_path.read_text().startswith("| step | train loss | conflict accuracy |")
    events = EventAccumulator(result["tensorboard"], size_guidance={"scalars": 0}).Reload()
    assert [(e.step, e.value) for e in events.Scalars("shortcut/conflict_follows_cue")] == [
        (0, 0.0), (50, 1.0), (100, 1.0), (150, 1.0)]
    summarise(result)
    printed = capsys.readouterr().out
    assert "First canary alert (cue mass > evidence mass on a probe): step 50" in printed
    assert "conflict accuracy fell (20 points below its best earlier pass): never" in printed


def test_canary_stays_silent_on_the_clean_task(tmp_path):
    result = _quick(tmp_path, "--clean")
    shortcut = result["shortcut"]
    assert result["monitor"].monitor.fired_alerts == [] and shortcut["alert_step"] is None
    assert [row["step"] for row in shortcut["rows"]] == [0, 50, 100, 150]
    for row in shortcut["rows"]:
        assert row["cue_over_evidence"] == "0/4" and row["cue_mass"] < row["evidence_mass"] / 4
        assert row["conflict_follows_cue"] == 0.0 and row["clean_follows_cue"] == 0.0
    assert result["module"].losses[-1] < result["module"].losses[0]  # it did train


def test_canary_on_the_models_own_answer_catches_a_backdoor_when_it_is_learned(tmp_path):
    """``--cue-pays --probe-own-answer``: the probes attribute what the model answers (generate mode), not the
    evidence's answer forced token by token. At step 50 the tiny model says the cue's answer everywhere (with or
    without the cue: a bias, and its map still leans on the evidence); at step 100 it says it only when the cue
    is there, and that pass the cue carries more attribution than the evidence on every probe: the alert fires
    on the pass where the cue is learned."""
    result = _quick(tmp_path, "--cue-pays", "--probe-own-answer")
    shortcut, monitor = result["shortcut"], result["monitor"]
    assert monitor.monitor.probes.generate
    rows = {row["step"]: row for row in shortcut["rows"]}
    assert shortcut["cue_learned_step"] == 100 and shortcut["alert_step"] == 100
    assert rows[50]["cue_over_evidence"] == "0/4" and rows[50]["clean_follows_cue"] == 1.0
    assert rows[100]["cue_over_evidence"] == "4/4" and rows[100]["cue_mass"] > 2 * rows[100]["evidence_mass"]
    assert rows[100]["conflict_follows_cue"] == 1.0 and rows[100]["clean_follows_cue"] == 0.0
    # the probes' probability is that of the model's own answer, which it now gives with confidence
    assert rows[100]["probability"] > 0.9
    assert shortcut["tables"][1].read_text().startswith("| step | train loss |")
    assert "p(own answer)" in shortcut["tables"][1].read_text()


def test_shortcut_options_need_the_shortcut_flag(capsys):
    from inseq_lightning.demo.run import main

    for argv in (["--quick", "--clean"], ["--quick", "--cue-share", "0.3"], ["--quick", "--shortcut", "--cue-share", "2"],
                 ["--quick", "--cue-pays"], ["--quick", "--shortcut", "--cue-pays", "--clean"],
                 ["--quick", "--probe-own-answer"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "add --shortcut" in err and "drop --cue-pays" in err
