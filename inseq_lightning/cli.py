"""Command line: ``inseq-lightning attribute`` attributes texts and writes the HTML, JSON and console views."""

import argparse
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
