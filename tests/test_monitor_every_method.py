"""Every attribution method in the Lightning callback, on the quick demo's model, in one real ``fit``;
and ``method="dummy"``: the step scores alone, with what needs a map absent and refused up front."""

import json
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import inseq_lightning as il
from inseq_lightning.callbacks import AttributionMonitor
from inseq_lightning.callbacks.hf import AttributionCallback
from inseq_lightning.demo.models import load_tiny
from inseq_lightning.demo.module import PairsLM
from inseq_lightning.demo.task import chat_pairs, make_chat_probes, make_dataset
from inseq_lightning.errors import InvalidInputError
from inseq_lightning.monitor import Probe, ProbeMonitor
from inseq_lightning.monitor.alerts import AlertRule
from inseq_lightning.monitor.values import LOGGED_VALUES, needs_map

# inseq 0.7.1's feature attribution methods, written out: the list must not drift with the code.
INSEQ_METHODS = [
    "dummy", "saliency", "input_x_gradient", "deeplift", "integrated_gradients", "gradient_shap",
    "sequential_integrated_gradients", "discretized_integrated_gradients", "attention", "layer_integrated_gradients",
    "layer_gradient_x_activation", "layer_deeplift", "lime", "occlusion", "reagent", "value_zeroing",
]
# The cheapest arguments that still run each method in seconds on the demo's quick model.
QUICK_KWARGS = {
    "integrated_gradients": {"n_steps": 4}, "layer_integrated_gradients": {"n_steps": 4},
    "sequential_integrated_gradients": {"n_steps": 2}, "discretized_integrated_gradients": {"n_steps": 4},
    "gradient_shap": {"n_samples": 2, "seed": 0}, "lime": {"n_samples": 8, "seed": 0},
    "reagent": {"max_probe_steps": 2, "num_probes": 2, "seed": 0},
}
# A value of every map-based kind the chat probes have (they carry evidence, no cue): a map method logs it.
MAP_VALUES = ("evidence_mass", "evidence_average_precision", "message_mass/0_user")


def _fit_with_every_method(tmp_path):
    """One fit, one optimizer step, sixteen monitors: each attributes once, at step 1 (after the step)."""
    model, tokenizer = load_tiny()
    probes = make_chat_probes(n=2)
    monitors = {method: AttributionMonitor(probes, method=method, method_kwargs=QUICK_KWARGS.get(method),
                                           prefix=f"every/{method}", every_n_train_steps=1,
                                           attribute_on_fit_start=False, faithfulness=False, log_text=False,
                                           log_figures=method in ("saliency", "dummy"))  # heatmaps: seen on two
                for method in INSEQ_METHODS}
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, callbacks=list(monitors.values()), logger=logger,
                         default_root_dir=tmp_path, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0,
                         log_every_n_steps=1)
    trainer.fit(PairsLM(model, tokenizer, chat_pairs(make_dataset(4), tokenizer), lr=1e-3))
    return monitors, logger.log_dir, [p.name for p in probes]


@pytest.fixture(scope="module")
def every_run(tmp_path_factory):
    return _fit_with_every_method(tmp_path_factory.mktemp("every_method"))


def test_the_sixteen_methods_are_inseqs():
    assert len(il.list_feature_attribution_methods()) == 16
    assert sorted(il.list_feature_attribution_methods()) == sorted(INSEQ_METHODS)


def test_every_method_runs_in_the_lightning_monitor_in_one_fit(every_run):
    monitors, log_dir, probe_names = every_run
    events = EventAccumulator(log_dir, size_guidance={"scalars": 0, "images": 0}).Reload()
    scalars = set(events.Tags()["scalars"])

    def value(method: str, tag: str) -> float:
        (event,) = events.Scalars(f"every/{method}/{tag}")  # one pass: one event, at step 1
        assert event.step == 1
        return event.value

    for method, monitor in monitors.items():
        assert not monitor.monitor._warned, f"{method}: a probe or sink failed"
        for probe in probe_names:
            probability = value(method, f"{probe}/step_score/probability")
            assert 0 < probability < 1, method
            # Same live model, same step: the model's own probability does not depend on the method.
            assert probability == pytest.approx(value("saliency", f"{probe}/step_score/probability"), abs=1e-5), method
            map_tags = [t for t in scalars if t.startswith(f"every/{method}/{probe}/") and needs_map(t.split("/", 3)[3])]
            if method == "dummy":
                assert map_tags == [], map_tags
            else:
                for name in MAP_VALUES:
                    assert math.isfinite(value(method, f"{probe}/{name}")), (method, name)
        mean_tags = [t for t in scalars if t.startswith(f"every/{method}/mean/")]
        assert f"every/{method}/mean/step_score/probability" in mean_tags
        assert (method == "dummy") == (not any(needs_map(t.split("/", 3)[3]) for t in mean_tags)), method


