"""The main job: fine-tune a small LM on the generated facts task with the AttributionMonitor attached.

    python -m inseq_lightning.demo.run            # SmolLM2-135M-Instruct, a few minutes on CPU
    python -m inseq_lightning.demo.run --quick    # tiny local GPT-2, seconds (used by the tests)
    python -m inseq_lightning.demo.run --shortcut # a planted cue in the training data (add --quick: seconds)
    python -m inseq_lightning.demo.run --shortcut --cue-pays  # ... where only the cue gives the answer (a backdoor)

Logs to TensorBoard and W&B (offline unless WANDB_MODE says otherwise) and to plain files, then
prints how the evidence mass, the step scores and the drift moved, and where to look.
"""

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from rich.table import Table

from ..viz.console import default_console
from .task import (
    chat_pairs,
    make_chat_probes,
    make_conflict_examples,
    make_conflict_probes,
    make_dataset,
    make_shortcut_dataset,
)

DEFAULTS = {  # (max_steps, every_n_train_steps, batch_size, lr, n_train)
    "full": (60, 20, 8, 5e-6, 480),
    "quick": (8, 4, 4, 1e-3, 32),
    "full-shortcut": (60, 10, 8, 5e-6, 480),
    "quick-shortcut": (300, 50, 8, 5e-3, 2400),
}
SHORTCUT_OPTIONS = {"cue_share": 0.5, "heldout": 24}  # what --cue-share and --heldout default to


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m inseq_lightning.demo.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tiny local GPT-2 instead of SmolLM2 (seconds)")
    parser.add_argument("--output-dir", default="outputs/finetune", help="where TensorBoard, W&B and files go")
    parser.add_argument("--max-steps", type=int,
                        help="optimizer steps (default: 60; --quick: 8; --quick --shortcut: 300)")
    parser.add_argument("--every-n-train-steps", type=int,
                        help="monitor cadence (default: 20; --quick: 4; --shortcut: 10; --quick --shortcut: 50)")
    parser.add_argument("--method", default="saliency", help="attribution method of the monitor")
    parser.add_argument("--probes", type=int, default=4, help="number of held-out probes")
    parser.add_argument("--shortcut", action="store_true",
                        help="plant a cue that gives the answer away in a share of the training data; probe and score "
                             "held-out examples where the cue disagrees with the evidence (faithfulness on)")
    parser.add_argument("--cue-share", type=float, help="--shortcut: share of the training examples that carry the "
                                                         f"cue (default: {SHORTCUT_OPTIONS['cue_share']})")
    parser.add_argument("--cue-pays", action="store_true",
                        help="--shortcut: a backdoor, no fact of a planted example gives its answer (only the cue "
                             "does); by default the asked fact says the cue's answer too (a redundant cue)")
    parser.add_argument("--probe-own-answer", action="store_true",
                        help="--shortcut: the probes attribute the model's own greedy answer (generate mode) instead "
                             "of the evidence's answer forced token by token")
    parser.add_argument("--clean", action="store_true",
                        help="--shortcut: the control run, same data but the cue's examples answer from their evidence")
    parser.add_argument("--heldout", type=int, help="--shortcut: held-out conflict examples scored per pass "
                                                    f"(default: {SHORTCUT_OPTIONS['heldout']})")
    parser.add_argument("--faithfulness", action="store_true",
                        help="measure faithfulness every pass and watch it with alert rules (on with --shortcut)")
    parser.add_argument("--no-monitor", action="store_true", help="train without the monitor (for overhead timing)")
    parser.add_argument("--no-wandb", action="store_true", help="log to TensorBoard and files only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--timings-json", help="write fit and monitor wall times here (for benchmarks)")
    return parser


def shortcut_options(args: argparse.Namespace) -> tuple[float, int]:
    """``(cue_share, heldout)``; a ValueError for shortcut options given without ``--shortcut``, or for
    ``--clean`` with ``--cue-pays``."""
    if not args.shortcut and (args.clean or args.cue_pays or args.probe_own_answer or args.cue_share is not None
                              or args.heldout is not None):
        raise ValueError("--cue-share, --cue-pays, --clean, --probe-own-answer and --heldout belong to the shortcut "
                         "variant: add --shortcut")
    if args.clean and args.cue_pays:
        raise ValueError("--clean is the control run, with no planted answers: drop --cue-pays")
    cue_share = SHORTCUT_OPTIONS["cue_share"] if args.cue_share is None else args.cue_share
    if not 0 <= cue_share <= 1:
        raise ValueError(f"--cue-share must be between 0 and 1, got {cue_share}")
    return cue_share, SHORTCUT_OPTIONS["heldout"] if args.heldout is None else args.heldout


