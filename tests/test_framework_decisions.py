"""Attribution values drive the frameworks' own decisions: Lightning's EarlyStopping / ModelCheckpoint
and the HF Trainer's metric_for_best_model / EarlyStoppingCallback, in real runs.

The decision each framework should take is recomputed here from the values the monitor logged.
"""

import copy

import lightning.pytorch as pl
import pytest
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from transformers import EarlyStoppingCallback, Trainer, TrainingArguments, set_seed

from inseq_lightning.callbacks import AttributionCallback, AttributionMonitor
from inseq_lightning.demo.module import PairsCollator, PairsLM
from inseq_lightning.demo.task import make_dataset, make_probes
from inseq_lightning.monitor.values import LOGGED_VALUES, definition

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]
PAIRS = [(e.prompt, e.answer) for e in make_dataset(16, seed=0)]
METRIC = "attribution/saliency/mean/step_score/probability"


def _first_non_improvement(values: list[float], mode: str) -> int:
    """Index of the first value that does not improve on the best so far (patience 0), as EarlyStopping decides."""
    best = values[0]
    for i, value in enumerate(values[1:], start=1):
        improved = value < best if mode == "min" else value > best
        if not improved:
            return i
        best = value
    raise AssertionError(f"the metric improved at every check: {values}")


@pytest.mark.parametrize("monitor_first", [True, False], ids=["monitor-first", "monitor-last"])
def test_lightning_early_stopping_acts_on_an_attribution_metric(hf_models, tmp_path, monitor_first):
    model, tok = hf_models["gpt2"]
    pl.seed_everything(0)
    module = PairsLM(copy.deepcopy(model), tok, PAIRS, lr=1e-2, batch_size=4)
    monitor = AttributionMonitor(make_probes(2), every_n_epochs=1)
    # The probes' answer becomes likelier as the model learns the format: in "min" mode that is a
    # value getting worse, so patience=0 stops the run at the first epoch where it rises.
    stopper = EarlyStopping(monitor=METRIC, mode="min", patience=0, check_finite=False)
    best = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor=METRIC, mode="max", save_top_k=1)
    callbacks = [monitor, stopper, best] if monitor_first else [stopper, best, monitor]
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=8, callbacks=callbacks, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module)

    epochs = [r for r in monitor.reports if r.step > 0]  # one pass per epoch, after its last batch
    values = [r.means()["step_score/probability"] for r in epochs]
    stop = _first_non_improvement(values, "min")
    assert stopper.stopped_epoch == stop < 7  # stopped early, at the epoch the logged values say
    assert trainer.current_epoch == stop + 1
    assert float(trainer.callback_metrics[METRIC]) == pytest.approx(values[stop])
    assert float(best.best_model_score) == pytest.approx(max(values))


def _hf_trainer(hf_models, out, metric: str, greater_is_better: bool, callbacks=()):
    model, tok = hf_models["gpt2"]
    set_seed(0)
    model = copy.deepcopy(model)
    args = TrainingArguments(
        output_dir=str(out), max_steps=24, per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=1,
        eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2, report_to="none", use_cpu=True,
        seed=0, remove_unused_columns=False, disable_tqdm=True, load_best_model_at_end=True,
        metric_for_best_model=metric, greater_is_better=greater_is_better)
    return Trainer(model=model, args=args, train_dataset=PAIRS, eval_dataset=PAIRS[:4],
                   data_collator=PairsCollator(tok, False, tok.eos_token_id), processing_class=tok,
                   callbacks=list(callbacks))


def test_hf_metric_for_best_model_and_early_stopping_act_on_an_attribution_metric(hf_models, tmp_path):
    # EarlyStoppingCallback is passed at construction, so it runs *before* the attribution callback.
    trainer = _hf_trainer(hf_models, tmp_path / "out", METRIC, greater_is_better=False,
                          callbacks=[EarlyStoppingCallback(early_stopping_patience=1)])
    callback = AttributionCallback.attach(trainer, make_probes(2))
    trainer.train()

    evaluations = [h for h in trainer.state.log_history if "eval_loss" in h]
    logged = [(h["step"], h[f"eval_{METRIC}"]) for h in evaluations]
    by_step = {r.step: r.means()["step_score/probability"] for r in callback.reports}
    assert [v for _, v in logged] == pytest.approx([by_step[s] for s, _ in logged])
    values = [v for _, v in logged]
    stop = _first_non_improvement(values, "min")  # patience 1: two evaluations without improvement
    best_index = min(range(len(values)), key=values.__getitem__)
    assert trainer.state.best_metric == pytest.approx(values[best_index])
    assert trainer.state.best_model_checkpoint.endswith(f"checkpoint-{logged[best_index][0]}")
    assert trainer.state.global_step < 24  # stopped early
    assert len(logged) >= stop + 1
    assert trainer.evaluate()[f"eval_{METRIC}"] == pytest.approx(callback.reports[-1].means()["step_score/probability"])


def test_every_logged_value_has_a_direction_or_none_and_a_pooling():
    assert definition("step_score/probability").better == "higher"
    assert definition("step_score/entropy").better == "lower"
    assert definition("drift_ref/js_divergence").better == "lower"
    assert definition("drift_prev/tokens_compared").pooling == "sum"
    assert all(v.better in ("higher", "lower", None) and v.pooling in ("mean", "sum", "none")
               for v in LOGGED_VALUES.values())
    # "none": a value of the run as a whole (the stabilization step), logged on the mean only
    assert {name for name, v in LOGGED_VALUES.items() if v.pooling == "none"} == {"stabilization_step"}


def test_a_value_missing_from_a_pass_leaves_callback_metrics(hf_models, tmp_path):
    """A mean the latest pass could not compute must not linger for EarlyStopping to act on."""
    model, tok = hf_models["gpt2"]
    values = iter([1.0, float("nan"), float("nan")])  # defined at the reference pass only
    monitor = AttributionMonitor(make_probes(1), every_n_train_steps=2, extra_values={"flaky": lambda r: next(values)})
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=4, callbacks=[monitor], logger=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         limit_val_batches=0, num_sanity_val_steps=0, enable_checkpointing=False)
    trainer.fit(PairsLM(copy.deepcopy(model), tok, PAIRS, lr=1e-3))
    assert [r.step for r in monitor.reports] == [0, 2, 4]
    assert "attribution/saliency/mean/flaky" not in trainer.callback_metrics
    assert "attribution/saliency/mean/step_score/probability" in trainer.callback_metrics
