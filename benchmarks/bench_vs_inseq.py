"""inseq-lightning vs inseq 0.7.1 on identical workloads, in one process, alternating runs.

Prints the median wall time of each library per workload and the speed-up ratio, plus the peak
extra memory of one attribution (in a fresh, warmed-up subprocess per library: see
``peak_memory_child``).
Run: ``make bench`` (or ``.venv/bin/python benchmarks/bench_vs_inseq.py``).
"""

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
import warnings

import torch

warnings.filterwarnings("ignore")
THREADS = 2


WORKLOADS = {
    "tiny": "tiny GPT-2 (2x64), saliency + probability",
    "small": "GPT-2-small shape (12x768), saliency + probability",
    "small-vocab": "GPT-2-small shape, GPT-2's 50257-token vocabulary, saliency + probability",
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
                   "occlusion", "dummy")
}


def workload(name: str):
    from inseq_lightning.tiny_models import gpt2_tokenizer, tiny_gpt2

    if name.startswith("small-vocab"):  # the real GPT-2 output layer: 50257 x 768 (ids stay in the trained 400)
        model, tok = tiny_gpt2(n_layer=12, n_embd=768, n_head=12, vocab_size=50257)
    elif name.startswith("small"):
        model, tok = tiny_gpt2(n_layer=12, n_embd=768, n_head=12)
    else:
        model, tok = tiny_gpt2()
    ids = gpt2_tokenizer()(" ".join(["the quick brown fox jumps over the lazy dog"] * 6))["input_ids"]
    texts = {"full": (tok.decode(ids[:20]), tok.decode(ids[:40])),
             "warm-up": (tok.decode(ids[:4]), tok.decode(ids[:6]))}
    if name in METHOD_WORKLOADS:
        return model, tok, texts, name.removeprefix("tiny-"), ["probability"]
    method = "attention" if "attention" in name else "saliency"
    step_scores = [] if name.endswith("attention") else ["probability"]
    return model, tok, texts, method, step_scores


def runners(name: str, texts_key: str = "full"):
    """``{library: run}`` on the same model weights; ``run(key)`` attributes ``texts[key]``."""
    import inseq

    import inseq_lightning as il

    model, tok, texts, method, step_scores = workload(name)
    ref_model = copy.deepcopy(model)
    ref_model.set_attn_implementation("eager")
    ours = il.load_model(model, method, tokenizer=tok)
    ref = inseq.load_model(ref_model, method, tokenizer=copy.deepcopy(tok))

    def run_ref(key="full"):
        if method == "attention" and step_scores:
            # inseq 0.7.1 refuses step scores with attention (a "final step" method) and says to
            # compute them separately with method="dummy": that is what a user of it has to run.
            ref.attribute(*texts[key], show_progress=False)
            return ref.attribute(*texts[key], method="dummy", step_scores=step_scores, show_progress=False)
        return ref.attribute(*texts[key], step_scores=step_scores, show_progress=False)

    return {
        "inseq-lightning": lambda key="full": ours.attribute(*texts[key], step_scores=step_scores, show_progress=False),
        "inseq": run_ref,
    }


def time_workload(name: str, repeats: int) -> dict[str, float]:
    run = runners(name)
    for fn in run.values():  # warm-up
        fn()
    times = {k: [] for k in run}
    for _ in range(repeats):
        for key, fn in run.items():  # alternate so that machine noise hits both
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


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
    parser.add_argument("--memory-repeats", type=int, default=5)
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
        t = time_workload(key, args.repeats)
        mem = {lib: [peak_memory(key, lib) for _ in range(args.memory_repeats)] for lib in ("inseq", "inseq-lightning")}
        rss = {lib: statistics.median(m["rss_mib"] for m in runs) for lib, runs in mem.items()}
        tensors = {lib: statistics.median(m["tensors_mib"] for m in runs) for lib, runs in mem.items()}
        ref, ours = t["inseq"], t["inseq-lightning"]
        rows.append((known[key], ref, ours, ref / ours, rss["inseq"], rss["inseq-lightning"], tensors["inseq"],
                     tensors["inseq-lightning"]))
    print(f"torch threads: {THREADS}; 20-token prompt + 20 forced tokens; median of {args.repeats} alternating runs; "
          f"memory: median of {args.memory_repeats} fresh processes\n")
    print("| workload | inseq 0.7.1 (s) | inseq-lightning (s) | speed-up | peak RSS MiB inseq | peak RSS MiB ours "
          "| peak tensors MiB inseq | peak tensors MiB ours |")
    print("|---|---|---|---|---|---|---|---|")
    for label, ref, ours, ratio, rss_ref, rss_ours, ten_ref, ten_ours in rows:
        print(f"| {label} | {ref:.3f} | {ours:.3f} | {ratio:.1f}x | {rss_ref:.1f} | {rss_ours:.1f} | {ten_ref:.2f} "
              f"| {ten_ours:.2f} |")


if __name__ == "__main__":
    main()