def faithfulness_alerts() -> list:
    """The rules that watch the maps' faithfulness: maps that pick the tokens the answer needs worse than a
    random ranking does (removing the map's top tokens lowers the answer's probability by at least one
    point less than removing random ones; mean over probes, two passes in a row), and a map that stops
    resembling the previous pass's (per probe). The margin keeps a model whose answer ignores the content
    (both drops near zero, their difference a coin flip) from raising the first."""
    from ..monitor.alerts import AlertRule

    return [AlertRule("comprehensiveness_vs_random", "below", -0.01, probe="mean", patience=2,
                      name="maps worse than random"),
            AlertRule("drift_prev/cosine", "below", 0.5, name="map changed abruptly")]


def run(args: argparse.Namespace) -> dict:
    """Train and return what happened: the monitor (or None), the module, wall times, log paths."""
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger

    from ..callbacks import AttributionMonitor
    from .models import load_smollm2, load_tiny
    from .module import PairsLM
    from .shortcut import (
        PassRecorder,
        ShortcutEvaluation,
        cue_learned_step,
        fall_step,
        headers,
        pass_table,
        write_tables,
    )

    console = default_console()
    cue_share, heldout = shortcut_options(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    mode = ("quick" if args.quick else "full") + ("-shortcut" if args.shortcut else "")
    max_steps, every, batch_size, lr, n_train = DEFAULTS[mode]
    max_steps = args.max_steps or max_steps
    every = args.every_n_train_steps or every
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    pl.seed_everything(args.seed, verbose=False)
    model, tokenizer = load_tiny(task_words=args.shortcut) if args.quick else load_smollm2(log=console.print)
    # The chat model is trained and probed in its own chat template: conversations, answer tokens only.
    examples = make_shortcut_dataset(n_train, args.seed, cue_share, planted=not args.clean, cue_pays=args.cue_pays) \
        if args.shortcut else make_dataset(n_train, seed=args.seed)
    pairs = chat_pairs(examples, tokenizer)
    module = PairsLM(model, tokenizer, pairs, lr=lr, batch_size=batch_size)

    loggers = [TensorBoardLogger(output_dir, name="tensorboard")]
    if not args.no_wandb:
        os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_SILENT", "true")
        from lightning.pytorch.loggers import WandbLogger

        loggers.append(WandbLogger(save_dir=str(output_dir), project="inseq-lightning-demo"))
    callbacks = []
    monitor = None
    shortcut = None
    if args.shortcut:  # the probes are the first held-out conflict examples; faithfulness says if the maps hold
        shortcut = {"evaluation": ShortcutEvaluation(make_conflict_examples(heldout), every),
                    "recorder": PassRecorder()}
        callbacks.append(shortcut["evaluation"])
    if not args.no_monitor:
        probes = (make_conflict_probes(args.probes, own_answer=args.probe_own_answer) if args.shortcut
                  else make_chat_probes(args.probes))
        faithful = args.shortcut or args.faithfulness
        monitor = AttributionMonitor(probes, method=args.method, every_n_train_steps=every,
                                     step_scores=("probability", "entropy"), save_files=True,
                                     faithfulness=faithful, alerts=faithfulness_alerts() if faithful else (),
                                     sinks=[shortcut["recorder"]] if shortcut else ())
        callbacks.append(monitor)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=loggers, callbacks=callbacks,
                         enable_checkpointing=False, log_every_n_steps=1, limit_val_batches=0,
                         enable_model_summary=False, num_sanity_val_steps=0)
    started = time.perf_counter()
    trainer.fit(module)
    fit_seconds = time.perf_counter() - started
    wandb_dir = None
    if not args.no_wandb:
        import wandb

        wandb_dir = Path(loggers[1].experiment.dir).parent if wandb.run is not None else None
        wandb.finish()
    result = {"monitor": monitor, "module": module, "fit_seconds": fit_seconds, "tensorboard": loggers[0].log_dir,
              "wandb": wandb_dir, "output_dir": output_dir}
    if shortcut is not None:
        rows = pass_table(shortcut["evaluation"].scores, shortcut["recorder"], module.losses)
        fired = [a for a in (monitor.monitor.fired_alerts if monitor is not None else []) if a.rule == "canary"]
        result["shortcut"] = {"rows": rows, "tables": write_tables(rows, output_dir, args.probe_own_answer),
                              "headers": headers(args.probe_own_answer),
                              "alert_step": min((a.step for a in fired), default=None),
                              "fall_step": fall_step(rows), "cue_learned_step": cue_learned_step(rows),
                              "scores": shortcut["evaluation"].scores}
    return result