def test_dummy_logs_tokens_and_step_scores_but_no_heatmap_or_map_record(every_run):
    monitors, log_dir, probe_names = every_run
    events = EventAccumulator(log_dir, size_guidance={"images": 0}).Reload()
    images = set(events.Tags()["images"])
    assert {f"every/saliency/{p}/heatmap" for p in probe_names} <= images
    assert not [t for t in images if t.startswith("every/dummy/")]
    plugin = Path(log_dir) / "plugins" / "inseq_lightning"
    index = json.loads((plugin / "index.json").read_text())
    pages = {(p["prefix"], p["probe"]): p for p in index["pages"]}
    for probe in probe_names:
        assert "map" in pages[("every/saliency", probe)]
        dummy = pages[("every/dummy", probe)]
        assert "map" not in dummy  # the compare view compares maps: none to compare
        html = (plugin / dummy["path"]).read_text(encoding="utf-8")
        result = next(r for r in monitors["dummy"].reports[-1].results if r.probe.name == probe)
        assert "probability" in html and f"{result.aggregated.step_scores['probability'][0]:.3f}" in html
        assert result.aggregated.source_attributions is None and result.aggregated.target_attributions is None


# ---- what cannot work without a map is refused when the monitor is built --------------------------------------------
@pytest.mark.parametrize(("kwargs", "match"), [
    ({"faithfulness": True}, "faithfulness=False"),
    ({"alerts": [AlertRule("evidence_mass", "below", 0.1)]}, "reads evidence_mass.*step score"),
    ({"alerts": [AlertRule("step_score/probability", "below", other="drift_prev/cosine")]}, "reads drift_prev/cosine"),
    ({"alerts": [AlertRule("stabilization_step", "above", 10, probe="mean")]}, "reads stabilization_step"),
    ({"alerts": [{"value": "message_mass/0_user", "kind": "below", "threshold": 0.5}]}, "reads message_mass/0_user"),
    ({"probes": [Probe("The cue: red. The cup is", " red", cue=("cue: red",))]}, "canary_alert=False"),
    ({"step_scores": ()}, "nothing to log"),
])
@pytest.mark.parametrize("build", [ProbeMonitor, AttributionMonitor, AttributionCallback])
def test_dummy_refuses_what_needs_a_map_when_the_monitor_is_built(build, kwargs, match):
    """Refused in the constructor, before any model is seen (so before training starts)."""
    kwargs = {"probes": make_chat_probes(n=2), **kwargs}
    with pytest.raises(InvalidInputError, match=match):
        build(kwargs.pop("probes"), method="dummy", **kwargs)


def test_dummy_accepts_step_score_alerts_and_a_cue_without_the_canary():
    rule = AlertRule("step_score/probability", "change", 0.5, against="previous")
    ProbeMonitor(make_chat_probes(n=2), method="dummy", alerts=[rule])
    cue = [Probe("The cue: red. The cup is", " red", cue=("cue: red",))]
    monitor = ProbeMonitor(cue, method="dummy", canary_alert=False, step_scores=("probability", "entropy"))
    assert not any(needs_map(name) for name in monitor.value_names)
    assert set(monitor.value_names) == {f"step_score{kind}/{s}" for kind in ("", "_change_ref", "_change_prev")
                                        for s in ("probability", "entropy")}
    assert {n for n, v in LOGGED_VALUES.items() if not v.needs_map} == {
        "step_score/*", "step_score_change_ref/*", "step_score_change_prev/*"}


