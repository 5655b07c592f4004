"""TRL's ``SFTTrainer`` on a chat dataset, and LoRA (PEFT) models in training, under both callbacks.

The expected answer tokens come from the rendered text's character offsets; the expected LoRA
attributions come from the trained model with its adapters merged, attributed outside training.
"""

import copy
import glob
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_chat_probes import _answer_token_ids  # expected answer tokens, from the rendered text's offsets
from transformers import Trainer, TrainingArguments, set_seed
from trl import SFTConfig, SFTTrainer

from inseq_lightning.callbacks import AttributionCallback, AttributionMonitor
from inseq_lightning.demo.module import PairsCollator, PairsLM
from inseq_lightning.demo.task import make_dataset, make_probes
from inseq_lightning.monitor import Probe, ProbeMonitor
from inseq_lightning.tiny_models import chat_tokenizer, tiny_gpt2, tiny_llama

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]
EXAMPLES = make_dataset(32, seed=0)
CHATS = Dataset.from_list([{"messages": [{"role": "user", "content": e.prompt},
                                         {"role": "assistant", "content": e.answer.strip()}]} for e in EXAMPLES])
HELD_OUT = make_dataset(2, seed=1234)
CHAT_PROBES = [Probe([{"role": "system", "content": "Answer from the facts."}, {"role": "user", "content": e.prompt},
                      {"role": "assistant", "content": e.answer.strip()}], evidence=(e.evidence,), name=f"chat_{i}")
               for i, e in enumerate(HELD_OUT)]
STEP_SCORES = ("probability", "entropy")


def _tiny_chat_llama():
    """The tiny chat model with attention dropout on (so the bit-identical checks cover the RNG)."""
    model, tok = tiny_llama(tokenizer=copy.deepcopy(chat_tokenizer()), attention_dropout=0.1)
    return model.train(), tok


# ---- TRL ----------------------------------------------------------------------------------------
def _sft_train(out: Path, probes=None, report_to="none"):
    model, tok = _tiny_chat_llama()
    args = SFTConfig(output_dir=str(out), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-3,
                     logging_steps=1, save_strategy="no", report_to=report_to, use_cpu=True, seed=0, data_seed=0,
                     disable_tqdm=True)  # TRL's own defaults otherwise: gradient checkpointing, bf16
    trainer = SFTTrainer(model=model, args=args, train_dataset=CHATS, processing_class=tok)
    callback = None
    if probes is not None:
        callback = AttributionCallback.attach(trainer, probes, step_scores=STEP_SCORES, attribution_strategy="steps",
                                              attribution_steps=2)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return trainer, callback, losses


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """Four SFTTrainer steps on the conversations, attributing the chat probes at steps 0, 2 and 4."""
    out = tmp_path_factory.mktemp("sft")
    return out, *_sft_train(out, CHAT_PROBES, report_to=["tensorboard"])


def test_sft_trainer_logs_the_assistants_answer_tokens_into_its_own_run(sft_run):
    out, trainer, callback, _ = sft_run
    steps = [0, 2, 4]
    assert [r.step for r in callback.reports] == steps
    (run_dir,) = {Path(p).parent for p in glob.glob(str(out / "runs" / "*" / "events.out.tfevents.*"))}
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0}).Reload()
    assert "train/loss" in events.Tags()["scalars"]  # the SFTTrainer's own scalars: same run folder
    tok = trainer.processing_class
    prefix = "attribution/saliency"
    for probe, result in zip(CHAT_PROBES, callback.reports[-1].results, strict=True):
        expected = _answer_token_ids(tok, probe.messages, probe.target)
        assert [t.id for t in result.output[0].generated] == expected
        table = events.Tensors(f"{prefix}/{probe.name}/table/text_summary")
        assert [e.step for e in table] == steps
        header = next(line for line in table[-1].tensor_proto.string_val[0].decode().splitlines()
                      if line.startswith("| token |"))
        columns = [c.strip() for c in header.split("|")[2:-1]]
        assert len(columns) == len(expected) and "im" not in " ".join(columns)  # no <|im_end|>, no role names
        mass = events.Scalars(f"{prefix}/{probe.name}/message_mass/1_user")
        assert [e.step for e in mass] == steps
        assert mass[-1].value == pytest.approx(result.message_mass["1_user"], rel=1e-6) and 0 < mass[-1].value < 1
        probability = events.Scalars(f"{prefix}/{probe.name}/step_score/probability")
        assert [e.step for e in probability] == steps and all(0 < e.value <= 1 for e in probability)


def test_sft_training_is_bit_identical_with_and_without_the_callback(sft_run, tmp_path):
    _, with_callback, _, losses_b = sft_run
    without, _, losses_a = _sft_train(tmp_path / "plain")
    assert len(losses_a) == 4 and all(math.isfinite(loss) for loss in losses_a)
    assert losses_a == losses_b
    weights_a, weights_b = dict(without.model.named_parameters()), dict(with_callback.model.named_parameters())
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[n], weights_b[n]) for n in weights_a)
    start = dict(_tiny_chat_llama()[0].named_parameters())
    assert any(not torch.equal(weights_a[n], start[n]) for n in weights_a)  # training moved them


