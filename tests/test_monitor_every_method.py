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