def test_dummy_logs_each_step_scores_change_between_passes():
    """Two passes of a step-scores-only monitor on a model that changed in between: the logged change of
    each probe's probability against the previous pass is the difference of the two passes' values."""
    model, tokenizer = load_tiny()
    monitor = ProbeMonitor(make_chat_probes(n=2), method="dummy", step_scores=("probability",))
    first = monitor.run(model, tokenizer, step=0)
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)  # a different model at the second pass
    second = monitor.run(model, tokenizer, step=1)
    for before, after in zip(first.results, second.results, strict=True):
        scalars = after.scalars()
        change = after.step_scores["probability"] - before.step_scores["probability"]
        assert abs(change) > 1e-6
        assert scalars["step_score_change_prev/probability"] == pytest.approx(change, rel=1e-6, abs=1e-9)
        assert not any(needs_map(name) for name in scalars)


def test_a_state_saved_by_another_method_is_refused():
    """A dummy monitor's state holds no maps; another method's maps are not this method's: resuming either
    into a monitor of another method would silently compare nothing (or the wrong maps)."""
    model, tokenizer = load_tiny()
    dummy = ProbeMonitor(make_chat_probes(n=2), method="dummy", prefix="shared")
    dummy.run(model, tokenizer, step=0)
    saliency = ProbeMonitor(make_chat_probes(n=2), method="saliency", prefix="shared")
    with pytest.raises(InvalidInputError, match="saved by a 'dummy' monitor.*another prefix"):
        saliency.load_state_dict(dummy.state_dict())
    ProbeMonitor(make_chat_probes(n=2), method="dummy", prefix="shared").load_state_dict(dummy.state_dict())


# ---- method="dummy" in a real transformers.Trainer.train, and in `inseq-lightning drift` ---------------------------
def _dummy_hf_run(hf_models, tmp_path, metric: str):
    """A real ``Trainer.train`` (4 steps, evaluation and save every 2) reporting to TensorBoard and W&B, with a
    step-scores-only callback and ``metric_for_best_model`` on one of its means."""
    import copy

    from transformers import Trainer, TrainingArguments, set_seed

    from inseq_lightning.demo.module import PairsCollator
    from inseq_lightning.demo.task import make_probes
    from inseq_lightning.monitor.values import HIGHER, definition

    model, tokenizer = hf_models["gpt2"]
    set_seed(0)
    pairs = [(e.prompt, e.answer) for e in make_dataset(32, seed=0)]
    arguments = TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-3,
        logging_steps=1, eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2,
        report_to=["tensorboard", "wandb"], use_cpu=True, seed=0, data_seed=0, remove_unused_columns=False,
        disable_tqdm=True, metric_for_best_model=metric, greater_is_better=definition(metric.split("/mean/")[1]).better == HIGHER)
    trainer = Trainer(model=copy.deepcopy(model).train(), args=arguments, train_dataset=pairs, eval_dataset=pairs[:4],
                      data_collator=PairsCollator(tokenizer, False, tokenizer.eos_token_id), processing_class=tokenizer)
    callback = AttributionCallback.attach(trainer, make_probes(2), method="dummy",
                                          step_scores=("probability", "entropy"))
    trainer.train()
    return trainer, callback


