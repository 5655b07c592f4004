"""Alerts and the stabilization point: rules on hand-built reports, then real Lightning and HF runs.

TensorBoard is read back with ``EventAccumulator``; the W&B alert from an offline run's transaction
log (``wandb.alert`` works offline: it writes an ``alert`` record, read with tests/wandb_reader.py).
"""

import copy
import glob
import json
import math
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import Trainer, TrainingArguments, set_seed
from wandb_reader import read_records

from inseq_lightning.callbacks import AttributionCallback, AttributionMonitor
from inseq_lightning.demo.module import PairsCollator, PairsLM
from inseq_lightning.demo.task import make_dataset, make_probes
from inseq_lightning.monitor import AlertRule, AttributionAlertWarning, MonitorReport, Probe, ProbeResult
from inseq_lightning.monitor.alerts import AlertTracker, Stabilization
from inseq_lightning.monitor.values import definition, mean_only_names

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]
PAIRS = [(e.prompt, e.answer) for e in make_dataset(32, seed=0)]
PREFIX = "attribution/saliency"
# A value that surely moves once training starts: the probability of the probe's answer.
MOVES = AlertRule("step_score/probability", "change", 1e-9, probe="mean", name="moved")
NEVER = AlertRule("evidence_mass", "below", -1.0, name="never")  # a share is never negative
ALWAYS = AlertRule("evidence_mass", "above", -1.0, probe="mean", name="always")


def _module(hf_models):
    model, tok = hf_models["gpt2"]
    return PairsLM(copy.deepcopy(model), tok, PAIRS, lr=1e-3, batch_size=4)


def _trainer(tmp_path, callbacks=(), logger=False, max_steps=6, **kwargs):
    return pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, callbacks=list(callbacks), logger=logger,
                      enable_checkpointing=kwargs.pop("enable_checkpointing", False), enable_progress_bar=False,
                      enable_model_summary=False, log_every_n_steps=1, default_root_dir=tmp_path,
                      num_sanity_val_steps=0, limit_val_batches=0, deterministic=True, **kwargs)


def _alert_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, AttributionAlertWarning)]


# ---- rules on hand-built reports ------------------------------------------------------------------
def _report(step, per_probe: dict[str, dict[str, float]]) -> MonitorReport:
    results = []
    for name, values in per_probe.items():
        result = ProbeResult(Probe("the cat sat", " on", name=name), None, None,
                             {"probability": values.get("p", math.nan)},
                             drift_previous={"cosine": values["cos"]} if "cos" in values else {})
        result.evidence_mass = values.get("ev", math.nan)
        result.cue_mass = values.get("cue", math.nan)
        results.append(result)
    return MonitorReport(step, 0, "fit", "saliency", PREFIX, results)


def test_rule_kinds_patience_and_state_round_trip():
    rules = [AlertRule("evidence_mass", "below", 0.3, patience=2, name="low"),
             AlertRule("step_score/probability", "change", 0.1, against="previous", probe="mean", name="jump"),
             AlertRule("step_score/probability", "change", 0.25, probe="a", name="drifted")]
    tracker = AlertTracker(rules, canary=True)
    assert [r.key for r in tracker.rules] == ["low", "jump", "drifted", "canary"]
    seq = [{"a": {"ev": 0.2, "p": 0.5, "cue": 0.1}, "b": {"ev": 0.5, "p": 0.5}},
           {"a": {"ev": 0.5, "p": 0.55, "cue": 0.1}, "b": {"ev": 0.2, "p": 0.55}},   # a recovers: count resets
           {"a": {"ev": 0.2, "p": 0.8, "cue": 0.6}, "b": {"ev": 0.2, "p": 0.8}},    # b: 2nd pass low; jump; cue
           {"a": {"ev": 0.2, "p": 0.8, "cue": 0.9}, "b": {"ev": 0.2, "p": 0.8}}]    # a: 2nd low; drifted .3 > .25
    fired = [[(a.rule, a.probe) for a in tracker.evaluate(_report(i, values))] for i, values in enumerate(seq)]
    assert fired == [[], [], [("low", "b"), ("jump", "mean"), ("drifted", "a"), ("canary", "a")], [("low", "a")]]
    assert fired[2] and "cue_mass = 0.6" in tracker.fired[3].message and "evidence_mass = 0.2" in tracker.fired[3].message
    # JSON state: a new tracker continues the counters and never fires twice.
    state = json.loads(json.dumps(tracker.state_dict()))
    again = AlertTracker([AlertRule.from_state(json.loads(json.dumps(r.to_state()))) for r in rules], canary=True)
    again.load_state_dict(state)
    assert again.evaluate(_report(4, seq[3])) == [] and len(again.fired) == 5


