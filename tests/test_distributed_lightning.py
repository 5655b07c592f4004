"""The Lightning callback under DDP on CPU (gloo, 2 processes, ``ddp_spawn``): probes are split
across ranks, gathered, and logged exactly once by rank zero, with the numbers a single process gets."""

import copy
import csv

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from inseq_lightning import FeatureAttributionOutput
from inseq_lightning.callbacks import AttributionMonitor
from inseq_lightning.demo.module import PairsLM
from inseq_lightning.demo.task import make_dataset, make_probes
from inseq_lightning.monitor import Probe, ProbeMonitor

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.timeout(600)]


def test_ddp_spawn_logs_each_step_once_with_single_process_numbers(hf_models, tmp_path):
    model, tok = hf_models["gpt2"]
    initial = copy.deepcopy(model)
    probes = make_probes(3)  # 3 probes on 2 ranks: shares of 2 and 1
    monitor = AttributionMonitor(probes, every_n_train_steps=2, step_scores=("probability",), save_files=True)
    logger = TensorBoardLogger(tmp_path, name="tb")
    module = PairsLM(copy.deepcopy(model), tok, [(e.prompt, e.answer) for e in make_dataset(32)], lr=1e-3)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=4, callbacks=[monitor],
                         logger=logger, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, log_every_n_steps=1, limit_val_batches=0)
    trainer.fit(module)

    # The spawned rank zero resolved the run folder; the main process's logger would pick a new version.
    (run_dir,) = [d for d in (tmp_path / "tb").glob("version_*") if (d / "attributions").is_dir()]
    root = run_dir / "attributions" / "attribution_saliency"
    rows = [r for r in csv.DictReader((root / "drift.csv").open()) if r["probe"] != "mean"]
    # every step once, every probe once per step, in probe order: no duplicates from rank 1
    assert [(r["step"], r["probe"]) for r in rows] == [(str(s), f"probe_{i}") for s in (0, 2, 4) for i in range(3)]
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0}).Reload()
    for i in range(3):
        assert [e.step for e in events.Scalars(f"attribution/saliency/probe_{i}/step_score/probability")] == [0, 2, 4]
        assert [e.step for e in events.Tensors(f"attribution/saliency/probe_{i}/table/text_summary")] == [0, 2, 4]

    # Step 0 (initial weights) and step 4 (the weights ddp_spawn hands back) equal single-process runs.
    for step, weights in ((0, initial), (4, module.model)):
        expected, _ = ProbeMonitor(probes, step_scores=("probability",)).attribute_probes(weights, tok)
        for i in range(3):
            logged = FeatureAttributionOutput.load(root / f"step_{step}" / f"probe_{i}.json")[0]
            single = expected[f"probe_{i}"][0]
            assert torch.allclose(logged.target_attributions, single.target_attributions, atol=1e-6, equal_nan=True)
            assert torch.allclose(logged.step_scores["probability"], single.step_scores["probability"], atol=1e-6)


def test_ddp_strict_failure_on_one_rank_stops_every_rank(hf_models, tmp_path):
    """probe_2 lands on rank 1 only; with strict=True the error must reach every rank (no rank left
    waiting in the gather) and stop the run."""
    model, tok = hf_models["gpt2"]
    probes = [*make_probes(2), Probe("Facts: " + "Mia keeps a red kite. " * 40, " x", name="too_long")]
    monitor = AttributionMonitor(probes, strict=True, save_files=True)
    module = PairsLM(copy.deepcopy(model), tok, [(e.prompt, e.answer) for e in make_dataset(32)], lr=1e-3)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=2, callbacks=[monitor],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path)
    with pytest.raises(Exception, match="too_long"):
        trainer.fit(module)
