"""The shortcut demo's measurements: held-out accuracy under a planted cue, and one table per pass.

At every monitoring pass :class:`ShortcutEvaluation` answers held-out conflict examples (the cue
present, the evidence pointing elsewhere; see :mod:`.task`) and their clean copies (a plain source
instead of the cue), greedily, and :class:`PassRecorder` (a sink of the monitor) keeps the pass's means and alerts.
:func:`pass_table` joins them with the training loss, one row per pass.

An answer is *right* when it names the evidence's colour and object ("blue boat") and not the
cue's; it *follows the cue* when it names the cue's ("green clock"). The format of the answer
does not matter ("Leo keeps a blue boat." is right), so the zero-shot model is scored fairly.

When the held-out accuracy *fell*: the first pass whose conflict accuracy is at least
:data:`FALL_POINTS` below the highest accuracy of the passes before it. When the cue was *learned*:
the first pass where the cue turns at least half of the answers into its own, i.e. the share of
conflict answers that follow the cue exceeds the share of their clean copies that do by
:data:`CUE_LEARNED_SHARE` or more (a model that says the cue's answer everywhere has a bias, not the cue).
"""

import csv
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from lightning.pytorch import Callback

from ..sinks import Sink
from ..utils.model_state import preserve_model_state
from .task import CUE_ANSWER, Example, chat_messages, without_cue

FALL_POINTS = 0.20  # a fall of 20 percentage points from the best earlier pass
CUE_LEARNED_SHARE = 0.5
MAX_NEW_TOKENS = 12


def outcome(answer: str, example: Example) -> str:
    """``"evidence"``, ``"cue"`` or ``"other"``: what a generated answer names."""
    text = " ".join(answer.lower().replace(".", " ").split())
    colour_object = " ".join(example.answer.strip(" .").split()[-2:])  # " a blue boat." -> "blue boat"
    if " ".join(CUE_ANSWER) in text:
        return "cue"
    return "evidence" if colour_object in text else "other"


def greedy_answers(model, tokenizer, examples: list[Example], batch_size: int = 32,
                   max_new_tokens: int = MAX_NEW_TOKENS) -> list[str]:
    """The model's greedy answers to the examples' user turns, in its chat template, batched (left
    padding). Under ``no_grad`` and in eval mode; the model's modes, gradients and the RNG streams are
    left as they were found."""
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    end = end if isinstance(end, int) and end != tokenizer.unk_token_id else tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end
    device = next(model.parameters()).device
    answers: list[str] = []
    with preserve_model_state(model), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the generation config's sampling settings, unused by greedy decoding
        model.eval()
        for start in range(0, len(examples), batch_size):
            prompts = [tokenizer.apply_chat_template(chat_messages(e)[:1], tokenize=False, add_generation_prompt=True)
                       for e in examples[start:start + batch_size]]
            ids = [tokenizer(p)["input_ids"] for p in prompts]  # as the training collator tokenizes
            width = max(map(len, ids))
            input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=device)
            mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
            out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=pad, eos_token_id=end)
            answers += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return answers


@dataclass
class HeldOutScores:
    step: int
    conflict_accuracy: float  # share of conflict examples answered from the evidence
    conflict_follows_cue: float  # share of conflict examples answered with the cue's answer
    clean_accuracy: float  # the same examples with a plain source instead of the cue
    clean_follows_cue: float  # ... answered with the cue's answer all the same (a bias, not the cue)
    answers: list[str] = field(default_factory=list)  # the conflict answers, for reading


