"""inseq-lightning vs inseq 0.7.1 on identical workloads, in one process, alternating runs.

Prints the median wall time of each library per workload and the speed-up ratio, plus the peak
extra memory of one attribution (in a fresh, warmed-up subprocess per library: see
``peak_memory_child``). Each workload's line on stderr gives the range of the per-run ratios; the
contrastive workload also prints how far its aggregated attributions are from inseq's.
Run: ``make bench`` (or ``.venv/bin/python benchmarks/bench_vs_inseq.py``).
"""

import argparse
import copy
import json
import statistics
import subprocess
import sys
import warnings

import torch
from alternating import alternating_times

warnings.filterwarnings("ignore")
THREADS = 2


WORKLOADS = {
    "tiny": "tiny GPT-2 (2x64), saliency + probability",
    "tiny-contrastive": "tiny GPT-2 (2x64), saliency of contrast_prob_diff (one contrast target)",
    "medium": "GPT-2 6x256, 50+50 tokens, input_x_gradient + probability",
    "small": "GPT-2-small shape (12x768), saliency + probability",
    "small-vocab": "GPT-2-small shape, GPT-2's 50257-token vocabulary, saliency + probability",
    "small-vocab-50": "GPT-2-small shape, 50257-token vocabulary, 50+50 tokens, saliency + probability",
    "tiny-attention": "tiny GPT-2 (2x64), attention",
    "tiny-attention-scores": "tiny GPT-2 (2x64), attention + probability (inseq: attention, then dummy for the scores)",
    "small-vocab-attention": "GPT-2-small shape, 50257-token vocabulary, attention",
    "small-vocab-attention-scores": "GPT-2-small shape, 50257-token vocabulary, attention + probability (inseq: "
                                    "attention, then dummy)",
}
# The other methods on the tiny model, with each library's default arguments (integrated
# gradients: 50 points). Run when named: `bench_vs_inseq.py methods` runs them all.
METHOD_WORKLOADS = {
    f"tiny-{method}": f"tiny GPT-2 (2x64), {method} + probability"
    for method in ("input_x_gradient", "integrated_gradients", "layer_integrated_gradients", "gradient_shap",
                   "occlusion", "dummy", "discretized_integrated_gradients", "sequential_integrated_gradients",
                   "lime")
}


TEXT = " ".join(["the quick brown fox jumps over the lazy dog"] * 12)
# The contrast target's continuation (after the same prompt), worded differently.
CONTRAST = " the cat sat on the mat and looked at the dog. Hello world, this is a tiny corpus for a tiny tokenizer."
LONG = ("medium", "small-vocab-50")  # 50-token prompt + 50 forced tokens; the others: 20 + 20
# Workloads whose attributions are compared between the libraries (printed, after the warm-up run).
PARITY_CHECKED = ("tiny-contrastive",)


def workload(name: str):
    """``(model, tokenizer, calls, method, kwargs)``: ``calls[key]`` holds the positional arguments
    of ``attribute`` (prompt, full text) and its per-text keyword arguments; ``kwargs`` the others."""
    from inseq_lightning.tiny_models import gpt2_tokenizer, tiny_gpt2

    if name.startswith("small-vocab"):  # the real GPT-2 output layer: 50257 x 768 (ids stay in the trained 400)
        model, tok = tiny_gpt2(n_layer=12, n_embd=768, n_head=12, vocab_size=50257)
    elif name.startswith("small"):
        model, tok = tiny_gpt2(n_layer=12, n_embd=768, n_head=12)
    elif name == "medium":
        model, tok = tiny_gpt2(n_layer=6, n_embd=256, n_head=8)
    else:
        model, tok = tiny_gpt2()
    ids, contrast_ids = gpt2_tokenizer()(TEXT)["input_ids"], gpt2_tokenizer()(CONTRAST)["input_ids"]
    n = 50 if name in LONG else 20
    calls = {}
    for key, (prompt, forced) in {"full": (n, n), "warm-up": (4, 2)}.items():
        texts, per_text = (tok.decode(ids[:prompt]), tok.decode(ids[:prompt + forced])), {}
        if name.endswith("contrastive"):
            per_text["contrast_targets"] = tok.decode(ids[:prompt] + contrast_ids[:forced])
        calls[key] = (texts, per_text)
    if name.endswith("contrastive"):
        return model, tok, calls, "saliency", {"attributed_fn": "contrast_prob_diff"}
    if name in METHOD_WORKLOADS:
        return model, tok, calls, name.removeprefix("tiny-"), {"step_scores": ["probability"]}
    method = "input_x_gradient" if name == "medium" else "attention" if "attention" in name else "saliency"
    return model, tok, calls, method, {"step_scores": [] if name.endswith("attention") else ["probability"]}


def runners(name: str):
    """``{library: run}`` on the same model weights; ``run(key)`` attributes ``calls[key]``."""
    import inseq

    import inseq_lightning as il

    model, tok, calls, method, kwargs = workload(name)
    ref_model = copy.deepcopy(model)
    ref_model.set_attn_implementation("eager")
    ours = il.load_model(model, method, tokenizer=tok)
    ref = inseq.load_model(ref_model, method, tokenizer=copy.deepcopy(tok))

    def run_ours(key="full"):
        texts, per_text = calls[key]
        return ours.attribute(*texts, **per_text, **kwargs, show_progress=False)

    def run_ref(key="full"):
        texts, per_text = calls[key]
        if method == "attention" and kwargs["step_scores"]:
            # inseq 0.7.1 refuses step scores with attention (a "final step" method) and says to
            # compute them separately with method="dummy": that is what a user of it has to run.
            ref.attribute(*texts, show_progress=False)
            return ref.attribute(*texts, method="dummy", **kwargs, show_progress=False)
        return ref.attribute(*texts, **per_text, **kwargs, show_progress=False)

    return {"inseq-lightning": run_ours, "inseq": run_ref}


