"""What a pass logs is defined once and reaches every sink intact, once per pass."""

import copy
import csv
import gc
import glob
import json
import math
import weakref
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins import base_plugin
from transformers import Trainer, TrainingArguments, set_seed
from wandb_reader import history_rows
from werkzeug.middleware.dispatcher import DispatcherMiddleware
from werkzeug.test import Client

from inseq_lightning.callbacks import AttributionCallback, AttributionMonitor
from inseq_lightning.demo.module import PairsCollator, PairsLM
from inseq_lightning.demo.task import make_dataset, make_probes
from inseq_lightning.monitor import Probe, ProbeMonitor
from inseq_lightning.sinks import FileSink, Sink
from inseq_lightning.tensorboard_plugin import AttributionsPlugin

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]
PAIRS = [(e.prompt, e.answer) for e in make_dataset(16, seed=0)]


class CountingSink(Sink):
    def __init__(self):
        self.calls: list[tuple[str, int]] = []

    def log_report(self, report):
        self.calls.append((report.prefix, report.step))


def _lightning(tmp_path, callbacks, loggers, max_steps=4):
    return pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, callbacks=callbacks, logger=loggers,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      log_every_n_steps=1, default_root_dir=tmp_path, num_sanity_val_steps=0, limit_val_batches=0)


def _first_mass(result) -> float:
    """A user value: the absolute attribution on the first prompt token, averaged over generated tokens."""
    return float(result.aggregated.target_attributions[0].abs().nanmean())


def test_two_monitors_and_a_custom_sink_log_every_pass_once_under_the_same_names(hf_models, tmp_path, wandb_offline):
    import wandb

    model, tok = hf_models["gpt2"]
    pl.seed_everything(0)
    counting = CountingSink()
    monitors = [AttributionMonitor(make_probes(2), method=method, every_n_train_steps=2, sinks=[counting],
                                   save_files=True, extra_values={"first_token_mass": _first_mass})
                for method in ("saliency", "input_x_gradient")]
    tb = TensorBoardLogger(tmp_path, name="tb")
    wb = WandbLogger(save_dir=tmp_path, project="tests")
    _lightning(tmp_path, monitors, [tb, wb]).fit(PairsLM(copy.deepcopy(model), tok, PAIRS, lr=1e-3))
    wandb.finish()

    steps = [0, 2, 4]
    tab = AttributionsPlugin(base_plugin.TBContext(logdir=str(tmp_path)))
    plugin = Client(DispatcherMiddleware(None, tab.get_plugin_apps()))
    run = str(Path(tb.log_dir).relative_to(tmp_path))
    assert counting.calls == [(f"attribution/{m}", s) for s in steps for m in ("saliency", "input_x_gradient")]
    events = EventAccumulator(tb.log_dir, size_guidance={"scalars": 0}).Reload()
    run_dir = Path(glob.glob(str(wandb_offline / "wandb" / "offline-run-*"))[0])
    history = history_rows(next(run_dir.glob("run-*.wandb")))
    for monitor in monitors:
        prefix = monitor.monitor.prefix
        report = monitor.reports[-1]
        expected = report.scalars()
        assert f"{prefix}/probe_0/first_token_mass" in expected and f"{prefix}/mean/first_token_mass" in expected
        # TensorBoard: every scalar, every pass, same values
        for tag, value in expected.items():
            if tag.endswith("/seconds"):
                continue
            assert events.Scalars(tag)[-1].step == 4 and events.Scalars(tag)[-1].value == pytest.approx(value, rel=1e-6)
        # W&B: the same scalars and a table whose rows are the report's rows
        last = [r for r in history if r.get("trainer/global_step") == 4 and f"{prefix}/mean/first_token_mass" in r][-1]
        for tag, value in expected.items():
            assert last[tag] == pytest.approx(value, rel=1e-6)
        table = json.loads((run_dir / "files" / last[f"{prefix}/table/path"]).read_text())
        for row, logged in zip(report.rows(), table["data"]):
            for column, value in zip(table["columns"], logged):
                if column in row and isinstance(row[column], float) and not math.isnan(row[column]):
                    assert value == pytest.approx(row[column], rel=1e-6)
        # the Attributions tab: /pages lists this monitor's pages, /page serves each one's own HTML
        listing = [p for p in json.loads(plugin.get("/pages").get_data(as_text=True))[run]
                   if p["prefix"] == prefix]
        assert sorted((p["step"], p["probe"]) for p in listing) == [(s, f"probe_{i}") for s in steps for i in range(2)]
        for page in listing:
            body = plugin.get("/page", query_string={"run": run, "path": page["path"]}).get_data(as_text=True)
            assert f"{page['probe']} · {monitor.monitor.method} · step {page['step']}" in body
        # drift.csv: one row per probe and the mean, every value under the scalar's name
        root = Path(tb.log_dir) / "attributions" / prefix.replace("/", "_")
        rows = [r for r in csv.DictReader((root / "drift.csv").open()) if r["step"] == "4"]
        for row in rows:
            for tag, value in expected.items():
                head = f"{prefix}/{row['probe']}/"
                if tag.startswith(head):
                    assert float(row[tag[len(head):]]) == pytest.approx(value, rel=1e-5)


