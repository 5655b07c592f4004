"""``inseq-lightning drift``: drift of a probe set across saved checkpoints, after the fact."""

import copy
import csv
import json
import shutil

import pytest
import torch

from inseq_lightning.cli import main
from inseq_lightning.drift_checkpoints import checkpoint_step, drift_across_checkpoints
from inseq_lightning.errors import ModelLoadingError


@pytest.fixture()
def checkpoints(hf_models, tmp_path):
    """checkpoint-0 and checkpoint-10 hold the same weights; checkpoint-20 is perturbed."""
    model, tok = hf_models["gpt2"]
    paths = []
    for step, noise in ((0, 0.0), (10, 0.0), (20, 0.3)):
        changed = copy.deepcopy(model)
        with torch.no_grad():
            generator = torch.Generator().manual_seed(step)
            for p in changed.parameters():
                p.add_(torch.randn(p.shape, generator=generator) * noise)
        path = tmp_path / f"checkpoint-{step}"
        changed.save_pretrained(path)
        tok.save_pretrained(path)
        paths.append(path)
    probes = tmp_path / "probes.jsonl"
    probes.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "the cat sat", "target": " on the mat", "evidence": ["cat"], "name": "cat"},
        {"prompt": "Hello world", "target": ", this is a cat", "name": "hello"},
    ]))
    return paths, probes


def test_cli_writes_drift_for_each_checkpoint_in_step_order(checkpoints, tmp_path, capsys):
    paths, probes = checkpoints
    out = tmp_path / "drift"
    # given out of order: the reference is still the lowest step
    assert main(["drift", str(paths[2]), str(paths[0]), str(paths[1]), "--probes", str(probes),
                 "--step-scores", "probability", "entropy", "--output-dir", str(out), "--tensorboard"]) == 0
    rows = list(csv.DictReader((out / "drift.csv").open()))
    assert [(r["step"], r["probe"]) for r in rows] == [(s, p) for s in ("0", "10", "20") for p in ("cat", "hello", "mean")]
    by = {(r["step"], r["probe"]): r for r in rows}
    assert by["0", "cat"]["drift_ref/cosine"] == ""  # the reference
    assert float(by["10", "cat"]["drift_ref/cosine"]) == pytest.approx(1.0)  # same weights
    assert float(by["20", "cat"]["drift_ref/cosine"]) < 0.999  # perturbed weights moved the map
    assert float(by["20", "cat"]["drift_ref/js_divergence"]) > 1e-4
    assert 0 < float(by["20", "cat"]["evidence_mass"]) < 1 and by["20", "hello"]["evidence_mass"] == ""
    assert (out / "step_20" / "cat.json").is_file() and (out / "step_20" / "hello.html").is_file()
    assert (out / "tensorboard" / "plugins" / "inseq_lightning" / "index.json").is_file()
    printed = capsys.readouterr().out
    assert "Attribution drift across checkpoints" in printed and "entropy" in printed


def test_bad_checkpoints_are_clear_errors(checkpoints, tmp_path):
    paths, probes = checkpoints
    with pytest.raises(ModelLoadingError, match="Not a checkpoint directory"):
        drift_across_checkpoints([paths[0], tmp_path / "nope"], probes, tmp_path / "o")
    twin = tmp_path / "other_run" / "checkpoint-10"  # another run's checkpoint at the same step
    shutil.copytree(paths[1], twin)
    with pytest.raises(ModelLoadingError, match="same step"):
        drift_across_checkpoints([paths[1], twin], probes, tmp_path / "o")


def test_checkpoint_steps_are_read_from_names(tmp_path):
    from pathlib import Path

    assert checkpoint_step(Path("run/checkpoint-500"), 3) == 500
    assert checkpoint_step(Path("epoch=1-step=120.ckpt_hf"), 3) == 120
    assert checkpoint_step(Path("final"), 3) == 3
