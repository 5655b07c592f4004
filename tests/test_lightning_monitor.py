"""The Lightning callback in real ``Trainer.fit`` runs on the tiny fixture models.

TensorBoard event files are read back with TensorBoard's own ``EventAccumulator``; W&B runs are
offline runs read back from their transaction log (tests/wandb_reader.py).
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
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from wandb_reader import history_rows

from inseq_lightning import FeatureAttributionOutput
from inseq_lightning.callbacks import AttributionMonitor
from inseq_lightning.demo.module import PairsLM
from inseq_lightning.demo.task import make_dataset, make_probes
from inseq_lightning.monitor import AttributionMonitorWarning, MonitoringError, Probe
from inseq_lightning.sinks import Sink

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
PAIRS = [(e.prompt, e.answer) for e in make_dataset(32, seed=0)]


def _module(hf_models, family="gpt2", lr=1e-3):
    model, tok = hf_models[family]
    return PairsLM(copy.deepcopy(model), tok, PAIRS, lr=lr, batch_size=4)


def _trainer(tmp_path, callbacks=(), logger=False, max_steps=6, accumulate=1, **kwargs):
    return pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, callbacks=list(callbacks), logger=logger,
                      enable_checkpointing=kwargs.pop("enable_checkpointing", False), enable_progress_bar=False,
                      enable_model_summary=False, log_every_n_steps=1, accumulate_grad_batches=accumulate,
                      default_root_dir=tmp_path, num_sanity_val_steps=kwargs.pop("num_sanity_val_steps", 0),
                      limit_val_batches=kwargs.pop("limit_val_batches", 0), deterministic=True, **kwargs)


def test_tensorboard_and_wandb_hold_every_logging_step(hf_models, tmp_path, wandb_offline):
    import wandb

    tb = TensorBoardLogger(tmp_path, name="tb")
    wb = WandbLogger(save_dir=tmp_path, project="tests")
    monitor = AttributionMonitor(make_probes(2), every_n_train_steps=2, step_scores=("probability", "entropy"))
    _trainer(tmp_path, [monitor], [tb, wb], max_steps=4, accumulate=2).fit(_module(hf_models))
    wandb.finish()
    steps = [0, 2, 4]
    assert [r.step for r in monitor.reports] == steps

    events = EventAccumulator(tb.log_dir, size_guidance={"scalars": 0, "images": 0, "tensors": 0}).Reload()
    tags = events.Tags()
    prefix = "attribution/saliency"
    for name in ("step_score/probability", "step_score/entropy", "evidence_mass"):
        logged = events.Scalars(f"{prefix}/probe_0/{name}")
        assert [e.step for e in logged] == steps
    assert events.Scalars(f"{prefix}/probe_0/step_score/probability")[-1].value == pytest.approx(
        monitor.reports[-1].results[0].step_scores["probability"], rel=1e-6)
    assert [e.step for e in events.Scalars(f"{prefix}/probe_1/drift_ref/cosine")] == [2, 4]
    assert [e.step for e in events.Scalars(f"{prefix}/mean/drift_prev/js_divergence")] == [2, 4]
    assert "train/loss" in tags["scalars"]  # the trainer's own scalars share the run
    for probe in ("probe_0", "probe_1"):
        text = events.Tensors(f"{prefix}/{probe}/table/text_summary")
        assert [e.step for e in text] == steps
        markdown = text[-1].tensor_proto.string_val[0].decode()
        escaped = probe.replace("_", "\\_")
        assert f"**{escaped}** at step 4" in markdown and "Evidence mass" in markdown
        images = events.Images(f"{prefix}/{probe}/heatmap")
        assert [e.step for e in images] == steps and images[0].width > 100 and images[0].height > 100
    plugin = Path(tb.log_dir) / "plugins" / "inseq_lightning"
    index = json.loads((plugin / "index.json").read_text())
    assert sorted((p["step"], p["probe"]) for p in index["pages"]) == [(s, p) for s in steps for p in ("probe_0", "probe_1")]
    assert "probe_1 · saliency · step 4" in (plugin / "attribution_saliency" / "step_4" / "probe_1.html").read_text()

    run_dir = Path(glob.glob(str(wandb_offline / "wandb" / "offline-run-*"))[0])
    rows = [r for r in history_rows(next(run_dir.glob("run-*.wandb"))) if f"{prefix}/probe_0/html/path" in r]
    assert [r["trainer/global_step"] for r in rows] == steps
    html = (run_dir / "files" / rows[-1][f"{prefix}/probe_0/html/path"]).read_text()
    assert html.startswith("<!DOCTYPE html>") and "step 4" in html
    assert rows[-1][f"{prefix}/probe_0/heatmap/_type"] == "image-file"
    assert rows[-1][f"{prefix}/table/log_mode"] == "INCREMENTAL"
    probes_table = [r for r in history_rows(next(run_dir.glob("run-*.wandb"))) if f"{prefix}/probes/path" in r]
    assert len(probes_table) == 1  # the probe set is logged once
    logged = json.loads((run_dir / "files" / probes_table[0][f"{prefix}/probes/path"]).read_text())
    assert [row[0] for row in logged["data"]] == ["probe_0", "probe_1"] and "Facts" in logged["data"][0][1]
    table = json.loads((run_dir / "files" / rows[-1][f"{prefix}/table/path"]).read_text())
    assert [row[:3] for row in table["data"]] == [[4, "fit", "probe_0"], [4, "fit", "probe_1"], [4, "fit", "mean"]]
    columns = table["columns"]  # the same names as the scalars, for every value
    assert table["data"][2][columns.index("drift_prev/js_divergence")] == pytest.approx(
        events.Scalars(f"{prefix}/mean/drift_prev/js_divergence")[-1].value, rel=1e-6)
    assert rows[-1][f"{prefix}/probe_0/step_score/probability"] == pytest.approx(
        monitor.reports[-1].results[0].step_scores["probability"], rel=1e-6)


def test_files_sink_with_csv_logger_on_an_encoder_decoder(hf_models, tmp_path):
    csv_logger = CSVLogger(tmp_path, name="csv")
    probes = [Probe("Hello world", "Le chat est noir"), Probe("the cat sat", "Il gatto dorme")]
    monitor = AttributionMonitor(probes, every_n_epochs=1)
    module = _module(hf_models, "marian")
    module.pairs = [("Hello world", "Le chat est noir")] * 8
    _trainer(tmp_path, [monitor], csv_logger, max_steps=-1, max_epochs=2).fit(module)
    root = Path(csv_logger.log_dir) / "attributions" / "attribution_saliency"
    assert sorted(p.name for p in root.glob("step_*")) == ["step_0", "step_2", "step_4"]
    loaded = FeatureAttributionOutput.load(root / "step_4" / "probe_0.json")
    assert [t.token for t in loaded[0].source][:2] == [t.token for t in monitor.reports[-1].results[0].output[0].source][:2]
    assert torch.allclose(loaded[0].source_attributions, monitor.reports[-1].results[0].output[0].source_attributions)
    assert len((root / "drift.csv").read_text().splitlines()) == 1 + 3 * (2 + 1)  # 2 probes and the mean


class _DropoutSpy(pl.Callback):
    """Records whether dropout is active for every training batch."""

    def __init__(self):
        self.active = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        dropouts = [m for m in pl_module.model.modules() if isinstance(m, torch.nn.Dropout)]
        self.active.append(bool(dropouts) and all(m.training and m.p > 0 for m in dropouts))


def _train_and_collect(hf_models, tmp_path, callbacks):
    pl.seed_everything(0)
    module = _module(hf_models)
    spy = _DropoutSpy()
    _trainer(tmp_path, [spy, *callbacks], max_steps=6, accumulate=2).fit(module)
    assert spy.active == [True] * 12  # dropout was on for every batch, monitor or not
    return {n: p.detach().clone() for n, p in module.model.named_parameters()}, module.losses


def test_training_is_bit_identical_with_and_without_the_monitor(hf_models, tmp_path):
    assert hf_models["gpt2"][0].config.resid_pdrop > 0  # dropout is on while training
    weights_a, losses_a = _train_and_collect(hf_models, tmp_path / "a", [])
    monitor = AttributionMonitor(make_probes(2), every_n_train_steps=1, step_scores=("probability", "entropy"),
                                 save_files=True)
    weights_b, losses_b = _train_and_collect(hf_models, tmp_path / "b", [monitor])
    assert [r.step for r in monitor.reports] == [0, 1, 2, 3, 4, 5, 6]  # it did attribute, at every step
    assert len(losses_a) == 12 and losses_a == losses_b
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[n], weights_b[n]) for n in weights_a)
    # and training did move the weights, so the comparison means something
    start = dict(hf_models["gpt2"][0].named_parameters())
    assert any(not torch.equal(weights_a[n], start[n]) for n in weights_a)


def test_step_trigger_fires_only_at_accumulation_boundaries(hf_models, tmp_path):
    seen = []

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append((batch_idx, trainer.global_step))

    monitor = AttributionMonitor(make_probes(1), every_n_train_steps=1, attribute_on_fit_start=False)
    _trainer(tmp_path, [Spy(), monitor], max_steps=3, accumulate=3).fit(_module(hf_models))
    assert [r.step for r in monitor.reports] == [1, 2, 3]
    # The optimizer stepped after batches 2 and 5 (every 3rd) and 7 (the epoch's last): only there.
    changed = [idx for k, (idx, step) in enumerate(seen) if step != (seen[k - 1][1] if k else 0)]
    assert changed == [2, 5, 7]


def test_resume_continues_the_history_of_two_monitors(hf_models, tmp_path):
    def monitors():
        return [AttributionMonitor(make_probes(2), every_n_train_steps=2, save_files=True),
                AttributionMonitor(make_probes(2), method="input_x_gradient", every_n_train_steps=2, save_files=True)]

    first = monitors()
    assert first[0].state_key != first[1].state_key
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    _trainer(tmp_path, [*first, checkpoint], max_steps=4, enable_checkpointing=True).fit(_module(hf_models))
    ckpt = tmp_path / "ckpt" / "epoch=0-step=4.ckpt"
    stored = torch.load(ckpt, weights_only=False)["callbacks"]
    assert {first[0].state_key, first[1].state_key} <= set(stored)

    resumed = monitors()
    _trainer(tmp_path, resumed, max_steps=8).fit(_module(hf_models), ckpt_path=ckpt)
    for before, after in zip(first, resumed):
        rows = after.history.probes["probe_0"].rows
        assert [row["step"] for row in rows] == [0, 2, 4, 6, 8]  # step 4 is not logged twice
        assert rows[:3] == before.history.probes["probe_0"].rows
        last = after.reports[-1].results[0]
        assert last.reference_step == 0 and last.previous_step == 6
        assert [r.step for r in after.reports] == [6, 8]


class _Broken(Sink):
    def log_report(self, report):
        raise OSError("tracker unreachable")


def test_bad_probe_and_broken_sink_do_not_stop_training(hf_models, tmp_path):
    probes = [*make_probes(2), Probe("Facts: " + "Mia keeps a red kite. " * 40, " x", name="too_long")]
    monitor = AttributionMonitor(probes, every_n_train_steps=2, sinks=[_Broken()], save_files=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer(tmp_path, [monitor], max_steps=4).fit(_module(hf_models))
    ours = [str(w.message) for w in caught if issubclass(w.category, AttributionMonitorWarning)]
    assert len([m for m in ours if "too_long" in m]) == 1
    assert len([m for m in ours if "tracker unreachable" in m]) == 1
    assert [r.step for r in monitor.reports] == [0, 2, 4]
    assert all([x.probe.name for x in r.results] == ["probe_0", "probe_1"] for r in monitor.reports)
    assert (Path(tmp_path) / "attributions" / "attribution_saliency" / "step_4" / "probe_1.json").is_file()


@pytest.mark.parametrize("kind", ["probe", "sink"])
def test_strict_mode_stops_training(hf_models, tmp_path, kind):
    if kind == "probe":
        monitor = AttributionMonitor([Probe("Facts: " + "Mia keeps a red kite. " * 40, " x")], strict=True)
    else:
        monitor = AttributionMonitor(make_probes(1), strict=True, sinks=[_Broken()])
    with pytest.raises(MonitoringError):
        _trainer(tmp_path, [monitor], max_steps=2).fit(_module(hf_models))


def test_validate_and_test_attribute_under_inference_mode_and_sanity_check_is_skipped(hf_models, tmp_path):
    monitor = AttributionMonitor(make_probes(2), every_n_epochs=1, attribute_on_fit_start=False, save_files=True)
    module = _module(hf_models)
    trainer = _trainer(tmp_path, [monitor], max_steps=2, num_sanity_val_steps=2, limit_val_batches=1)
    trainer.fit(module)
    # Only the end of the (cut) epoch attributes: the sanity check and fit-time validation do not.
    assert [(r.stage, r.step) for r in monitor.reports] == [("fit", 2)]
    trainer.validate(module)
    trainer.test(module)
    assert [(r.stage, r.step) for r in monitor.reports] == [("fit", 2), ("validate", 2), ("test", 2)]
    assert all(len(r.results) == 2 and r.results[0].step_scores["probability"] > 0 for r in monitor.reports)
    assert monitor.reports[1].results[0].step_scores == pytest.approx(monitor.reports[0].results[0].step_scores)
    # validate/test are snapshots: they do not move the drift history
    assert [row["step"] for row in monitor.history.probes["probe_0"].rows] == [2]


def test_arguments_are_validated_like_lightnings_monitors(hf_models):
    with pytest.raises(MisconfigurationException, match="not both"):
        AttributionMonitor(make_probes(1), every_n_train_steps=2, every_n_epochs=1)
    with pytest.raises(MisconfigurationException, match="positive integer"):
        AttributionMonitor(make_probes(1), every_n_train_steps=0)
    with pytest.raises(ValueError, match="Unknown attribution method"):
        AttributionMonitor(make_probes(1), method="nope")
    assert AttributionMonitor(make_probes(1)).every_n_epochs == 1


def test_missing_model_or_tokenizer_is_a_clear_error(hf_models, tmp_path):
    module = _module(hf_models)
    module.tokenizer = None
    with pytest.raises(MisconfigurationException, match="tokenizer"):
        _trainer(tmp_path, [AttributionMonitor(make_probes(1))], max_steps=1).fit(module)


class _AdapterWrapper(torch.nn.Module):
    """Shaped like a PEFT ``PeftModel``: the HF model behind ``get_base_model()``."""

    def __init__(self, model):
        super().__init__()
        self.base_model = model

    def get_base_model(self):
        return self.base_model

    def forward(self, **batch):
        return self.base_model(**batch)


def test_wrapped_models_are_unwrapped(hf_models, tmp_path):
    module = _module(hf_models)
    inner = module.model
    module.model = _AdapterWrapper(inner)
    monitor = AttributionMonitor(make_probes(1), save_files=True)
    _trainer(tmp_path, [monitor], max_steps=1).fit(module)
    assert monitor.model is inner and [r.step for r in monitor.reports] == [0, 1]


def test_compiled_model_is_attributed_through_its_original_module(hf_models, tmp_path):
    """``torch.compile`` wraps the model in an ``OptimizedModule``: the monitor attributes the
    original module (same weights, eager), so attribution passes never trigger recompilation."""
    module = _module(hf_models)
    module.model = torch.compile(module.model, backend="eager")
    monitor = AttributionMonitor(make_probes(2), every_n_train_steps=2, step_scores=("probability",))
    _trainer(tmp_path, [monitor], max_steps=4).fit(module)
    assert [r.step for r in monitor.reports] == [0, 2, 4]
    from inseq_lightning.monitor import ProbeMonitor

    eager, _ = ProbeMonitor(make_probes(2), step_scores=("probability",)).attribute_probes(
        module.model._orig_mod, module.tokenizer)
    for result in monitor.reports[-1].results:
        expected = eager[result.probe.name][0]
        assert result.step_scores["probability"] == pytest.approx(expected.step_scores["probability"].mean().item(),
                                                                  rel=1e-5)


def test_faithfulness_values_reach_tensorboard_wandb_and_callback_metrics(hf_models, tmp_path, wandb_offline):
    """AttributionMonitor(faithfulness=True) in a real fit: every probe's comprehensiveness,
    sufficiency, their random baselines and the plausibility values are TensorBoard and W&B scalars at
    every pass (read back with their own readers), equal to the report's, and the means reach
    ``trainer.callback_metrics`` where EarlyStopping/ModelCheckpoint read them."""
    import wandb

    tb = TensorBoardLogger(tmp_path, name="tb")
    wb = WandbLogger(save_dir=tmp_path, project="tests")
    monitor = AttributionMonitor(make_probes(2), every_n_train_steps=2, faithfulness=True,
                                 faithfulness_fractions=(0.2, 0.5))
    trainer = _trainer(tmp_path, [monitor], [tb, wb], max_steps=2)
    trainer.fit(_module(hf_models))
    wandb.finish()
    prefix = "attribution/saliency"
    names = ("comprehensiveness", "sufficiency", "comprehensiveness_random", "sufficiency_random",
             "soft_comprehensiveness", "evidence_average_precision", "evidence_reciprocal_rank")
    events = EventAccumulator(tb.log_dir, size_guidance={"scalars": 0}).Reload()
    run_dir = Path(glob.glob(str(wandb_offline / "wandb" / "offline-run-*"))[0])
    rows = [r for r in history_rows(next(run_dir.glob("run-*.wandb"))) if f"{prefix}/probe_0/comprehensiveness" in r]
    assert [r["trainer/global_step"] for r in rows] == [0, 2]
    last = monitor.reports[-1]
    for name in names:
        logged = events.Scalars(f"{prefix}/probe_0/{name}")
        assert [e.step for e in logged] == [0, 2]
        expected = last.results[0].scalars()[name]
        assert math.isfinite(expected)
        assert logged[-1].value == pytest.approx(expected, rel=1e-6, abs=1e-7)
        assert rows[-1][f"{prefix}/probe_0/{name}"] == pytest.approx(expected, rel=1e-6, abs=1e-7)
        assert float(trainer.callback_metrics[f"{prefix}/mean/{name}"]) == pytest.approx(last.means()[name],
                                                                                          rel=1e-6, abs=1e-7)
