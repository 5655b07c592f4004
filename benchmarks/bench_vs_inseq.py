"""inseq-lightning vs inseq 0.7.1 on identical workloads, in one process, alternating runs.

Prints the median wall time of each library per workload and the speed-up ratio, plus the peak
extra memory of one attribution (measured in a fresh subprocess per library, ru_maxrss delta).
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


def workload(name: str):
    from inseq_lightning.tiny_models import gpt2_tokenizer, tiny_gpt2

    if name.startswith("small"):
        model, tok = tiny_gpt2(n_layer=12, n_embd=768, n_head=12)
    else:
        model, tok = tiny_gpt2()
    ids = gpt2_tokenizer()(" ".join(["the quick brown fox jumps over the lazy dog"] * 6))["input_ids"]
    prompt = tok.decode(ids[:20])
    full = tok.decode(ids[:40])
    method = "attention" if name.endswith("attention") else "saliency"
    step_scores = [] if method == "attention" else ["probability"]
    return model, tok, prompt, full, method, step_scores


def runners(name: str):
    import inseq

    import inseq_lightning as il

    model, tok, prompt, full, method, step_scores = workload(name)
    ref_model = copy.deepcopy(model)
    ref_model.set_attn_implementation("eager")
    ours = il.load_model(model, method, tokenizer=tok)
    ref = inseq.load_model(ref_model, method, tokenizer=copy.deepcopy(tok))
    return {
        "inseq-lightning": lambda: ours.attribute(prompt, full, step_scores=step_scores, show_progress=False),
        "inseq": lambda: ref.attribute(prompt, full, step_scores=step_scores, show_progress=False),
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
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_child(name: str, library: str) -> None:
    """Peak resident memory added by a first attribution in a fresh process: the high-water mark is
    reset (Linux clear_refs) after the models are built, so loading does not hide the attribution's peak."""
    torch.set_num_threads(THREADS)
    fn = runners(name)[library]
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kib("VmRSS")
    fn()
    print(json.dumps({"delta_mib": (_status_kib("VmHWM") - before) / 1024}))


def peak_memory(name: str, library: str) -> float:
    out = subprocess.run([sys.executable, __file__, "--memory-child", name, library], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["delta_mib"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory-child", nargs=2)
    args = parser.parse_args()
    if args.memory_child:
        peak_memory_child(*args.memory_child)
        return
    torch.set_num_threads(THREADS)
    rows = []
    workloads = {
        "tiny": "tiny GPT-2 (2x64), saliency + probability",
        "small": "GPT-2-small shape (12x768), saliency + probability",
        "tiny-attention": "tiny GPT-2 (2x64), attention",
    }
    for key, label in workloads.items():
        t = time_workload(key, args.repeats)
        mem_ours, mem_ref = peak_memory(key, "inseq-lightning"), peak_memory(key, "inseq")
        rows.append((label, t["inseq"], t["inseq-lightning"], t["inseq"] / t["inseq-lightning"], mem_ref, mem_ours))
    print(f"torch threads: {THREADS}; 20-token prompt + 20 forced tokens; median of {args.repeats} alternating runs\n")
    print("| workload | inseq 0.7.1 (s) | inseq-lightning (s) | speed-up | peak extra MiB inseq | peak extra MiB ours |")
    print("|---|---|---|---|---|---|")
    for label, ref, ours, ratio, mem_ref, mem_ours in rows:
        print(f"| {label} | {ref:.3f} | {ours:.3f} | {ratio:.1f}x | {mem_ref:.0f} | {mem_ours:.0f} |")


if __name__ == "__main__":
    main()