# ---- LoRA, live -----------------------------------------------------------------------------------
def _lora(model, target_modules):
    set_seed(0)  # the adapters' initial weights
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=target_modules, lora_dropout=0.1,
                                            task_type="CAUSAL_LM"))
    return lora.train()


def _assert_attributed_with_adapters_on(report, lora, tok, probes):
    """The last pass's step scores are those of the merged model, not those of the base model."""
    merged = copy.deepcopy(lora).merge_and_unload()
    expected = ProbeMonitor(probes, step_scores=STEP_SCORES, strict=True).run(merged, tok, report.step)
    with lora.disable_adapter():
        base = ProbeMonitor(probes, step_scores=STEP_SCORES, strict=True).run(lora.get_base_model(), tok, report.step)
    assert [r.probe.name for r in report.results] == [r.probe.name for r in expected.results]
    for logged, merged_result, base_result in zip(report.results, expected.results, base.results, strict=True):
        for name in STEP_SCORES:
            assert logged.step_scores[name] == pytest.approx(merged_result.step_scores[name], abs=1e-5, rel=0)
            assert abs(logged.step_scores[name] - base_result.step_scores[name]) > 1e-6


def _weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _hf_lora_train(out: Path, with_callback: bool):
    model, tok = tiny_gpt2()
    lora = _lora(model, ["c_attn"])
    args = TrainingArguments(output_dir=str(out), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
                             logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=0, data_seed=0,
                             remove_unused_columns=False, disable_tqdm=True)
    trainer = Trainer(model=lora, args=args, train_dataset=[(e.prompt, e.answer) for e in EXAMPLES],
                      data_collator=PairsCollator(tok, False, tok.eos_token_id), processing_class=tok)
    callback = None
    if with_callback:
        callback = AttributionCallback.attach(trainer, make_probes(2), step_scores=STEP_SCORES, save_files=False,
                                              attribution_strategy="steps", attribution_steps=2)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return lora, tok, callback, losses


def test_hf_trainer_with_lora_is_unaffected_and_attributed_with_adapters_on(tmp_path):
    lora_a, _, _, losses_a = _hf_lora_train(tmp_path / "a", with_callback=False)
    lora_b, tok, callback, losses_b = _hf_lora_train(tmp_path / "b", with_callback=True)
    assert [r.step for r in callback.reports] == [0, 2, 4]
    assert len(losses_a) == 4 and all(math.isfinite(loss) for loss in losses_a) and losses_a == losses_b
    weights_a, weights_b = _weights(lora_a), _weights(lora_b)
    assert weights_a.keys() == weights_b.keys() and any("lora_" in n for n in weights_a)
    assert all(torch.equal(weights_a[n], weights_b[n]) for n in weights_a)
    assert all(m.training for n, m in lora_b.named_modules() if "lora_dropout" in n)  # dropout still on
    _assert_attributed_with_adapters_on(callback.reports[-1], lora_b, tok, make_probes(2))


def _lightning_lora_train(tmp_path: Path, with_callback: bool):
    pl.seed_everything(0)
    model, tok = _tiny_chat_llama()
    lora = _lora(model, ["q_proj", "v_proj"])
    pairs = [(tok.apply_chat_template(c["messages"][:1], tokenize=False, add_generation_prompt=True),
              c["messages"][1]["content"]) for c in CHATS]
    module = PairsLM(lora, tok, pairs, lr=1e-2, batch_size=4)
    monitor = AttributionMonitor(CHAT_PROBES, every_n_train_steps=2, step_scores=STEP_SCORES, save_files=False)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=4, callbacks=[monitor] if with_callback else [],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=0,
                         num_sanity_val_steps=0, deterministic=True)
    trainer.fit(module)
    return module, monitor


def test_lightning_with_lora_is_unaffected_and_attributed_with_adapters_on(tmp_path):
    module_a, _ = _lightning_lora_train(tmp_path / "a", with_callback=False)
    module_b, monitor = _lightning_lora_train(tmp_path / "b", with_callback=True)
    assert [r.step for r in monitor.reports] == [0, 2, 4]
    assert monitor.model is module_b.model.get_base_model()  # unwrapped in place: the live weights
    assert len(module_a.losses) == 4 and all(math.isfinite(loss) for loss in module_a.losses)
    assert module_a.losses == module_b.losses
    weights_a, weights_b = _weights(module_a.model), _weights(module_b.model)
    assert weights_a.keys() == weights_b.keys() and any("lora_" in n for n in weights_a)
    assert all(torch.equal(weights_a[n], weights_b[n]) for n in weights_a)
    _assert_attributed_with_adapters_on(monitor.reports[-1], module_b.model, module_b.tokenizer, CHAT_PROBES)