def test_a_value_that_appears_later_widens_drift_csv_and_nothing_is_lost(hf_models, tmp_path):
    model, tok = hf_models["gpt2"]
    monitor = ProbeMonitor([Probe("the cat sat", " on the mat")], step_scores=("probability",))
    sink = FileSink(tmp_path)
    monitor.run(model, tok, 0, sinks=[sink])
    monitor.set_extra_values({"late_value": lambda result: 0.25})  # a value the first pass did not have
    report = monitor.run(model, tok, 1, sinks=[sink])
    with (tmp_path / "drift.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["step"], r["probe"]) for r in rows] == [("0", "probe_0"), ("0", "mean"), ("1", "probe_0"), ("1", "mean")]
    assert rows[0]["late_value"] == "" and float(rows[2]["late_value"]) == 0.25
    for name, value in report.results[0].scalars().items():  # score changes included, named as the scalars
        assert float(rows[2][name]) == pytest.approx(value, rel=1e-5), name
    assert float(rows[2]["step_score_change_ref/probability"]) == pytest.approx(0.0, abs=1e-6)


def test_lightning_monitor_feeds_a_user_sink_once_per_pass(hf_models, tmp_path):
    model, tok = hf_models["gpt2"]
    counting = CountingSink()
    monitor = AttributionMonitor(make_probes(1), every_n_train_steps=2, sinks=[counting])
    _lightning(tmp_path, [monitor], TensorBoardLogger(tmp_path, name="tb")).fit(
        PairsLM(copy.deepcopy(model), tok, PAIRS, lr=1e-3))
    assert counting.calls == [("attribution/saliency", s) for s in (0, 2, 4)]


def test_no_logger_writes_nothing_in_the_working_directory(hf_models, tmp_path, monkeypatch):
    model, tok = hf_models["gpt2"]
    monkeypatch.chdir(tmp_path)
    monitor = AttributionMonitor(make_probes(1), every_n_train_steps=2)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=2, callbacks=[monitor], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.warns(UserWarning, match="no logger and no default_root_dir"):
        trainer.fit(PairsLM(copy.deepcopy(model), tok, PAIRS, lr=1e-3))
    assert [r.step for r in monitor.reports] == [0, 2]
    assert list(tmp_path.iterdir()) == []


def _hf_trainer(hf_models, out, callbacks=()):
    model, tok = hf_models["gpt2"]
    set_seed(0)
    args = TrainingArguments(output_dir=str(out), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-3,
                             eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2,
                             report_to="none", use_cpu=True, seed=0, remove_unused_columns=False, disable_tqdm=True,
                             restore_callback_states_from_checkpoint=True)
    return Trainer(model=copy.deepcopy(model), args=args, train_dataset=PAIRS, eval_dataset=PAIRS[:4],
                   data_collator=PairsCollator(tok, False, tok.eos_token_id), processing_class=tok,
                   callbacks=list(callbacks))


def test_hf_callbacks_of_two_trainers_never_mix_and_do_not_keep_a_trainer_alive(hf_models, tmp_path):
    first = _hf_trainer(hf_models, tmp_path / "a")
    sink_a, sink_b = CountingSink(), CountingSink()
    AttributionCallback.attach(first, make_probes(1), sinks=[sink_a])
    first.train()
    second = _hf_trainer(hf_models, tmp_path / "b")
    AttributionCallback.attach(second, make_probes(1), sinks=[sink_b])  # same prefix, another run
    # the first run resumes: its callback is rebuilt from the checkpoint's JSON and must take over its
    # own run's live objects, not the second trainer's (same prefix)
    first.args.max_steps = 6
    first.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-4"))
    rebuilt = next(c for c in first.callback_handler.callbacks if isinstance(c, AttributionCallback))
    assert rebuilt.trainer is first and rebuilt.extra_sinks == [sink_a]
    assert [r.step for r in rebuilt.reports] == [6]  # steps 0-4 come from the checkpoint's history
    assert sink_a.calls == [("attribution/saliency", s) for s in (0, 2, 4, 6)] and sink_b.calls == []
    assert [row["step"] for row in rebuilt.history.probes["probe_0"].rows] == [0, 2, 4, 6]

    watched = weakref.ref(second)
    callback = next(c for c in second.callback_handler.callbacks if isinstance(c, AttributionCallback))
    second.train()
    del second
    gc.collect()
    assert watched() is None and callback.trainer is None  # the callback the user keeps holds no trainer


def test_one_model_state_snapshot_per_pass(hf_models, monkeypatch):
    model, tok = hf_models["gpt2"]
    probes = [Probe("the cat sat", None), Probe("Hello world", None)]
    from inseq_lightning.monitor import ProbeSet

    monitor = ProbeMonitor(ProbeSet(probes, generate=True, generation_args={"max_new_tokens": 3}),
                           step_scores=("probability", "mc_dropout_prob_avg"), batch_size=1)
    snapshots = []
    real = torch.get_rng_state
    monkeypatch.setattr(torch, "get_rng_state", lambda: snapshots.append(1) or real())
    monitor.run(model, tok, 0)
    # two batches, generation and Monte Carlo dropout inside: still one snapshot for the whole pass
    assert len(snapshots) == 1


def test_two_hf_callbacks_with_one_prefix_on_one_trainer_are_refused(hf_models, tmp_path):
    trainer = _hf_trainer(hf_models, tmp_path / "out")
    AttributionCallback.attach(trainer, make_probes(1))
    with pytest.raises(ValueError, match="prefix"):
        AttributionCallback.attach(trainer, make_probes(1))
    AttributionCallback.attach(trainer, make_probes(1), method="input_x_gradient")  # its own prefix: fine