class ShortcutEvaluation(Callback):
    """Scores the held-out conflict examples (and their clean copies) at the monitor's cadence: at the
    start of training and every ``every_n_train_steps`` optimizer steps. Logs ``shortcut/...`` to the
    trainer's loggers and keeps every pass in :attr:`scores`."""

    def __init__(self, conflict: list[Example], every_n_train_steps: int, batch_size: int = 32):
        if every_n_train_steps < 1:
            raise ValueError(f"every_n_train_steps must be a positive integer, got {every_n_train_steps!r}")
        self.conflict = list(conflict)
        self.clean = [without_cue(e) for e in self.conflict]
        self.every_n_train_steps = every_n_train_steps
        self.batch_size = batch_size
        self.scores: list[HeldOutScores] = []
        self._last_step: int | None = None

    def evaluate(self, model, tokenizer, step: int) -> HeldOutScores:
        answers = greedy_answers(model, tokenizer, self.conflict + self.clean, self.batch_size)
        conflict = [outcome(a, e) for a, e in zip(answers, self.conflict)]
        clean = [outcome(a, e) for a, e in zip(answers[len(self.conflict):], self.clean)]
        return HeldOutScores(step, conflict.count("evidence") / len(conflict), conflict.count("cue") / len(conflict),
                             clean.count("evidence") / len(clean), clean.count("cue") / len(clean),
                             answers[:len(self.conflict)])

    def _score(self, trainer, pl_module) -> None:
        scores = self.evaluate(pl_module.model, pl_module.tokenizer, trainer.global_step)
        self.scores.append(scores)
        metrics = {"shortcut/conflict_accuracy": scores.conflict_accuracy,
                   "shortcut/conflict_follows_cue": scores.conflict_follows_cue,
                   "shortcut/clean_accuracy": scores.clean_accuracy,
                   "shortcut/clean_follows_cue": scores.clean_follows_cue}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def on_train_start(self, trainer, pl_module) -> None:
        self._last_step = trainer.global_step
        self._score(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step != self._last_step and step % self.every_n_train_steps == 0:
            self._score(trainer, pl_module)
        self._last_step = step


class PassRecorder(Sink):
    """A monitor sink that keeps, for every training pass, the means over probes, how many probes had
    more cue mass than evidence mass, and the alerts fired."""

    def __init__(self):
        self.passes: dict[int, dict] = {}

    def log_report(self, report) -> None:
        if report.stage != "fit":
            return
        over = [r for r in report.results if r.cue_mass > r.evidence_mass]  # NaN compares False
        self.passes[report.step] = {"means": report.means(), "cue_over_evidence": len(over),
                                    "probes": len(report.results), "alerts": list(report.alerts)}


def pass_table(scores: list[HeldOutScores], recorder: PassRecorder, losses: list[float]) -> list[dict]:
    """One row per pass: the step, the mean training loss since the previous pass, the held-out
    scores, and the monitor's means (probability, evidence mass, cue mass, comprehensiveness)."""
    rows, previous = [], 0
    for score in scores:
        recorded = recorder.passes.get(score.step, {"means": {}, "cue_over_evidence": 0, "probes": 0, "alerts": []})
        means = recorded["means"]
        window = losses[previous:score.step]
        rows.append({
            "step": score.step,
            "train_loss": sum(window) / len(window) if window else math.nan,
            "conflict_accuracy": score.conflict_accuracy,
            "conflict_follows_cue": score.conflict_follows_cue,
            "clean_accuracy": score.clean_accuracy,
            "clean_follows_cue": score.clean_follows_cue,
            "probability": means.get("step_score/probability", math.nan),
            "evidence_mass": means.get("evidence_mass", math.nan),
            "cue_mass": means.get("cue_mass", math.nan),
            "comprehensiveness": means.get("comprehensiveness", math.nan),
            "cue_over_evidence": f"{recorded['cue_over_evidence']}/{recorded['probes']}",
            "alerts": ", ".join(sorted({a.probe for a in recorded["alerts"]})),
        })
        previous = score.step
    return rows


def fall_step(rows: list[dict]) -> int | None:
    """The first pass whose conflict accuracy is :data:`FALL_POINTS` or more below the best earlier pass."""
    best = -math.inf
    for row in rows:
        if row["conflict_accuracy"] <= best - FALL_POINTS + 1e-9:
            return row["step"]
        best = max(best, row["conflict_accuracy"])
    return None


def cue_learned_step(rows: list[dict]) -> int | None:
    """The first pass where the cue turns at least half of the answers into its own (see the module docstring)."""
    return next((row["step"] for row in rows
                 if row["conflict_follows_cue"] - row["clean_follows_cue"] >= CUE_LEARNED_SHARE - 1e-9), None)


HEADERS = {"step": "step", "train_loss": "train loss", "conflict_accuracy": "conflict accuracy",
           "conflict_follows_cue": "answers the cue", "clean_accuracy": "clean accuracy",
           "clean_follows_cue": "clean answers the cue's",
           "probability": "p(evidence answer)", "evidence_mass": "evidence mass", "cue_mass": "cue mass",
           "comprehensiveness": "comprehensiveness", "cue_over_evidence": "cue > evidence",
           "alerts": "canary fired"}


def format_cell(value) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.3f}"
    return str(value) if value not in ("", None) else "-"


def headers(own_answer: bool = False) -> dict[str, str]:
    """The table's columns; the probes' probability is that of the model's own answer when they attribute it."""
    return {**HEADERS, "probability": "p(own answer)"} if own_answer else dict(HEADERS)


def write_tables(rows: list[dict], directory: Path, own_answer: bool = False) -> tuple[Path, Path]:
    """``shortcut_passes.csv`` (full precision) and ``shortcut_passes.md`` (the README's table)."""
    columns = headers(own_answer)
    directory.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = directory / "shortcut_passes.csv", directory / "shortcut_passes.md"
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(columns.values()) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(format_cell(row[key]) for key in columns) + " |" for row in rows]
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path