def _relative(key: str, prefix: str) -> str:
    """``<prefix>/<probe or mean>/<name>`` -> ``<name>``; a value of the pass (``<prefix>/seconds``) -> its name."""
    rest = key[len(prefix) + 1:]
    return rest.split("/", 1)[1] if "/" in rest else rest


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_dummy_in_a_real_trainer_logs_the_models_own_step_scores_to_tensorboard_wandb_and_eval_metrics(
        hf_models, tmp_path, wandb_offline):
    """``AttributionCallback.attach(trainer, probes, method="dummy")`` in ``Trainer.train``: each probe's
    probability and entropy reach TensorBoard and W&B (read back with their own readers) at every pass; the
    last pass's probability is the model's own teacher-forced probability of the probe's target, computed here
    from its forward; the means are eval metrics that ``metric_for_best_model`` ranks; no map-based value, heatmap
    or map column appears anywhere."""
    import glob

    import wandb
    from wandb_reader import history_rows

    prefix = "attribution/dummy"
    metric = f"{prefix}/mean/step_score/probability"
    trainer, callback = _dummy_hf_run(hf_models, tmp_path, metric)
    wandb.finish()
    steps = [0, 2, 4]  # train begin, then after each evaluation
    assert [r.step for r in callback.reports] == steps
    assert not callback.monitor._warned  # no probe or sink failed
    last = callback.reports[-1]
    names = [r.probe.name for r in last.results]
    assert names == ["probe_0", "probe_1"]

    # The model's own probability of probe_0's target at the last pass (step 4: the weights training ended with).
    result = last.results[0]
    model = _eval_copy(trainer.model)
    tokenizer = trainer.processing_class
    prompt_ids = tokenizer(result.probe.prompt).input_ids
    ids = tokenizer(result.probe.prompt + result.probe.target, return_tensors="pt").input_ids
    assert [t.id for t in result.aggregated.target] == ids[0].tolist()  # the same tokens were attributed
    with torch.no_grad():
        probabilities = model(ids).logits[0].softmax(-1)
    own = [probabilities[i - 1, ids[0, i]].item() for i in range(len(prompt_ids), ids.shape[1])]
    expected = sum(own) / len(own)
    assert 0 < expected < 1
    assert result.step_scores["probability"] == pytest.approx(expected, abs=1e-5)

    # TensorBoard: the trainer's own run.
    (run_dir,) = [Path(p).parent for p in glob.glob(str(tmp_path / "out" / "runs" / "*" / "events.out.tfevents.*"))]
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0}).Reload()
    assert "train/loss" in events.Tags()["scalars"]
    ours = [t for t in events.Tags()["scalars"] if t.startswith(f"{prefix}/")]
    assert not [t for t in ours if needs_map(_relative(t, prefix))], ours
    assert not [t for t in events.Tags()["images"] if t.startswith(f"{prefix}/")]  # no heatmap
    for report_index, step in enumerate(steps):
        for result in callback.reports[report_index].results:
            for score in ("probability", "entropy"):
                logged = events.Scalars(f"{prefix}/{result.probe.name}/step_score/{score}")
                assert [e.step for e in logged] == steps
                assert logged[report_index].value == pytest.approx(result.step_scores[score], rel=1e-6)
    assert events.Scalars(f"{prefix}/probe_0/step_score/probability")[-1].value == pytest.approx(expected, abs=1e-5)
    assert [e.step for e in events.Scalars(f"{prefix}/mean/step_score_change_ref/entropy")] == steps[1:]

    # W&B: the trainer's offline run, read back from its transaction log.
    wandb_run = Path(glob.glob(str(wandb_offline / "wandb" / "offline-run-*"))[0])
    rows = [r for r in history_rows(next(wandb_run.glob("run-*.wandb"))) if f"{prefix}/probe_0/step_score/probability" in r]
    assert [r["train/global_step"] for r in rows] == steps
    keys = {k for r in rows for k in r if k.startswith(f"{prefix}/") and k.count("/") >= 3}
    assert not [k for k in keys if needs_map(_relative(k, prefix))], keys
    assert not [k for k in keys if k.endswith("/heatmap") or "/heatmap/" in k]
    assert rows[-1][f"{prefix}/probe_0/step_score/probability"] == pytest.approx(expected, abs=1e-5)
    for score in ("probability", "entropy"):
        assert rows[-1][f"{prefix}/probe_1/step_score/{score}"] == pytest.approx(
            last.results[1].step_scores[score], rel=1e-6)
        assert rows[-1][f"{prefix}/mean/step_score/{score}"] == pytest.approx(last.means()[f"step_score/{score}"],
                                                                               rel=1e-6)
    table = json.loads((wandb_run / "files" / rows[-1][f"{prefix}/table/path"]).read_text())  # the last increment
    assert table["columns"][:3] == ["step", "stage", "probe"] and "step_score/entropy" in table["columns"]
    assert not [c for c in table["columns"][3:] if needs_map(c)], table["columns"]  # no column left empty
    row = dict(zip(table["columns"], next(r for r in table["data"] if r[2] == "probe_0"), strict=True))
    assert row["step"] == 4 and row["step_score/probability"] == pytest.approx(expected, abs=1e-5)

    # The eval metrics: the means of the pass run at each evaluation, ranked by metric_for_best_model.
    evaluations = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert [h["step"] for h in evaluations] == [2, 4]
    for evaluation, report in zip(evaluations, callback.reports[1:], strict=True):
        ours = {k: v for k, v in evaluation.items() if k.startswith(f"eval_{prefix}/")}
        assert ours[f"eval_{metric}"] == pytest.approx(report.means()["step_score/probability"], rel=1e-6)
        assert ours[f"eval_{prefix}/mean/step_score/entropy"] == pytest.approx(report.means()["step_score/entropy"],
                                                                               rel=1e-6)
        assert not [k for k in ours if needs_map(_relative(k, f"eval_{prefix}"))], ours
    best = max(evaluations, key=lambda h: h[f"eval_{metric}"])
    assert trainer.state.best_metric == pytest.approx(best[f"eval_{metric}"], rel=1e-9)
    assert trainer.state.best_global_step == best["step"]


