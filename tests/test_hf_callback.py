"""The Hugging Face callback in real ``transformers.Trainer.train`` runs (accelerate underneath)."""

import copy
import glob
import json
import math
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import Trainer, TrainingArguments, set_seed
from wandb_reader import history_rows

from inseq_lightning.callbacks import AttributionCallback
from inseq_lightning.demo.module import PairsCollator
from inseq_lightning.demo.task import make_dataset, make_probes

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]
PAIRS = [(e.prompt, e.answer) for e in make_dataset(32, seed=0)]


def _trainer(hf_models, out, callbacks=(), report_to="none", max_steps=4, resume_state=False, wrap=None, **args):
    model, tok = hf_models["gpt2"]
    set_seed(0)
    model = copy.deepcopy(model)
    model.train()
    model = wrap(model) if wrap is not None else model
    arguments = TrainingArguments(**{
        "output_dir": str(out), "max_steps": max_steps, "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 2, "learning_rate": 1e-3, "logging_steps": 1, "eval_strategy": "steps",
        "eval_steps": 2, "save_strategy": "steps", "save_steps": 2, "report_to": report_to, "use_cpu": True,
        "seed": 0, "data_seed": 0, "remove_unused_columns": False,
        "restore_callback_states_from_checkpoint": resume_state, "disable_tqdm": True, **args})
    return Trainer(model=model, args=arguments, train_dataset=PAIRS, eval_dataset=PAIRS[:4],
                   data_collator=PairsCollator(tok, False, tok.eos_token_id), processing_class=tok,
                   callbacks=list(callbacks))


def test_attributions_share_the_trainers_tensorboard_run_and_wandb_run(hf_models, tmp_path, wandb_offline):
    import wandb

    trainer = _trainer(hf_models, tmp_path / "out", report_to=["tensorboard", "wandb"])
    callback = AttributionCallback.attach(trainer, make_probes(2), step_scores=("probability", "entropy"))
    trainer.train()
    wandb.finish()
    steps = [0, 2, 4]  # train begin, then after each evaluation
    assert [r.step for r in callback.reports] == steps
    assert callback.checkpoints == {"0": "checkpoint-2", "2": "checkpoint-2", "4": "checkpoint-4"}

    (run_dir,) = [Path(p).parent for p in glob.glob(str(tmp_path / "out" / "runs" / "*" / "events.out.tfevents.*"))]
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0}).Reload()
    assert "train/loss" in events.Tags()["scalars"]  # the trainer's own scalars: same run folder
    prefix = "attribution/saliency"
    assert [e.step for e in events.Scalars(f"{prefix}/probe_0/step_score/probability")] == steps
    assert [e.step for e in events.Scalars(f"{prefix}/mean/drift_ref/cosine")] == [2, 4]
    assert [e.step for e in events.Images(f"{prefix}/probe_1/heatmap")] == steps
    assert [e.step for e in events.Tensors(f"{prefix}/probe_1/table/text_summary")] == steps
    assert (run_dir / "plugins" / "inseq_lightning" / "attribution_saliency" / "step_4" / "probe_0.html").is_file()

    wandb_run = Path(glob.glob(str(wandb_offline / "wandb" / "offline-run-*"))[0])
    rows = history_rows(next(wandb_run.glob("run-*.wandb")))
    ours = [r for r in rows if f"{prefix}/probe_0/html/path" in r]
    assert [r["train/global_step"] for r in ours] == steps and all("trainer/global_step" not in r for r in ours)
    html = (wandb_run / "files" / ours[-1][f"{prefix}/probe_0/html/path"]).read_text()
    assert "probe_0 · saliency · step 4" in html
    assert any("train/loss" in r for r in rows)  # the trainer's run, not a run of our own
    assert ours[-1][f"{prefix}/probe_0/step_score/probability"] == pytest.approx(
        callback.reports[-1].results[0].step_scores["probability"], rel=1e-6)