def max_difference(ours, ref) -> float:
    """Largest difference between the step-wise aggregated attributions of the two outputs (inf
    where one has a value and the other none, or the tokens differ)."""
    a, b = ours[0].aggregate(), ref[0].aggregate()
    if [t.token for t in a.target] != [t.token for t in b.target]:
        return float("inf")
    worst = 0.0
    for side in ("source_attributions", "target_attributions"):
        x, y = getattr(a, side), getattr(b, side)
        if x is None or y is None:
            if (x is None) != (y is None):
                return float("inf")
            continue
        x, y = x.double(), y.double()
        if x.shape != y.shape or not torch.equal(x.isnan(), y.isnan()):
            return float("inf")
        worst = max(worst, (x - y).nan_to_num().abs().max().item())
    return worst


def time_workload(name: str, repeats: int) -> dict[str, list[float]]:
    """Each library's wall times, one per run, the two libraries alternating."""
    run = runners(name)
    outputs = {key: fn() for key, fn in run.items()}  # warm-up
    if name in PARITY_CHECKED:
        diff = max_difference(outputs["inseq-lightning"], outputs["inseq"])
        print(f"{name}: aggregated attributions, largest difference from inseq {diff:.1e} "
              f"({'within' if diff <= 1e-4 else 'NOT within'} 1e-4)", flush=True)
    return alternating_times(run, repeats)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_child(name: str, library: str) -> None:
    """Peak memory added by one attribution in a warm process, two ways.

    ``rss_mib``: resident memory. A short attribution runs first (one-time initialisation of
    torch's kernels and autograd is not the workload's), then the high-water mark is reset (Linux
    clear_refs) and the workload runs. Code pages of libraries touched for the first time are
    file-backed and shared: they are subtracted. On a tiny model this is a few hundred kB of
    tensors inside what the C heap happens to keep, so it moves by +-0.3 MiB between processes.

    ``tensors_mib``: the highest total of live tensor bytes during the workload, from the torch
    profiler's allocation events: exact and repeatable, blind to the C heap's own overhead."""
    torch.set_num_threads(THREADS)
    run = runners(name)[library]
    run("warm-up")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before, file_before = _status_kib("VmRSS"), _status_kib("RssFile")
    run()
    file_growth = _status_kib("RssFile") - file_before
    rss = (_status_kib("VmHWM") - file_growth - before) / 1024
    print(json.dumps({"rss_mib": rss, "tensors_mib": peak_live_tensor_bytes(run) / 2**20}))


def peak_live_tensor_bytes(run) -> int:
    """The running sum of the profiler's allocation (+) and free (-) events, at its highest."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def peak_memory(name: str, library: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, "--memory-child", name, library], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory-repeats", type=int, default=5, help="0: time only")
    parser.add_argument("--memory-child", nargs=2)
    known = {**WORKLOADS, **METHOD_WORKLOADS}
    parser.add_argument("workloads", nargs="*",
                        help=f"any of {', '.join(known)}, or 'methods' for all tiny-<method> ones (default: "
                             f"{', '.join(WORKLOADS)})")
    args = parser.parse_args()
    args.workloads = [w for name in args.workloads for w in (METHOD_WORKLOADS if name == "methods" else [name])]
    unknown = set(args.workloads) - set(known)
    if unknown:
        parser.error(f"unknown workloads {sorted(unknown)}; choose from {', '.join(known)} or 'methods'")
    if args.memory_child:
        peak_memory_child(*args.memory_child)
        return
    torch.set_num_threads(THREADS)
    rows = []
    for key in args.workloads or list(WORKLOADS):
        times = time_workload(key, args.repeats)
        ref, ours = statistics.median(times["inseq"]), statistics.median(times["inseq-lightning"])
        pairs = sorted(r / o for r, o in zip(times["inseq"], times["inseq-lightning"], strict=True))
        row = [known[key], f"{ref:.3f}", f"{ours:.3f}", f"{ref / ours:.1f}x"]
        if args.memory_repeats:
            mem = {lib: [peak_memory(key, lib) for _ in range(args.memory_repeats)]
                   for lib in ("inseq", "inseq-lightning")}
            for measure, digits in (("rss_mib", 1), ("tensors_mib", 2)):
                row += [f"{statistics.median(m[measure] for m in mem[lib]):.{digits}f}"
                        for lib in ("inseq", "inseq-lightning")]
        else:
            row += ["-"] * 4
        rows.append(row)
        print(f"{key}: {ref:.3f} s / {ours:.3f} s = {ref / ours:.1f}x (runs: {pairs[0]:.1f}x to {pairs[-1]:.1f}x); "
              f"peak RSS MiB {row[4]} / {row[5]}, peak tensors MiB {row[6]} / {row[7]} (inseq / ours)",
              file=sys.stderr, flush=True)
    print(f"torch threads: {THREADS}; 20-token prompt + 20 forced tokens unless the row says 50+50; median of "
          f"{args.repeats} alternating runs; memory: median of {args.memory_repeats} fresh processes\n")
    print("| workload | inseq 0.7.1 (s) | inseq-lightning (s) | speed-up | peak RSS MiB inseq | peak RSS MiB ours "
          "| peak tensors MiB inseq | peak tensors MiB ours |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {' | '.join(row)} |")

if __name__ == "__main__":
    main()
