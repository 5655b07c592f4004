"""What faithfulness adds to a monitoring pass, and what its key/value prefix and content scope save.

The demo's four chat probes (``make_chat_probes(4)``), ``saliency`` with the ``probability`` and
``entropy`` step scores, on SmolLM2-135M-Instruct (the demo's model) or the tiny chat GPT-2 of
``--quick``. One process, a fixed torch thread count; every variant runs once per round, rounds
alternate, medians are reported. The variants:

- ``attribution``: the pass without faithfulness (``ProbeMonitor.attribute_probes``);
- ``faithfulness``: the faithfulness of the four probes as the monitor runs it by default (message
  content only, the template's prefix cached once for the pass, the unmasked probabilities read from
  the attribution's ``probability`` step score);
- ``no prefix cache``: the same rows run over whole sequences (``prefix_cache=False``);
- ``every context token``: ``faithfulness_scope="context"`` (the template's tokens removable too, so
  nothing before the first removable token to cache).

Each faithfulness variant is reported as a share of the attribution pass, and the prefix cache's
values are checked against whole sequences.

    .venv/bin/python benchmarks/bench_faithfulness.py            # SmolLM2-135M (needs the demo extra)
    .venv/bin/python benchmarks/bench_faithfulness.py --quick    # tiny chat GPT-2
"""

import argparse
import statistics
import warnings

import torch
from alternating import alternating_times

warnings.filterwarnings("ignore")
THREADS = 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the tiny chat GPT-2 instead of SmolLM2")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(THREADS)

    from inseq_lightning.demo.models import load_smollm2, load_tiny
    from inseq_lightning.demo.task import make_chat_probes
    from inseq_lightning.monitor import ProbeMonitor
    from inseq_lightning.monitor.faithfulness import PrefixCaches, faithfulness_seed, probe_faithfulness

    model, tok = load_tiny() if args.quick else load_smollm2(log=lambda *a: None)
    probes = make_chat_probes(4)
    plain = ProbeMonitor(probes, step_scores=("probability", "entropy"))
    content = ProbeMonitor(probes, step_scores=("probability", "entropy"), faithfulness=True)
    outputs, _ = plain.attribute_probes(model, tok)
    wrapper = plain._wrapper(model, tok)
    probe_by_name = {p.name: p for p in probes}
    candidates = {name: content._removable_content(wrapper, probe_by_name[name], out) for name, out in outputs.items()}

    def faithfulness(scope: str = "content", prefix_cache: bool = True) -> dict:
        prefixes = PrefixCaches()
        measured = {}
        for name, output in outputs.items():
            seq = output.sequence_attributions[0]
            measured[name] = probe_faithfulness(
                wrapper, seq, seed=faithfulness_seed(name, 0), prefix_cache=prefix_cache, prefixes=prefixes,
                candidates=candidates[name] if scope == "content" else None,
                probabilities=seq.step_scores["probability"].float().tolist())
        return measured

    cached, whole = faithfulness(), faithfulness(prefix_cache=False)
    gap = max(abs(cached[n].values[v] - whole[n].values[v]) for n in cached for v in cached[n].values)
    lengths = [len(o.sequence_attributions[0].target) for o in outputs.values()]
    removable = [len(c) for c in candidates.values()]
    print(f"model: {'tiny chat GPT-2' if args.quick else 'SmolLM2-135M-Instruct'}, {THREADS} threads, "
          f"{len(outputs)} probes of {min(lengths)}-{max(lengths)} tokens, "
          f"{min(removable)}-{max(removable)} of them message content")
    print(f"prefix cache vs whole sequences: largest difference of any value {gap:.1e}")
    times = alternating_times({
        "attribution": lambda: plain.attribute_probes(model, tok),
        "faithfulness": faithfulness,
        "no prefix cache": lambda: faithfulness(prefix_cache=False),
        "every context token": lambda: faithfulness(scope="context"),
    }, args.repeats)
    base = statistics.median(times["attribution"])
    print(f"{'variant':<22} {'median s':>9} {'share of the attribution pass':>31}")
    for name, values in times.items():
        median = statistics.median(values)
        share = "" if name == "attribution" else f"{median / base:.0%}"
        print(f"{name:<22} {median:>9.2f} {share:>31}")


if __name__ == "__main__":
    main()