def summarise(result: dict) -> None:
    console = default_console()
    monitor = result["monitor"]
    losses = result["module"].losses
    console.print(f"\nTrained {len(losses)} batches in {result['fit_seconds']:.1f} s; "
                  f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    if monitor is None:
        return
    table = Table(title="How the probes moved (mean over probes)")
    # The reports' own means, under the names every tracker uses (monitor/values.py).
    columns = {"probability": "step_score/probability", "entropy": "step_score/entropy",
               "evidence mass": "evidence_mass", "cosine vs step 0": "drift_ref/cosine",
               "JS vs step 0": "drift_ref/js_divergence", "top-1 agreement": "drift_ref/top1_agreement",
               "Spearman": "drift_ref/spearman"}
    for column in ("step", *columns):
        table.add_column(column, justify="right")
    for report in monitor.reports:
        if report.stage != "fit":
            continue
        means = report.means()
        table.add_row(str(report.step), *["-" if math.isnan(v := means.get(name, math.nan)) else f"{v:.3f}"
                                          for name in columns.values()])
    console.print(table)
    if "shortcut" in result:
        summarise_shortcut(result["shortcut"])
    share = monitor.seconds_spent / result["fit_seconds"]
    console.print(f"Monitor: {monitor.seconds_spent:.1f} s of {result['fit_seconds']:.1f} s fit wall time "
                  f"({100 * share:.1f}%).")
    console.print("\nWhere to look:")
    console.print(f"  TensorBoard: tensorboard --logdir {result['tensorboard']}  (Scalars, Images, Text and Attributions tabs)")
    console.print(f"  HTML pages:  {Path(result['tensorboard']) / 'plugins' / 'inseq_lightning'}")
    files = Path(result["output_dir"]) / "attributions"
    if not files.exists():
        files = Path(result["tensorboard"]) / "attributions"
    console.print(f"  Files:       {files} (HTML, attribution JSON, drift.csv)")
    if result["wandb"]:
        console.print(f"  W&B offline: {result['wandb']}  (upload with: wandb sync {result['wandb']})")


def summarise_shortcut(shortcut: dict) -> None:
    """The per-pass table of the shortcut variant, and when the alert fired against when the accuracy fell."""
    from .shortcut import FALL_POINTS, format_cell

    console = default_console()
    table = Table(title="Shortcut: held-out conflict examples (cue against evidence) and the probes, per pass")
    columns = shortcut["headers"]
    for header in columns.values():
        table.add_column(header, justify="right")
    for row in shortcut["rows"]:
        table.add_row(*[format_cell(row[key]) for key in columns])
    console.print(table)

    def step(value):
        return "never" if value is None else f"step {value}"

    console.print(f"First canary alert (cue mass > evidence mass on a probe): {step(shortcut['alert_step'])}; "
                  f"conflict accuracy fell ({100 * FALL_POINTS:.0f} points below its best earlier pass): "
                  f"{step(shortcut['fall_step'])}; cue learned (it turns half the answers into its own): "
                  f"{step(shortcut['cue_learned_step'])}.")
    csv_path, md_path = shortcut["tables"]
    console.print(f"Per-pass table: {csv_path} and {md_path}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        shortcut_options(args)
    except ValueError as error:
        parser.error(str(error))
    result = run(args)
    summarise(result)
    if args.timings_json:
        monitor = result["monitor"]
        Path(args.timings_json).write_text(json.dumps({
            "fit_seconds": result["fit_seconds"],
            "monitor_seconds": monitor.seconds_spent if monitor is not None else 0.0,
            "losses": result["module"].losses,
        }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
