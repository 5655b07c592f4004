"""GPU checks of monitoring under sharded training, for a machine with CUDA (not run in CI).

    torchrun --nproc_per_node <gpus> tests/gpu/sharded_checks.py <out_dir>

Each check trains a tiny GPT-2 for 4 steps with a monitor attributing 3 probes every 2 steps,
then compares the logged attributions of the final step with a single-process attribution of the
final weights (rank zero). Checks: Lightning ``strategy="fsdp"``; the HF Trainer with FSDP2 via
accelerate; the HF Trainer with DeepSpeed ZeRO-3 (skipped when ``deepspeed`` is not installed).
Results go to ``<out_dir>/sharded_checks.json``; a check that hangs is caught by the caller's timeout.
"""

import copy
import json
import sys
import traceback
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

import torch
import torch.distributed as dist

from inseq_lightning.demo.module import PairsCollator, PairsLM
from inseq_lightning.demo.task import make_dataset, make_probes
from inseq_lightning.monitor import ProbeMonitor
from inseq_lightning.tiny_models import tiny_gpt2

PAIRS = [(e.prompt, e.answer) for e in make_dataset(64)]
PROBES = make_probes(3)


def _compare(reports, final_model, tok) -> dict:
    """Max abs difference between the last logged report and one process on the final weights."""
    expected, _ = ProbeMonitor(PROBES).attribute_probes(final_model.float().cpu(), tok)
    last = reports[-1]
    diff = 0.0
    for result in last.results:
        a = result.output[0].target_attributions.float().cpu()
        b = expected[result.probe.name][0].target_attributions
        diff = max(diff, float((a.nan_to_num() - b.nan_to_num()).abs().max()))
    return {"steps": [r.step for r in reports], "max_abs_diff": diff, "ok": diff < 1e-3}


def lightning_fsdp(out: Path) -> dict:
    import lightning.pytorch as pl

    from inseq_lightning.callbacks import AttributionMonitor

    model, tok = tiny_gpt2()
    monitor = AttributionMonitor(PROBES, every_n_train_steps=2, save_files=True)
    trainer = pl.Trainer(accelerator="gpu", devices=dist.get_world_size(), strategy="fsdp", max_steps=4,
                         callbacks=[monitor], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         default_root_dir=out / "lightning_fsdp", limit_val_batches=0)
    module = PairsLM(model, tok, PAIRS, lr=1e-3)
    trainer.fit(module)
    if not trainer.is_global_zero:
        return {}
    with torch.no_grad():  # the full weights, gathered by Lightning's checkpoint API
        state = trainer.strategy.lightning_module_state_dict()
    final = copy.deepcopy(tiny_gpt2()[0])
    final.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})
    return _compare(monitor.reports, final, tok)


def hf_trainer(out: Path, **sharding) -> dict:
    from transformers import Trainer, TrainingArguments

    from inseq_lightning.callbacks import AttributionCallback

    model, tok = tiny_gpt2()
    model.train()
    args = TrainingArguments(output_dir=str(out), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-3,
                             save_strategy="no", report_to="none", remove_unused_columns=False, **sharding)
    trainer = Trainer(model=model, args=args, train_dataset=PAIRS, processing_class=tok,
                      data_collator=PairsCollator(tok, False, tok.eos_token_id))
    callback = AttributionCallback.attach(trainer, PROBES, attribution_strategy="steps", attribution_steps=2,
                                          save_files=True)
    trainer.train()
    trainer.save_model(out / "final")
    if not trainer.is_world_process_zero():
        return {}
    from transformers import AutoModelForCausalLM

    return _compare(callback.reports, AutoModelForCausalLM.from_pretrained(out / "final"), tok)


def main() -> None:
    out = Path(sys.argv[1])
    checks = {
        "lightning_fsdp": lambda: lightning_fsdp(out),
        "hf_fsdp2": lambda: hf_trainer(out / "hf_fsdp2", fsdp="full_shard",
                                       fsdp_config={"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["GPT2Block"]}),
        "hf_deepspeed_zero3": lambda: hf_trainer(out / "hf_ds", deepspeed={
            "zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto",
            "train_batch_size": "auto", "gradient_accumulation_steps": "auto"}),
    }
    results = {}
    for name, check in checks.items():
        if name == "hf_deepspeed_zero3":
            try:
                import deepspeed  # noqa: F401
            except ImportError:
                results[name] = {"skipped": "deepspeed is not installed"}
                continue
        try:
            results[name] = check()
        except Exception as error:  # noqa: BLE001 - report every check
            results[name] = {"error": f"{type(error).__name__}: {error}", "trace": traceback.format_exc()[-2000:]}
    if not dist.is_initialized() or dist.get_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "sharded_checks.json").write_text(json.dumps(results, indent=1))
        print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "trace"} for k, v in results.items()}, indent=1))


if __name__ == "__main__":
    main()
