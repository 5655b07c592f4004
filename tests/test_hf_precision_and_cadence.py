"""The HF callback under mixed precision (attributes in float32, training untouched) and its cadence warning."""

import copy
import warnings

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

from inseq_lightning.callbacks import AttributionCallback
from inseq_lightning.callbacks.hf import EvaluationCadenceWarning
from inseq_lightning.demo.module import PairsCollator
from inseq_lightning.demo.task import make_dataset, make_probes
from inseq_lightning.monitor import AttributionMonitorWarning, ProbeMonitor, attribution_guard

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
PAIRS = [(e.prompt, e.answer) for e in make_dataset(32, seed=0)]
STEP_SCORES = ("probability", "entropy")


def _trainer(hf_models, out, callbacks=(), **args):
    model, tok = hf_models["gpt2"]
    set_seed(0)
    model = copy.deepcopy(model)
    model.train()
    arguments = TrainingArguments(**{
        "output_dir": str(out), "max_steps": 4, "per_device_train_batch_size": 4, "learning_rate": 1e-3,
        "logging_steps": 1, "eval_strategy": "no", "save_strategy": "no", "report_to": "none", "use_cpu": True,
        "bf16": True, "seed": 0, "data_seed": 0, "remove_unused_columns": False, "disable_tqdm": True, **args})
    return Trainer(model=model, args=arguments, train_dataset=PAIRS, eval_dataset=PAIRS[:4],
                   data_collator=PairsCollator(tok, False, tok.eos_token_id), processing_class=tok,
                   callbacks=list(callbacks))


class _ForwardRecorder(TrainerCallback):
    """Records the model's instance-level ``forward`` (accelerate's autocast wrapper) at the hooks where the
    attribution callback attributes; placed before it it marks a pass as started, placed after it as ended."""

    def __init__(self, model_of, seen: list, pass_state: dict, starts_pass: bool):
        self.model_of, self.seen, self.pass_state, self.starts_pass = model_of, seen, pass_state, starts_pass

    def _record(self):
        self.seen.append(self.model_of().__dict__.get("forward"))
        self.pass_state["in_pass"] = self.starts_pass

    def on_train_begin(self, args, state, control, **kwargs):
        self._record()

    def on_step_end(self, args, state, control, **kwargs):
        self._record()


def _float32_copy(model):
    """The same weights in a model rebuilt from its config: no accelerate wrapper, plain float32."""
    rebuilt = type(model)(copy.deepcopy(model.config))
    rebuilt.load_state_dict({k: v.detach().clone() for k, v in model.state_dict().items()})
    return rebuilt.float().eval()


def test_bf16_training_is_attributed_in_float32_like_offline(hf_models, tmp_path):
    before, after, autocast_seen, pass_state = [], [], [], {"in_pass": False}
    callback = AttributionCallback(make_probes(2), attribution_strategy="steps", attribution_steps=2,
                                   step_scores=STEP_SCORES, save_files=False)
    trainer = _trainer(hf_models, tmp_path / "out")
    trainer.add_callback(_ForwardRecorder(lambda: trainer.model, before, pass_state, starts_pass=True))
    trainer.add_callback(callback)
    trainer.add_callback(_ForwardRecorder(lambda: trainer.model, after, pass_state, starts_pass=False))
    # Which forwards run under autocast: a block inside the model sees accelerate's autocast, if any.
    hook = trainer.model.transformer.h[0].register_forward_pre_hook(
        lambda *_: autocast_seen.append((pass_state["in_pass"], torch.is_autocast_enabled("cpu"))))
    trainer.train()
    hook.remove()

    offline = ProbeMonitor(make_probes(2), step_scores=STEP_SCORES)
    model, tok = _float32_copy(trainer.model), hf_models["gpt2"][1]
    report = offline.run(model, tok, step=4)
    live = callback.reports[-1]
    assert [r.step for r in callback.reports] == [0, 2, 4]
    for live_result, offline_result in zip(live.results, report.results, strict=True):
        for name in STEP_SCORES:
            assert live_result.step_scores[name] == pytest.approx(offline_result.step_scores[name], rel=1e-6)
        outputs, _ = offline.attribute_probes(model, tok, [live_result.probe])
        live_map = live_result.output.sequence_attributions[0].target_attributions
        offline_map = outputs[live_result.probe.name].sequence_attributions[0].target_attributions
        assert torch.allclose(live_map, offline_map, rtol=1e-5, atol=1e-7, equal_nan=True)

    wrapper = trainer.model.__dict__["forward"]  # accelerate's bf16 autocast wrapper, still in place
    assert hasattr(trainer.model, "_original_forward") and wrapper is not trainer.model._original_forward
    assert before == after == [wrapper] * 5  # put back, the very same object, after every pass
    assert {autocast for in_pass, autocast in autocast_seen if not in_pass} == {True}  # training: bf16
    assert {autocast for in_pass, autocast in autocast_seen if in_pass} == {False}  # attribution: float32