def test_rule_arguments_are_checked():
    for kwargs in ({"kind": "sideways", "threshold": 1}, {"kind": "below"}, {"kind": "change"},
                   {"kind": "change", "threshold": 1, "other": "cue_mass"}, {"threshold": 1, "patience": 0},
                   {"kind": "change", "threshold": 1, "against": "yesterday"}):
        with pytest.raises(ValueError):
            AlertRule("evidence_mass", **kwargs)
    with pytest.raises(ValueError, match="share a name"):
        AlertTracker([NEVER, NEVER])
    assert AlertRule("cue_mass", "above", other="evidence_mass").key == "cue_mass above evidence_mass on *"


def test_stabilization_step_on_a_hand_built_sequence():
    stab = Stabilization("cosine", 0.05)
    steps = []
    for step, cosine in [(0, None), (10, 0.5), (20, 0.97), (30, 0.99), (40, 0.9), (50, 0.96), (60, 1.0)]:
        means = _report(step, {"a": {"p": 0.5} if cosine is None else {"p": 0.5, "cos": cosine}}).means()
        steps.append(stab.add(step, means))
    # stable from the pass before the first of the trailing within-tolerance drifts; it moves later at step 40
    assert steps == [None, None, 10, 10, None, 40, 40]
    js = Stabilization("js_divergence", 0.1)
    for step, value in [(0, None), (1, 0.05), (2, 0.2), (3, 0.01)]:
        js.add(step, {} if value is None else {"drift_prev/js_divergence": value})
    assert js.step == 2 and js.describe() == "mean/drift_prev/js_divergence <= 0.1"
    restored = Stabilization("js_divergence", 0.1)
    restored.load_state_dict(json.loads(json.dumps(js.state_dict())))
    assert restored.step == 2
    report = _report(5, {"a": {"p": 0.5}})
    report.stabilization_step = 2
    assert report.means()["stabilization_step"] == 2 and "stable since step 2" in report.summary()
    assert definition("stabilization_step").better is None and "stabilization_step" in mean_only_names()
    with pytest.raises(ValueError):
        Stabilization("cosine", 2.0)


# ---- Lightning ------------------------------------------------------------------------------------
def _alert_records(wandb_dir: Path) -> list:
    run_dir = Path(glob.glob(str(wandb_dir / "wandb" / "offline-run-*"))[0])
    return [r.alert for r in read_records(next(run_dir.glob("run-*.wandb"))) if r.WhichOneof("record_type") == "alert"]


def test_lightning_alert_warns_logs_to_tensorboard_and_wandb_and_stops(hf_models, tmp_path, wandb_offline, capsys):
    import wandb

    tb = TensorBoardLogger(tmp_path, name="tb")
    wb = WandbLogger(save_dir=tmp_path, project="tests")
    rule = AlertRule("step_score/probability", "change", 1e-9, probe="mean", name="moved", stop_training=True)
    monitor = AttributionMonitor(make_probes(2), every_n_train_steps=2, alerts=[rule, NEVER])
    trainer = _trainer(tmp_path, [monitor], [tb, wb], max_steps=10)
    with pytest.warns(AttributionAlertWarning, match=r"moved: mean step_score/probability = .* at step 2"):
        trainer.fit(_module(hf_models))
    wandb.finish()
    assert trainer.global_step == 2  # stopped at the step of the alert, not at max_steps
    assert [r.step for r in monitor.reports] == [0, 2]
    (alert,) = monitor.reports[-1].alerts
    assert (alert.rule, alert.probe, alert.step, alert.stop_training) == ("moved", "mean", 2, True)
    assert [a.rule for a in monitor.monitor.fired_alerts] == ["moved"]  # "never" did not fire

    events = EventAccumulator(tb.log_dir, size_guidance={"tensors": 0}).Reload()
    (text,) = events.Tensors(f"{PREFIX}/alerts/text_summary")
    assert text.step == 2 and "moved: mean step_score/probability" in text.tensor_proto.string_val[0].decode()

    (record,) = _alert_records(wandb_offline)
    assert record.title == f"{PREFIX}: moved (mean)" and record.level == "WARN" and "at step 2" in record.text
    assert "1 alert(s): moved on mean at step 2" in capsys.readouterr().out  # the summary line at fit end


