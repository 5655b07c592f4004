"""Context attribution (PECoRe): inseq-lightning vs inseq 0.7.1's ``attribute_context`` on identical workloads.

A tiny GPT-2 (2x64), a 30-token input context, a short current input and 10 greedily generated tokens (the
generation is part of the workload, as in both libraries' ``attribute_context``). In one process, alternating
runs; prints each library's median wall time, the ratio, and whether both selected the same tokens with the
same scores (after the warm-up run).
Run: ``.venv/bin/python benchmarks/bench_context.py [--repeats N] [workloads...]``.
"""

import argparse
import copy
import statistics
import sys
import warnings

import torch
from alternating import alternating_times

warnings.filterwarnings("ignore")
THREADS = 2

WORKLOADS = {
    "context": "tiny GPT-2 (2x64), 30-token context, 10 generated tokens: CTI kl_divergence, CCI saliency",
    "context-contrastive": "tiny GPT-2 (2x64), 30-token context, 10 generated tokens: CTI kl_divergence, "
                           "CCI saliency of contrast_prob_diff",
}
CONTEXT_SOURCE = ("Alice gave Bob a book, and Bob thanked Alice for the gift. The cat sat on the mat and looked at "
                  "the dog. Paris is the capital of France.")
CURRENT = "The cat sat on the"
CONTEXT_TOKENS, NEW_TOKENS = 30, 10


def fields(name: str, tokenizer) -> dict:
    """The arguments both libraries get (inseq's ``AttributeContextArgs`` fields)."""
    context = tokenizer.decode(tokenizer(CONTEXT_SOURCE)["input_ids"][:CONTEXT_TOKENS])
    # Greedy, and readable on random weights (which otherwise repeat one space token): no token twice, no lone
    # space, no token holding non-ASCII bytes.
    # (single tokens: suppress_tokens, one logits mask per step, bans them as bad_words_ids would, without
    # matching a hundred one-token "sequences" at every step)
    unreadable = [i for t, i in tokenizer.get_vocab().items()
                  if t == "Ġ" or any(ord(c) > 0x7E and c not in "ĠĊ" for c in t)]
    generation = {"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS, "do_sample": False,
                  "no_repeat_ngram_size": 1, "suppress_tokens": sorted(unreadable)}
    out = {"input_context_text": context, "input_current_text": CURRENT, "show_viz": False,
           "generation_kwargs": generation}
    if name == "context-contrastive":
        out["attributed_fn"] = "contrast_prob_diff"
    return out


def runners(name: str):
    """``{library: run}`` on the same weights; ``run()`` is one full ``attribute_context`` call."""
    import inseq
    from inseq.commands.attribute_context.attribute_context import attribute_context_with_model as inseq_context
    from inseq.commands.attribute_context.attribute_context_args import AttributeContextArgs as InseqArgs

    import inseq_lightning as il
    from inseq_lightning.tiny_models import tiny_gpt2

    model, tok = tiny_gpt2()
    ref_model = copy.deepcopy(model)
    ref_model.set_attn_implementation("eager")
    ours = il.load_model(model, "saliency", tokenizer=tok)
    ref = inseq.load_model(ref_model, "saliency", tokenizer=copy.deepcopy(tok))
    n_context = len(tok(fields(name, tok)["input_context_text"])["input_ids"])
    print(f"{name}: context of {n_context} tokens", file=sys.stderr, flush=True)

    arguments = fields(name, tok)  # built once: the tokenizer scan is the benchmark's setup, not the workload

    def run_ours():
        return il.attribute_context(il.AttributeContextArgs(**copy.deepcopy(arguments)), model=ours)

    def run_ref():
        return inseq_context(InseqArgs(**copy.deepcopy(arguments)), ref)

    return {"inseq-lightning": run_ours, "inseq": run_ref}


def same_result(ours, ref) -> str:
    """How far the two outputs are apart: the output, the selected tokens, the largest score difference."""
    if ours.output_current_tokens != ref.output_current_tokens:
        return "different outputs"
    if [c.cti_idx for c in ours.cci_scores] != [c.cti_idx for c in ref.cci_scores]:
        return "different context-sensitive tokens"
    pairs = list(zip(ours.cti_scores, ref.cti_scores, strict=True))
    for a, b in zip(ours.cci_scores, ref.cci_scores, strict=True):
        pairs += list(zip(a.all_scores, b.all_scores, strict=True))
    worst = max(abs(x - y) for x, y in pairs)
    return (f"{len(ours.output_current_tokens)} tokens, {len(ours.cci_scores)} context-sensitive, same selection; "
            f"largest score difference {worst:.1e}")


def time_workload(name: str, repeats: int) -> dict[str, list[float]]:
    run = runners(name)
    outputs = {key: fn() for key, fn in run.items()}  # warm-up
    print(f"{name}: {same_result(outputs['inseq-lightning'], outputs['inseq'])}", file=sys.stderr, flush=True)
    return alternating_times(run, repeats)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("workloads", nargs="*", help=f"any of {', '.join(WORKLOADS)} (default: all)")
    args = parser.parse_args()
    unknown = set(args.workloads) - set(WORKLOADS)
    if unknown:
        parser.error(f"unknown workloads {sorted(unknown)}; choose from {', '.join(WORKLOADS)}")
    torch.set_num_threads(THREADS)
    rows = []
    for key in args.workloads or list(WORKLOADS):
        times = time_workload(key, args.repeats)
        ref, ours = statistics.median(times["inseq"]), statistics.median(times["inseq-lightning"])
        ratios = sorted(r / o for r, o in zip(times["inseq"], times["inseq-lightning"], strict=True))
        rows.append([WORKLOADS[key], f"{ref:.3f}", f"{ours:.3f}", f"{ref / ours:.1f}x"])
        print(f"{key}: {ref:.3f} s / {ours:.3f} s = {ref / ours:.1f}x (runs: {ratios[0]:.1f}x to {ratios[-1]:.1f}x)",
              file=sys.stderr, flush=True)
    print(f"torch threads: {THREADS}; median of {args.repeats} alternating runs\n")
    print("| workload | inseq 0.7.1 (s) | inseq-lightning (s) | speed-up |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {' | '.join(row)} |")


if __name__ == "__main__":
    main()