def test_faithfulness_and_plausibility_reach_tensorboard_wandb_and_the_eval_metrics(hf_models, tmp_path,
                                                                                    wandb_offline):
    """AttributionCallback(faithfulness=True) in a real Trainer run: every probe's comprehensiveness,
    sufficiency, random baselines and plausibility values are TensorBoard and W&B scalars at every
    pass (read back with their own readers), equal to the report's, and the means are eval metrics
    (``eval_attribution/...``) where ``metric_for_best_model`` and EarlyStoppingCallback read them."""
    import wandb

    trainer = _trainer(hf_models, tmp_path / "out", report_to=["tensorboard", "wandb"], max_steps=2)
    callback = AttributionCallback.attach(trainer, make_probes(2), faithfulness=True,
                                          faithfulness_fractions=(0.2, 0.5))
    trainer.train()
    wandb.finish()
    steps = [0, 2]
    assert [r.step for r in callback.reports] == steps
    prefix = "attribution/saliency"
    names = ("comprehensiveness", "sufficiency", "comprehensiveness_random", "sufficiency_random",
             "soft_comprehensiveness", "evidence_average_precision", "evidence_reciprocal_rank")
    (run_dir,) = [Path(p).parent for p in glob.glob(str(tmp_path / "out" / "runs" / "*" / "events.out.tfevents.*"))]
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0}).Reload()
    wandb_run = Path(glob.glob(str(wandb_offline / "wandb" / "offline-run-*"))[0])
    rows = [r for r in history_rows(next(wandb_run.glob("run-*.wandb"))) if f"{prefix}/probe_0/comprehensiveness" in r]
    assert [r["train/global_step"] for r in rows] == steps
    evaluations = [h for h in trainer.state.log_history if "eval_loss" in h]
    last = callback.reports[-1]
    for name in names:
        expected = last.results[0].scalars()[name]
        assert math.isfinite(expected)
        logged = events.Scalars(f"{prefix}/probe_0/{name}")
        assert [e.step for e in logged] == steps
        assert logged[-1].value == pytest.approx(expected, rel=1e-6, abs=1e-7)
        assert rows[-1][f"{prefix}/probe_0/{name}"] == pytest.approx(expected, rel=1e-6, abs=1e-7)
        assert evaluations[-1][f"eval_{prefix}/mean/{name}"] == pytest.approx(last.means()[name], rel=1e-6, abs=1e-7)


def _train(hf_models, out, callbacks):
    trainer = _trainer(hf_models, out, callbacks, max_steps=6, eval_strategy="no", save_strategy="no")
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}, losses, trainer


def test_training_is_bit_identical_with_and_without_the_callback(hf_models, tmp_path):
    weights_a, losses_a, trainer = _train(hf_models, tmp_path / "a", [])
    dropouts = [m for m in trainer.model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(m.p > 0 for m in dropouts)
    callback = AttributionCallback(make_probes(2), attribution_strategy="steps", attribution_steps=1,
                                   step_scores=("probability", "entropy"), save_files=True)
    weights_b, losses_b, _ = _train(hf_models, tmp_path / "b", [callback])
    assert [r.step for r in callback.reports] == [0, 1, 2, 3, 4, 5, 6]
    assert len(losses_a) == 6 and losses_a == losses_b
    assert all(torch.equal(weights_a[n], weights_b[n]) for n in weights_a)
    start = dict(hf_models["gpt2"][0].named_parameters())
    assert any(not torch.equal(weights_a[n], start[n]) for n in weights_a)


def test_resume_from_checkpoint_continues_the_drift_history(hf_models, tmp_path):
    out = tmp_path / "out"
    first = AttributionCallback(make_probes(2), save_files=True)
    _trainer(hf_models, out, [first], max_steps=4).train()
    stored = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["stateful_callbacks"]
    assert [row["step"] for row in stored["AttributionCallback"]["attributes"]["history_state"]["history"]["probes"]
            ["probe_0"]["rows"]] == [0, 2, 4]

    second = AttributionCallback(make_probes(2), save_files=True)
    trainer = _trainer(hf_models, out, [second], max_steps=8, resume_state=True)
    trainer.train(resume_from_checkpoint=str(out / "checkpoint-4"))
    (restored,) = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, AttributionCallback)]
    rows = restored.history.probes["probe_0"].rows
    assert [row["step"] for row in rows] == [0, 2, 4, 6, 8]  # step 4 is not attributed again on resume
    assert rows[:3] == first.history.probes["probe_0"].rows
    assert restored.reports[-1].results[0].reference_step == 0
    assert restored.reports[-1].results[0].previous_step == 6


