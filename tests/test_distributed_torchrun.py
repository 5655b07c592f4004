"""Multi-process runs under ``torchrun --nproc_per_node 2`` on CPU (gloo): the HF Trainer under DDP and
a model sharded with FSDP2 or FSDP1. Every step is logged once, by rank zero, with single-process numbers."""

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from inseq_lightning import FeatureAttributionOutput
from inseq_lightning.demo.task import make_probes
from inseq_lightning.monitor import ProbeMonitor
from inseq_lightning.tiny_models import tiny_gpt2

HERE = Path(__file__).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(HERE.parent)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(_free_port()),
               str(HERE / "distributed" / script), *args]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    if result.returncode != 0:
        # torchrun's summary fills the tail; the ranks' own errors (a C++ abort, a traceback) come earlier
        clues = [line for line in result.stderr.splitlines()
                 if any(word in line for word in ("Error", "error", "terminate", "Traceback", "Signal", "abort"))]
        pytest.fail("torchrun failed:\n" + "\n".join(clues[-40:]) + "\n--- stdout tail ---\n" + result.stdout[-2000:])
    return result


@pytest.mark.timeout(400)
def test_hf_trainer_ddp_logs_each_step_once_with_single_process_numbers(tmp_path):
    torchrun("hf_ddp_train.py", str(tmp_path))
    assert json.loads((tmp_path / "reports.json").read_text()) == {"steps": [0, 2, 4], "world_size": 2}
    root = tmp_path / "attributions" / "attribution_saliency"
    rows = [r for r in csv.DictReader((root / "drift.csv").open()) if r["probe"] != "mean"]
    assert [(r["step"], r["probe"]) for r in rows] == [(str(s), f"probe_{i}") for s in (0, 2, 4) for i in range(3)]
    initial, tok = tiny_gpt2()
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    probes = make_probes(3)
    for step, weights in ((0, initial), (4, final)):
        expected, _ = ProbeMonitor(probes).attribute_probes(weights, tok)
        for i in range(3):
            logged = FeatureAttributionOutput.load(root / f"step_{step}" / f"probe_{i}.json")[0]
            single = expected[f"probe_{i}"][0]
            assert torch.allclose(logged.target_attributions, single.target_attributions, atol=1e-6, equal_nan=True)
            assert torch.allclose(logged.step_scores["probability"], single.step_scores["probability"], atol=1e-6)


@pytest.mark.timeout(400)
@pytest.mark.parametrize("flavour", ["fsdp2", "fsdp1"])
def test_sharded_model_attributes_in_lockstep_with_single_process_numbers(tmp_path, flavour):
    """torch's FSDP2 (``fully_shard``) and FSDP1 run on CPU with gloo; Lightning's FSDP strategy
    and DeepSpeed refuse CPU (see tests/gpu/)."""
    torchrun("fsdp_attribute.py", str(tmp_path), flavour)
    names = ["probe_0", "probe_1", "probe_2"]
    assert json.loads((tmp_path / "reports.json").read_text()) == {"reports": [names, names], "world_size": 2}
    rows = [r for r in csv.DictReader((tmp_path / "drift.csv").open()) if r["probe"] != "mean"]
    assert [(r["step"], r["probe"]) for r in rows] == [(str(s), p) for s in (0, 1) for p in names]
    assert all(float(r["drift_ref/cosine"]) == pytest.approx(1.0) for r in rows if r["step"] == "1")
    model, tok = tiny_gpt2()
    expected, _ = ProbeMonitor(make_probes(3), step_scores=("probability",)).attribute_probes(model, tok)
    for name in names:
        logged = FeatureAttributionOutput.load(tmp_path / "step_0" / f"{name}.json")[0]
        assert torch.allclose(logged.target_attributions, expected[name][0].target_attributions, atol=1e-5,
                              equal_nan=True)
        assert torch.allclose(logged.step_scores["probability"], expected[name][0].step_scores["probability"],
                              atol=1e-6)


@pytest.mark.timeout(400)
def test_strict_failure_on_one_rank_raises_on_every_rank(tmp_path):
    torchrun("strict_failure.py", str(tmp_path))
    for rank in (0, 1):
        seen = (tmp_path / f"rank_{rank}.txt").read_text()
        assert seen.startswith("MonitoringError") and "too_long" in seen, (rank, seen)
        seen = (tmp_path / f"sink_rank_{rank}.txt").read_text()
        assert seen.startswith("MonitoringError") and "tracker unreachable" in seen, (rank, seen)
