"""Cost per attributed token of ``value_zeroing`` and ``reagent`` against ``saliency``.

Workload: the tiny GPT-2 (2 layers x 64, random weights), a 20-token prompt + 20 forced tokens (the
README's tiny workload), ``torch.set_num_threads(2)``, one warm-up, then ``--runs`` (5) alternating
rounds of every method; medians. ReAGent's cost grows with its probing rounds: on a random model the
stopping condition (target among the top 3 predictions) is rarely met, so it runs ``max_probe_steps``
rounds; the table gives its cost per round as well (rounds counted from its forwards).

Run: ``.venv/bin/python benchmarks/bench_new_methods.py [--runs 5] [--reagent-rounds 50]``.
"""

import argparse
import statistics
import time
import warnings

import torch

warnings.filterwarnings("ignore")
TEXT = " ".join(["the quick brown fox jumps over the lazy dog"] * 12)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--reagent-rounds", type=int, default=50, help="reagent's max_probe_steps")
    args = parser.parse_args()
    torch.set_num_threads(2)

    import inseq_lightning as il
    from inseq_lightning.attr.methods import reagent
    from inseq_lightning.tiny_models import tiny_gpt2

    probing_forwards = []  # reagent: an update and a stopping check per round, each one _forward call
    original_forward = reagent._Probing._forward

    def counted(self, *a, **k):
        probing_forwards.append(1)
        return original_forward(self, *a, **k)

    reagent._Probing._forward = counted

    model, tok = tiny_gpt2()
    wrapper = il.load_model(model, "saliency", tokenizer=tok)
    ids = tok(TEXT)["input_ids"]
    prompt, full = tok.decode(ids[:20]), tok.decode(ids[:40])
    methods = {
        "saliency": {},
        "value_zeroing": {},
        f"reagent (max_probe_steps={args.reagent_rounds})": {"max_probe_steps": args.reagent_rounds, "seed": 0},
    }
    forwards = []
    # a pre-hook: value_zeroing stops its forwards once the last layer's states are read
    handle = model.register_forward_pre_hook(lambda module, inputs: forwards.append(1))
    times: dict[str, list[float]] = {name: [] for name in methods}
    counts: dict[str, int] = {}
    tokens, rounds = None, 0
    try:
        for run in range(args.runs + 1):  # run 0: warm-up
            for name, kwargs in methods.items():
                forwards.clear()
                probing_forwards.clear()
                start = time.perf_counter()
                out = wrapper.attribute(prompt, full, method=name.split(" ")[0], step_scores=["probability"],
                                        show_progress=False, **kwargs)
                elapsed = time.perf_counter() - start
                tokens = len(out.sequence_attributions[0].generated)
                counts[name] = len(forwards)
                rounds = len(probing_forwards) // 2 if name.startswith("reagent") else rounds
                if run:
                    times[name].append(elapsed)
    finally:
        handle.remove()
    base = statistics.median(times["saliency"]) / tokens
    print(f"tiny GPT-2 (2x64), 20 + {tokens} tokens, 2 threads, median of {args.runs} alternating runs")
    print("| method | ms / attributed token | x saliency | forwards per call |")
    print("|---|---:|---:|---:|")
    for name in methods:
        per_token = statistics.median(times[name]) / tokens
        print(f"| {name} | {per_token * 1e3:.2f} | {per_token / base:.1f} | {counts[name]} |")
    name = next(n for n in methods if n.startswith("reagent"))
    if rounds:
        per_round = statistics.median(times[name]) / rounds
        print(f"\nreagent: {rounds} rounds, {per_round * 1e3:.1f} ms per round ({per_round / tokens * 1e3:.2f} ms per "
              f"token per round); inseq's default max_probe_steps=3000 would cost up to "
              f"{3000 * per_round / tokens:.1f} s per token on this random model")


if __name__ == "__main__":
    main()