def test_lightning_rule_that_is_not_reached_does_not_fire(hf_models, tmp_path):
    tb = TensorBoardLogger(tmp_path, name="tb")
    monitor = AttributionMonitor(make_probes(2), every_n_train_steps=2,
                                 alerts=[NEVER, AlertRule("drift_prev/cosine", "below", -2.0, stop_training=True)])
    trainer = _trainer(tmp_path, [monitor], tb, max_steps=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(_module(hf_models))
    assert trainer.global_step == 4 and _alert_warnings(caught) == []
    assert monitor.monitor.fired_alerts == [] and all(r.alerts == [] for r in monitor.reports)
    events = EventAccumulator(tb.log_dir, size_guidance={"tensors": 0}).Reload()
    assert f"{PREFIX}/alerts/text_summary" not in events.Tags()["tensors"]


def test_lightning_patience_fires_after_n_passes_once(hf_models, tmp_path):
    rule = AlertRule("evidence_mass", "above", -1.0, probe="mean", patience=3, name="patient")
    monitor = AttributionMonitor(make_probes(2), every_n_train_steps=2, alerts=[rule])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer(tmp_path, [monitor], max_steps=8).fit(_module(hf_models))
    assert [r.step for r in monitor.reports] == [0, 2, 4, 6, 8]
    assert [[a.rule for a in r.alerts] for r in monitor.reports] == [[], [], ["patient"], [], []]
    assert len(_alert_warnings(caught)) == 1 and "for 3 passes" in _alert_warnings(caught)[0]


def test_canary_rule_fires_when_the_cue_carries_more_than_the_evidence(hf_models, tmp_path):
    base = make_probes(2)[0]
    cue = ("Ruth keeps a red boat.", "Leo keeps a blue boat.", "Question: What does Omar keep?")
    canary = Probe(base.prompt, base.target, ("cup",), "canary_probe", cue=cue)
    monitor = AttributionMonitor([canary, make_probes(2)[1]], every_n_train_steps=2)
    assert [r.key for r in monitor.monitor.alerts.rules] == ["canary"]  # the default rule, because of the cue
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer(tmp_path, [monitor], max_steps=2).fit(_module(hf_models))
    first = monitor.reports[0].results[0]
    assert first.cue_mass > first.evidence_mass  # many cue tokens against one evidence token
    assert [(a.rule, a.probe, a.step) for a in monitor.monitor.fired_alerts] == [("canary", "canary_probe", 0)]
    assert len(_alert_warnings(caught)) == 1 and "cue_mass" in _alert_warnings(caught)[0]
    # Without a cue there is no default rule; canary_alert=False turns it off.
    assert AttributionMonitor(make_probes(2)).monitor.alerts.rules == []
    assert AttributionMonitor([canary], canary_alert=False).monitor.alerts.rules == []


def test_lightning_resume_keeps_fired_alerts_and_patience_counters(hf_models, tmp_path):
    def monitor():
        return AttributionMonitor(make_probes(2), every_n_train_steps=2, alerts=[
            ALWAYS, AlertRule("evidence_mass", "above", -1.0, probe="mean", patience=4, name="patient")])

    first = monitor()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    _trainer(tmp_path, [first, checkpoint], max_steps=4, enable_checkpointing=True).fit(_module(hf_models))
    assert [(a.rule, a.step) for a in first.monitor.fired_alerts] == [("always", 0)]
    ckpt = tmp_path / "ckpt" / "epoch=0-step=4.ckpt"
    stored = torch.load(ckpt, weights_only=False)["callbacks"][first.state_key]
    assert stored["alerts"]["counters"]["patient"]["mean"]["count"] == 3

    resumed = monitor()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer(tmp_path, [resumed], max_steps=8).fit(_module(hf_models), ckpt_path=ckpt)
    assert [r.step for r in resumed.reports] == [6, 8]
    # "always" is not fired again; "patient" fires at its 4th pass, the first after the resume.
    assert [(a.rule, a.step) for a in resumed.monitor.fired_alerts] == [("always", 0), ("patient", 6)]
    assert len(_alert_warnings(caught)) == 1


def test_lightning_stabilization_step_is_logged_and_summarised(hf_models, tmp_path, capsys):
    tb = TensorBoardLogger(tmp_path, name="tb")
    loose = AttributionMonitor(make_probes(2), every_n_train_steps=2, stabilization_tolerance=1.0, prefix="loose")
    strict = AttributionMonitor(make_probes(2), every_n_train_steps=2, stabilization_tolerance=0.0,
                                stabilization_metric="top1_agreement", prefix="strict")
    _trainer(tmp_path, [loose, strict], tb, max_steps=4).fit(_module(hf_models))
    assert [r.stabilization_step for r in loose.reports] == [None, 0, 0]  # any cosine is within tolerance 1
    events = EventAccumulator(tb.log_dir, size_guidance={"scalars": 0}).Reload()
    logged = events.Scalars("loose/mean/stabilization_step")
    assert [(e.step, e.value) for e in logged] == [(2, 0.0), (4, 0.0)]
    assert "stable since step 0 (mean/drift_prev/cosine >= 0)" in loose.summary()
    out = capsys.readouterr().out
    assert "[loose] 3 training passes, stable since step 0" in out and "[strict] 3 training passes" in out
    stable = strict.monitor.stabilization.step
    assert all(r.stabilization_step == stable for r in strict.reports[-1:])
    tags = events.Tags()["scalars"]
    assert ("strict/mean/stabilization_step" in tags) == (stable is not None)


# ---- Hugging Face ---------------------------------------------------------------------------------
def _hf_trainer(hf_models, out, callbacks=(), max_steps=6, **args):
    model, tok = hf_models["gpt2"]
    set_seed(0)
    model = copy.deepcopy(model)
    model.train()
    arguments = TrainingArguments(**{
        "output_dir": str(out), "max_steps": max_steps, "per_device_train_batch_size": 4, "learning_rate": 1e-3,
        "logging_steps": 1, "eval_strategy": "no", "save_strategy": "no", "report_to": "none", "use_cpu": True,
        "seed": 0, "data_seed": 0, "remove_unused_columns": False, "disable_tqdm": True, **args})
    return Trainer(model=model, args=arguments, train_dataset=PAIRS, data_collator=PairsCollator(tok, False, tok.eos_token_id),
                   processing_class=tok, callbacks=list(callbacks))


def test_hf_trainer_stops_when_an_alert_asks(hf_models, tmp_path, capsys):
    rule = AlertRule("step_score/probability", "change", 1e-9, probe="mean", name="moved", stop_training=True)
    callback = AttributionCallback(make_probes(2), attribution_strategy="steps", attribution_steps=2, alerts=[rule],
                                   save_files=False)
    trainer = _hf_trainer(hf_models, tmp_path / "out", [callback], max_steps=8)
    with pytest.warns(AttributionAlertWarning, match="at step 2"):
        trainer.train()
    assert trainer.state.global_step == 2 and [r.step for r in callback.reports] == [0, 2]
    assert "1 alert(s): moved on mean at step 2" in capsys.readouterr().out
    # The JSON state holds the rules (arguments) and the fired alerts; a rebuilt callback keeps both.
    state = json.loads(json.dumps(callback.state()))
    rebuilt = AttributionCallback(**state["args"])
    rebuilt.history_state = state["attributes"]["history_state"]
    assert rebuilt.monitor.alerts.rules == [rule]
    assert [(a.rule, a.step) for a in rebuilt.monitor.fired_alerts] == [("moved", 2)]


def test_hf_resume_keeps_fired_alerts_and_patience_counters(hf_models, tmp_path):
    def callback():
        return AttributionCallback(make_probes(2), attribution_strategy="steps", attribution_steps=2, save_files=False,
                                   alerts=[ALWAYS, AlertRule("evidence_mass", "above", -1.0, probe="mean", patience=4,
                                                             name="patient")])

    out = tmp_path / "out"
    first = callback()
    checkpoints = {"save_strategy": "steps", "save_steps": 4, "restore_callback_states_from_checkpoint": True}
    _hf_trainer(hf_models, out, [first], max_steps=4, **checkpoints).train()
    assert [(a.rule, a.step) for a in first.monitor.fired_alerts] == [("always", 0)]
    stored = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["stateful_callbacks"]
    alerts = stored["AttributionCallback"]["attributes"]["history_state"]["alerts"]
    assert alerts["counters"]["patient"]["mean"]["count"] == 3 and [a["rule"] for a in alerts["fired"]] == ["always"]

    trainer = _hf_trainer(hf_models, out, [callback()], max_steps=8, **checkpoints)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train(resume_from_checkpoint=str(out / "checkpoint-4"))
    (resumed,) = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, AttributionCallback)]
    assert [r.step for r in resumed.reports] == [6, 8]  # step 4 is not attributed again
    # "always" is not fired again; "patient" fires at its 4th pass, the first after the resume.
    assert [(a.rule, a.step) for a in resumed.monitor.fired_alerts] == [("always", 0), ("patient", 6)]
    assert [[a.rule for a in r.alerts] for r in resumed.reports] == [["patient"], []]
    assert len(_alert_warnings(caught)) == 1 and "patient" in _alert_warnings(caught)[0]