def test_arguments_are_validated():
    with pytest.raises(ValueError, match="attribution_strategy must be one of"):
        AttributionCallback(make_probes(1), attribution_strategy="sometimes")
    with pytest.raises(ValueError, match="attribution_steps >= 1"):
        AttributionCallback(make_probes(1), attribution_strategy="steps")
    state = AttributionCallback(make_probes(1), method="input_x_gradient").state()
    rebuilt = AttributionCallback(**json.loads(json.dumps(state["args"])))
    assert rebuilt.monitor.method == "input_x_gradient" and rebuilt.monitor.probes.names == ["probe_0"]


def test_evaluate_outside_training_is_a_snapshot(hf_models, tmp_path):
    callback = AttributionCallback(make_probes(2), attribution_strategy="no", save_files=True)
    trainer = _trainer(hf_models, tmp_path / "out", [callback], max_steps=2, eval_strategy="no", save_strategy="no")
    trainer.train()
    assert [(r.stage, r.step) for r in callback.reports] == [("fit", 0)]  # only the reference pass
    trainer.evaluate()  # eval mode, under no_grad in the evaluation loop: the guard enables gradients
    assert [(r.stage, r.step) for r in callback.reports] == [("fit", 0), ("validate", 2)]
    assert callback.reports[-1].results[0].step_scores["probability"] > 0
    assert [row["step"] for row in callback.history.probes["probe_0"].rows] == [0]


def test_without_trainer_tensorboard_gets_its_own_run_and_a_hint(hf_models, tmp_path):
    callback = AttributionCallback(make_probes(1), attribution_strategy="no")
    trainer = _trainer(hf_models, tmp_path / "out", [callback], report_to=["tensorboard"], max_steps=1,
                       eval_strategy="no", save_strategy="no")
    with pytest.warns(UserWarning, match="AttributionCallback.attach"):
        trainer.train()
    own = tmp_path / "out" / "runs" / "attributions"
    assert list(own.glob("events.out.tfevents.*")) and (own / "plugins" / "inseq_lightning" / "index.json").is_file()


@pytest.mark.parametrize("how", ["torch_compile argument", "compiled before the Trainer"])
def test_compiled_model_is_attributed_through_its_original_module(hf_models, tmp_path, how):
    """A compiled model (the Trainer's ``torch_compile=True`` or a model compiled by the user) is an
    ``OptimizedModule``: the callback attributes the original module (same weights, eager)."""
    from inseq_lightning.monitor import ProbeMonitor

    if how == "torch_compile argument":
        trainer = _trainer(hf_models, tmp_path / "out", torch_compile=True, torch_compile_backend="eager")
    else:
        trainer = _trainer(hf_models, tmp_path / "out", wrap=lambda m: torch.compile(m, backend="eager"))
    callback = AttributionCallback.attach(trainer, make_probes(2), step_scores=("probability",), strict=True)
    trainer.train()
    assert [r.step for r in callback.reports] == [0, 2, 4]
    assert type(callback.monitor._wrapper_cache.model).__name__ == "GPT2LMHeadModel"  # not through dynamo
    eager = getattr(trainer.model, "_orig_mod", trainer.model)
    expected, _ = ProbeMonitor(make_probes(2), step_scores=("probability",)).attribute_probes(eager, trainer.processing_class)
    for result in callback.reports[-1].results:
        assert result.step_scores["probability"] == pytest.approx(
            expected[result.probe.name][0].step_scores["probability"].mean().item(), rel=1e-5)