def test_the_guard_puts_accelerates_wrapper_back_when_the_pass_raises(hf_models, tmp_path):
    trainer = _trainer(hf_models, tmp_path / "out")
    model = trainer.accelerator.prepare_model(trainer.model.eval())  # what train() does: bf16 autocast wrapper
    wrapper = model.__dict__["forward"]
    untouched = copy.deepcopy(hf_models["gpt2"][0])
    with pytest.raises(RuntimeError, match="a failing pass"), attribution_guard(model), attribution_guard(untouched):
        assert model.forward is model._original_forward and "forward" not in untouched.__dict__
        logits = model(torch.tensor([[1, 2, 3]])).logits
        raise RuntimeError("a failing pass")
    assert model.__dict__["forward"] is wrapper and "forward" not in untouched.__dict__
    with torch.no_grad():
        reference = _float32_copy(model)(torch.tensor([[1, 2, 3]])).logits
        assert not torch.equal(model(torch.tensor([[1, 2, 3]])).logits, reference)  # bf16 again, as in training
    assert torch.equal(logits.detach(), reference)


def _weights_after_bf16_training(hf_models, out, callbacks):
    trainer = _trainer(hf_models, out, callbacks, max_steps=6)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}, losses


def test_bf16_training_is_bit_identical_with_and_without_the_callback(hf_models, tmp_path):
    weights_a, losses_a = _weights_after_bf16_training(hf_models, tmp_path / "a", [])
    callback = AttributionCallback(make_probes(2), attribution_strategy="steps", attribution_steps=1,
                                   step_scores=STEP_SCORES, save_files=False)
    weights_b, losses_b = _weights_after_bf16_training(hf_models, tmp_path / "b", [callback])
    assert [r.step for r in callback.reports] == [0, 1, 2, 3, 4, 5, 6]
    assert len(losses_a) == 6 and losses_a == losses_b
    assert all(torch.equal(weights_a[n], weights_b[n]) for n in weights_a)
    start = dict(hf_models["gpt2"][0].named_parameters())
    assert any(not torch.equal(weights_a[n], start[n]) for n in weights_a)


def test_eval_strategy_without_evaluations_warns_that_only_the_reference_pass_runs(hf_models, tmp_path):
    callback = AttributionCallback(make_probes(1), save_files=False)  # attribution_strategy="eval"
    trainer = _trainer(hf_models, tmp_path / "out", [callback], max_steps=2, bf16=False)
    with pytest.warns(EvaluationCadenceWarning, match=r"eval_strategy='no'.*attribution_strategy='steps'") as caught:
        trainer.train()
    assert [issubclass(w.category, AttributionMonitorWarning) for w in caught
            if issubclass(w.category, EvaluationCadenceWarning)] == [True]  # once, filtered with the monitor's
    assert [r.step for r in callback.reports] == [0]  # what the warning announces


def test_eval_strategy_with_evaluations_does_not_warn(hf_models, tmp_path):
    callback = AttributionCallback(make_probes(1), save_files=False)
    trainer = _trainer(hf_models, tmp_path / "out", [callback], max_steps=2, bf16=False, eval_strategy="steps",
                       eval_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", EvaluationCadenceWarning)
        trainer.train()
    assert [r.step for r in callback.reports] == [0, 1, 2]
