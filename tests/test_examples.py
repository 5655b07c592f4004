"""The scripts in examples/ run as a user would run them (a fresh process, relative output paths)
and produce what their docstrings promise: HTML views, TensorBoard runs, printed probe rows."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, cwd: Path) -> str:
    env = {**os.environ, "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, str(EXAMPLES / name)], cwd=cwd, env=env, capture_output=True, text=True,
                          check=False,  # the assertion below shows the output
                          timeout=600)
    assert done.returncode == 0, f"{name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series under ``run_dir``, read back with TensorBoard's own reader."""
    series = {}
    for folder in {events.parent for events in run_dir.rglob("events.out.tfevents.*")}:
        acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            series.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return series


def test_attribute_tiny_models_writes_both_html_views(tmp_path):
    stdout = run_example("attribute_tiny_models.py", tmp_path)
    for name, token in [("gpt2.html", "mat"), ("marian.html", "oir")]:
        html = (tmp_path / "outputs" / "examples" / name).read_text(encoding="utf-8")
        assert "<table" in html and token in html and "<script" not in html
    assert "HTML written under outputs/examples" in stdout


def probe_rows(stdout: str) -> list[tuple[int, float]]:
    return [(int(m.group(1)), float(m.group(2))) for m in re.finditer(r"step\s+(\d+)\b.*?p=([0-9.]+)", stdout)]


@pytest.mark.parametrize("name,run_glob,expected_steps", [
    ("lightning_monitor.py", "outputs/example-monitor", [0, 5, 10, 15, 20]),
    ("hf_trainer_callback.py", "outputs/example-hf/runs", [0, 5, 10, 15, 20]),
    ("trl_sft_chat.py", "outputs/example-trl/runs", [0, 4, 8]),
])
def test_monitoring_examples_attribute_the_probes_and_log_to_tensorboard(tmp_path, name, run_glob, expected_steps):
    stdout = run_example(name, tmp_path)
    rows = probe_rows(stdout)
    assert [step for step, _ in rows] == expected_steps, stdout[-2000:]
    assert all(0.0 < p <= 1.0 for _, p in rows)
    logged = scalars(tmp_path / run_glob)
    (tag,) = [t for t in logged if "/leo/" in t and t.endswith("step_score/probability")]
    # TensorBoard holds the same probabilities the script printed from the monitor's history.
    assert [step for step, _ in sorted(logged[tag])] == expected_steps
    for (step, value), (printed_step, printed) in zip(sorted(logged[tag]), rows):
        assert step == printed_step and abs(value - printed) < 1e-4


def test_readme_quick_start_runs_as_written(tmp_path):
    """The README's quick start, extracted and run as a script: the README stays true."""
    readme = (EXAMPLES.parent / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Quick start"):]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    script = tmp_path / "quick_start.py"
    script.write_text(code + "\nprint('column sums', [round(float(v), 4) for v in scores.nansum(0)])\n"
                             "print('html chars', len(html))\n", encoding="utf-8")
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, check=False,
                          timeout=600, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    assert done.returncode == 0, done.stderr[-3000:]
    sums = re.search(r"column sums \[(.*?)\]", done.stdout).group(1).split(", ")
    assert len(sums) >= 5 and all(float(v) == 1.0 for v in sums)  # the comment's promise
    assert int(re.search(r"html chars (\d+)", done.stdout).group(1)) > 1000
    assert (tmp_path / "attributions.json").stat().st_size > 0