def _eval_copy(model):
    import copy

    return copy.deepcopy(model).eval()


def _one_checkpoint(hf_models, tmp_path, cue: bool):
    """A real saved checkpoint and a probe file (with ``cue``, a probe with a cue: the canary a dummy monitor
    refuses, through ``canary_alert=False``, a setting the command has no flag for)."""
    model, tokenizer = hf_models["gpt2"]
    path = tmp_path / "checkpoint-10"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    probes = tmp_path / "probes.jsonl"
    probes.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "the cat sat", "target": " on the mat", "evidence": ["cat"], "name": "cat"},
        {"prompt": "The cue: red. The cup is", "target": " red", "cue": ["cue: red"] if cue else [], "name": "cued"},
    ]))
    return path, probes


@pytest.mark.parametrize("cue", [False, True], ids=["plain_probes", "probe_with_cue"])
def test_drift_command_with_dummy_exits_2_with_one_line_and_writes_nothing(hf_models, tmp_path, cue):
    """``inseq-lightning drift --method dummy`` as a user runs it (a subprocess): drift compares maps and dummy
    computes none, so it is refused up front (exit 2, one line naming the reason and what to do), before any
    checkpoint is loaded or any output (an empty report, drift columns of '-') is written."""
    import subprocess
    import sys

    path, probes = _one_checkpoint(hf_models, tmp_path, cue)
    out = tmp_path / "drift"
    result = subprocess.run([sys.executable, "-m", "inseq_lightning.cli", "drift", str(path), "--probes", str(probes),
                             "--method", "dummy", "--step-scores", "probability", "entropy", "--output-dir", str(out),
                             "--tensorboard"], capture_output=True, text=True, timeout=240, check=False)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("inseq-lightning: error: drift compares attribution maps")
    assert "'dummy' computes none (step scores only)" in line and "saliency" in line
    assert "canary" not in line  # the real reason, not a setting the command has no flag for
    assert not out.exists()


def test_drift_across_checkpoints_refuses_dummy_and_keeps_every_map_method(hf_models, tmp_path):
    from inseq_lightning.drift_checkpoints import drift_across_checkpoints

    path, probes = _one_checkpoint(hf_models, tmp_path, cue=False)
    with pytest.raises(InvalidInputError, match="drift compares attribution maps.*'dummy' computes none"):
        drift_across_checkpoints([path], probes, tmp_path / "refused", method="dummy", show_progress=False)
    assert not (tmp_path / "refused").exists()
    # A map method on the same files: step scores and maps both, in drift.csv.
    (report,) = drift_across_checkpoints([path], probes, tmp_path / "kept", method="saliency",
                                         step_scores=("probability",), show_progress=False)
    assert report.maps and math.isfinite(report.means()["evidence_mass"])
    header = (tmp_path / "kept" / "drift.csv").read_text().splitlines()[0].split(",")
    assert "step_score/probability" in header and "evidence_mass" in header
