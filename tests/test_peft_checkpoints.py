"""PEFT adapter checkpoints (a real LoRA ``Trainer`` run) in ``load_model`` and ``inseq-lightning drift``."""

import csv
import json
import math
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import GPT2LMHeadModel, Trainer, TrainingArguments, set_seed

from inseq_lightning import load_model
from inseq_lightning.cli import main
from inseq_lightning.data import FeatureAttributionOutput
from inseq_lightning.demo.module import PairsCollator
from inseq_lightning.demo.task import make_dataset, make_probes
from inseq_lightning.drift_checkpoints import drift_across_checkpoints
from inseq_lightning.errors import ModelLoadingError
from inseq_lightning.monitor import ProbeMonitor
from inseq_lightning.sinks import FileSink
from inseq_lightning.tiny_models import tiny_gpt2

peft = pytest.importorskip("peft")
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]
STEPS = (2, 4, 6)
STEP_SCORES = ("probability", "entropy")
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A tiny GPT-2 saved as the base, then 6 LoRA training steps saving checkpoint-2, -4 and -6."""
    root = tmp_path_factory.mktemp("lora")
    model, tok = tiny_gpt2()
    base_dir = root / "base"
    model.save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    set_seed(0)
    base = GPT2LMHeadModel.from_pretrained(base_dir)  # as a user would: the adapter config then names base_dir
    lora = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], lora_dropout=0.0,
                                                     task_type="CAUSAL_LM"))
    arguments = TrainingArguments(
        output_dir=str(root / "out"), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-2,
        save_strategy="steps", save_steps=2, report_to="none", use_cpu=True, seed=0, data_seed=0,
        remove_unused_columns=False, disable_tqdm=True)
    Trainer(model=lora, args=arguments, train_dataset=[(e.prompt, e.answer) for e in make_dataset(32, seed=0)],
            data_collator=PairsCollator(tok, False, tok.eos_token_id), processing_class=tok).train()
    checkpoints = [root / "out" / f"checkpoint-{step}" for step in STEPS]
    probes = root / "probes.jsonl"
    probes.write_text("\n".join(json.dumps({"prompt": p.prompt, "target": p.target, "evidence": list(p.evidence),
                                            "name": p.name}) for p in make_probes(2)))
    return SimpleNamespace(root=root, base_dir=base_dir, checkpoints=checkpoints, probes=probes, tokenizer=tok)


def _merged(run, checkpoint) -> GPT2LMHeadModel:
    base = GPT2LMHeadModel.from_pretrained(run.base_dir)
    return peft.PeftModel.from_pretrained(base, checkpoint).merge_and_unload()


def _adapter_copy(checkpoint, copy, **config_changes) -> Path:
    """The adapter files of ``checkpoint`` alone (no tokenizer) in ``copy``, with ``adapter_config.json`` edited."""
    copy.mkdir()
    shutil.copy(checkpoint / "adapter_model.safetensors", copy)
    config = json.loads((checkpoint / "adapter_config.json").read_text())
    (copy / "adapter_config.json").write_text(json.dumps({**config, **config_changes}))
    return copy


def _probabilities(wrapped) -> torch.Tensor:
    probes = list(make_probes(2))
    out = wrapped.attribute([p.prompt for p in probes], [p.prompt + p.target for p in probes],
                            step_scores=["probability"], show_progress=False)
    return torch.cat([s.step_scores["probability"] for s in out.sequence_attributions])


def _numeric_rows(path) -> dict[tuple[str, str], dict[str, float]]:
    skip = {"step", "probe", "epoch", "stage", "method", "seconds"}
    with Path(path).open(newline="") as handle:
        return {(r["step"], r["probe"]): {k: float(v) if v else math.nan for k, v in r.items() if k not in skip}
                for r in csv.DictReader(handle)}


def test_checkpoints_hold_adapter_files_only(lora_run):
    for checkpoint in lora_run.checkpoints:
        assert (checkpoint / "adapter_config.json").is_file() and (checkpoint / "adapter_model.safetensors").is_file()
        assert not (checkpoint / "config.json").exists() and not (checkpoint / "model.safetensors").exists()
    config = json.loads((lora_run.checkpoints[0] / "adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]) == lora_run.base_dir


def test_drift_over_lora_checkpoints_equals_attributing_each_merged_model(lora_run, tmp_path, capsys):
    out = tmp_path / "drift"
    assert main(["drift", *map(str, lora_run.checkpoints), "--probes", str(lora_run.probes),
                 "--step-scores", *STEP_SCORES, "--output-dir", str(out)]) == 0
    assert "Attribution drift across checkpoints" in capsys.readouterr().out
    reference = tmp_path / "merged"
    monitor = ProbeMonitor(lora_run.probes, "saliency", STEP_SCORES, strict=True)
    for step, checkpoint in zip(STEPS, lora_run.checkpoints, strict=True):
        monitor.run(_merged(lora_run, checkpoint), lora_run.tokenizer, step, sinks=[FileSink(reference)])

    ours, merged = _numeric_rows(out / "drift.csv"), _numeric_rows(reference / "drift.csv")
    assert list(ours) == list(merged) == [(str(s), p) for s in STEPS for p in ("probe_0", "probe_1", "mean")]
    for key, row in merged.items():
        assert row.keys() == ours[key].keys()
        for name, value in row.items():
            assert ours[key][name] == pytest.approx(value, abs=TOLERANCE, nan_ok=True), (key, name)
    # The adapters moved during training, so the drift measured is real, not an artefact of zero LoRA weights.
    assert ours["6", "mean"]["drift_ref/js_divergence"] > 1e-6
    assert ours["6", "mean"]["step_score/probability"] != pytest.approx(ours["2", "mean"]["step_score/probability"],
                                                                         abs=1e-6)

    for step in STEPS:
        for probe in ("probe_0", "probe_1"):
            (seq,) = FeatureAttributionOutput.load(out / f"step_{step}" / f"{probe}.json").sequence_attributions
            (ref,) = FeatureAttributionOutput.load(reference / f"step_{step}" / f"{probe}.json").sequence_attributions
            assert [t.id for t in seq.target] == [t.id for t in ref.target]
            torch.testing.assert_close(seq.source_attributions, ref.source_attributions, atol=TOLERANCE, rtol=0,
                                       equal_nan=True)
            torch.testing.assert_close(seq.target_attributions, ref.target_attributions, atol=TOLERANCE, rtol=0,
                                       equal_nan=True)
            for name in STEP_SCORES:
                torch.testing.assert_close(seq.step_scores[name], ref.step_scores[name], atol=TOLERANCE, rtol=0)


def test_drift_loads_the_base_model_once_for_three_adapter_checkpoints(lora_run, tmp_path, monkeypatch):
    """Counted with a pass-through wrapper of GPT2LMHeadModel.from_pretrained, and checked by identity:
    every checkpoint is attributed on the same module object."""
    loads, attributed = [], []
    original_load, original_run = GPT2LMHeadModel.from_pretrained.__func__, ProbeMonitor.run

    def counting_load(cls, *args, **kwargs):
        loads.append(args[0])
        return original_load(cls, *args, **kwargs)

    def recording_run(self, model, *args, **kwargs):
        attributed.append(model)
        return original_run(self, model, *args, **kwargs)

    monkeypatch.setattr(GPT2LMHeadModel, "from_pretrained", classmethod(counting_load))
    monkeypatch.setattr(ProbeMonitor, "run", recording_run)
    reports = drift_across_checkpoints(lora_run.checkpoints, lora_run.probes, tmp_path / "drift", show_progress=False)
    assert [r.step for r in reports] == list(STEPS)
    assert [Path(p) for p in loads] == [lora_run.base_dir]
    assert len(attributed) == 3 and all(model is attributed[0] for model in attributed)
    # The adapter of the last checkpoint only: earlier ones were deleted, not piled up.
    lora_a = {n.split("lora_A.")[1].split(".")[0] for n, _ in attributed[0].named_parameters() if "lora_A." in n}
    assert lora_a == {"adapter_2"}


def test_load_model_attributes_an_adapter_checkpoint_with_its_adapters_on(lora_run):
    checkpoint = lora_run.checkpoints[-1]
    wrapped = load_model(checkpoint)
    assert any("lora_B" in name for name, _ in wrapped.model.named_parameters())
    assert Path(wrapped.tokenizer.name_or_path) == checkpoint  # the Trainer saved the tokenizer there
    with_adapters = _probabilities(wrapped)
    bare = _probabilities(load_model(lora_run.base_dir))
    merged = _probabilities(load_model(_merged(lora_run, checkpoint), tokenizer=lora_run.tokenizer))
    assert (with_adapters - bare).abs().max() > 1e-4
    torch.testing.assert_close(with_adapters, merged, atol=TOLERANCE, rtol=0)


def test_load_model_attributes_a_loaded_peft_model_through_its_base_model(lora_run):
    peft_model = peft.PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(lora_run.base_dir),
                                                lora_run.checkpoints[-1])
    wrapped = load_model(peft_model, tokenizer=lora_run.tokenizer)
    assert wrapped.model is peft_model.get_base_model()
    torch.testing.assert_close(_probabilities(wrapped),
                               _probabilities(load_model(lora_run.checkpoints[-1])), atol=0, rtol=0)


def test_an_adapter_without_a_tokenizer_uses_the_base_models(lora_run, tmp_path):
    bare = _adapter_copy(lora_run.checkpoints[-1], tmp_path / "no_tokenizer")
    wrapped = load_model(bare)
    assert Path(wrapped.tokenizer.name_or_path) == lora_run.base_dir
    torch.testing.assert_close(_probabilities(wrapped),
                               _probabilities(load_model(lora_run.checkpoints[-1])), atol=0, rtol=0)


def test_base_model_overrides_the_adapter_configs_base(lora_run, tmp_path):
    moved = _adapter_copy(lora_run.checkpoints[-1], tmp_path / "checkpoint-6", base_model_name_or_path="gpt2")
    with pytest.raises(ModelLoadingError, match=r"'gpt2' .* is not a local directory.*--base-model"):
        load_model(moved)
    torch.testing.assert_close(_probabilities(load_model(moved, base_model=lora_run.base_dir)),
                               _probabilities(load_model(lora_run.checkpoints[-1])), atol=0, rtol=0)
    out = tmp_path / "drift"
    assert main(["drift", str(moved), "--probes", str(lora_run.probes), "--base-model", str(lora_run.base_dir),
                 "--output-dir", str(out)]) == 0
    assert [(r["step"], r["probe"]) for r in csv.DictReader((out / "drift.csv").open())] == [
        ("6", "probe_0"), ("6", "probe_1"), ("6", "mean")]


def test_an_adapter_config_without_a_base_model_asks_for_one(lora_run, tmp_path):
    anonymous = _adapter_copy(lora_run.checkpoints[0], tmp_path / "anonymous", base_model_name_or_path=None)
    with pytest.raises(ModelLoadingError, match="names no base model.*--base-model"):
        load_model(anonymous)
    with pytest.raises(ModelLoadingError, match="names no base model"):
        drift_across_checkpoints([anonymous], lora_run.probes, tmp_path / "drift")
    assert not (tmp_path / "drift").exists()


def test_a_missing_base_model_directory_is_a_clear_error(lora_run, tmp_path):
    with pytest.raises(ModelLoadingError, match="is not a local directory.*never downloads"):
        load_model(lora_run.checkpoints[0], base_model=tmp_path / "deleted_base")
    with pytest.raises(ModelLoadingError, match="deleted_base.*is not a local directory"):
        drift_across_checkpoints(lora_run.checkpoints, lora_run.probes, tmp_path / "drift",
                                 base_model=tmp_path / "deleted_base")


def test_adapters_without_peft_installed_say_how_to_install_it(lora_run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # what `import peft` sees when it is not installed
    with pytest.raises(ModelLoadingError, match=r"pip install 'inseq-lightning\[peft\]'"):
        load_model(lora_run.checkpoints[0])
    with pytest.raises(ModelLoadingError, match=r"pip install 'inseq-lightning\[peft\]'"):
        drift_across_checkpoints(lora_run.checkpoints, lora_run.probes, tmp_path / "drift")


def test_mixed_full_and_adapter_checkpoints_are_refused(lora_run, tmp_path):
    full = tmp_path / "checkpoint-0"
    shutil.copytree(lora_run.base_dir, full)
    with pytest.raises(ModelLoadingError, match="Mixed checkpoints: .*checkpoint-0 hold full models"):
        drift_across_checkpoints([full, *lora_run.checkpoints], lora_run.probes, tmp_path / "drift")


def test_adapters_naming_different_bases_need_base_model(lora_run, tmp_path):
    other_base = tmp_path / "other_base"
    shutil.copytree(lora_run.base_dir, other_base)
    elsewhere = _adapter_copy(lora_run.checkpoints[-1], tmp_path / "checkpoint-8",
                              base_model_name_or_path=str(other_base))
    with pytest.raises(ModelLoadingError, match="different base models.*--base-model"):
        drift_across_checkpoints([lora_run.checkpoints[0], elsewhere], lora_run.probes, tmp_path / "drift")


def test_base_model_is_refused_for_full_checkpoints(lora_run, tmp_path):
    with pytest.raises(ModelLoadingError, match="base_model= applies to PEFT adapter checkpoints"):
        load_model(lora_run.base_dir, base_model=lora_run.base_dir)
    with pytest.raises(ModelLoadingError, match="--base-model applies to PEFT adapter checkpoints"):
        drift_across_checkpoints([lora_run.base_dir], lora_run.probes, tmp_path / "drift", base_model=lora_run.base_dir)
