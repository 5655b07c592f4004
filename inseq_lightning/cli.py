"""Command line: ``inseq-lightning attribute`` attributes texts and writes the HTML, JSON and console views."""

import argparse
import math
import sys
from pathlib import Path

from . import load_model
from .viz import attributions_html, print_attributions
from .viz.console import default_console

DEMO_PROMPT = "Question: where is the key? Context: the key is under the red box. Answer:"
DEMO_TARGET = DEMO_PROMPT + " the key is under the red box."


def _demo_model():
    """The tiny local GPT-2 the project builds itself (random weights: the demo shows the mechanics)."""
    from .tiny_models import tiny_gpt2

    return tiny_gpt2()


def attribute_command(args: argparse.Namespace) -> int:
    console = default_console()
    if args.model:
        model = load_model(args.model, args.method)
    else:
        hf_model, tokenizer = _demo_model()
        model = load_model(hf_model, args.method, tokenizer=tokenizer)
    inputs = args.input or [DEMO_PROMPT]
    targets = args.target or ([DEMO_TARGET] if not args.model else None)
    if targets is not None and len(targets) != len(inputs):
        console.print("[red]--target must be given once per --input[/red]")
        return 2
    out = model.attribute(inputs, targets, step_scores=args.step_scores, show_progress=True,
                          generation_args={"max_new_tokens": args.max_new_tokens})
    aggregated = [s.aggregate() for s in out]
    print_attributions(aggregated, console=console)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    html_path = output_dir / "attributions.html"
    html_path.write_text(attributions_html(aggregated, title=f"{args.method} attributions"), encoding="utf-8")
    json_path = output_dir / "attributions.json"
    out.save(json_path, overwrite=True)
    console.print(f"\nHTML heatmap: [bold]{html_path}[/bold]\nRaw scores (JSON): [bold]{json_path}[/bold]")
    return 0


def _cell(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.3f}"


def drift_command(args: argparse.Namespace) -> int:
    from rich.table import Table

    from .drift_checkpoints import drift_across_checkpoints

    console = default_console()
    reports = drift_across_checkpoints(args.checkpoints, args.probes, args.output_dir, method=args.method,
                                       step_scores=args.step_scores, tokenizer=args.tokenizer,
                                       tensorboard=args.tensorboard, base_model=args.base_model)
    table = Table(title=f"Attribution drift across checkpoints ({args.method}, mean over probes)")
    # The report's own means, under the names every tracker uses (monitor/values.py).
    names = [*[f"step_score/{s}" for s in args.step_scores], "evidence_mass", "drift_ref/cosine",
             "drift_ref/js_divergence", "drift_ref/spearman", "drift_ref/tokens_compared"]
    table.add_column("step", justify="right")
    for name in names:
        table.add_column(name, justify="right")
    for report in reports:
        means = report.means()
        table.add_row(str(report.step), *[_cell(means.get(name, math.nan)) for name in names])
    console.print(table)
    console.print(f"Per probe: [bold]{Path(args.output_dir) / 'drift.csv'}[/bold]; pages and JSON under step_<N>/")
    if args.tensorboard:
        console.print(f"TensorBoard: tensorboard --logdir {Path(args.output_dir) / 'tensorboard'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="inseq-lightning", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    attribute = sub.add_parser("attribute", help="attribute texts and write HTML + JSON")
    attribute.add_argument("--model", help="local model directory (default: a tiny demo GPT-2 built locally)")
    attribute.add_argument("--method", default="saliency")
    attribute.add_argument("--input", action="append", help="prompt or source text (repeatable)")
    attribute.add_argument("--target", action="append", help="forced target text (repeatable)")
    attribute.add_argument("--step-scores", nargs="*", default=["probability"])
    attribute.add_argument("--max-new-tokens", type=int, default=10)
    attribute.add_argument("--output-dir", default="outputs")
    attribute.set_defaults(func=attribute_command)
    drift = sub.add_parser("drift", help="attribution drift of a probe set across saved checkpoints")
    drift.add_argument("checkpoints", nargs="+",
                       help="checkpoint directories: full models (save_pretrained format) or PEFT adapter checkpoints")
    drift.add_argument("--probes", required=True, help="probes as .jsonl or .csv (prompt, target, evidence, name)")
    drift.add_argument("--method", default="saliency")
    drift.add_argument("--step-scores", nargs="*", default=["probability"])
    drift.add_argument("--tokenizer", help="tokenizer directory (default: each checkpoint's own, else the base model's)")
    drift.add_argument("--base-model", help="base model directory of adapter checkpoints, loaded once "
                       "(default: base_model_name_or_path in their adapter_config.json)")
    drift.add_argument("--output-dir", default="outputs/drift")
    drift.add_argument("--tensorboard", action="store_true", help="also write a TensorBoard run")
    drift.set_defaults(func=drift_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
