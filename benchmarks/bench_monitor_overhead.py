"""The monitor's overhead as a share of the fit's wall time, at the demo's default cadence.

Runs the demo's fine-tuning (same model, data, steps and seed) without and with the
AttributionMonitor, alternating, ``--repeats`` pairs, with a fixed torch thread count. Reports
(1) the difference of median fit wall times over the median without the monitor, and the same
per back-to-back pair; (2) the time measured inside the monitor (attribution + every sink) over
the monitored fit's wall time, which is immune to run-to-run noise of training itself (on this
shared 2-core machine, fits of identical work vary by 10% or more).

    .venv/bin/python benchmarks/bench_monitor_overhead.py            # SmolLM2-135M, the demo's defaults
    .venv/bin/python benchmarks/bench_monitor_overhead.py --quick    # tiny GPT-2 (mechanics only)
"""

import argparse
import json
import os
import statistics
import tempfile

import torch

THREADS = 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    os.environ["WANDB_MODE"] = "offline"
    from inseq_lightning.demo.run import build_parser, run

    without, with_monitor, inside = [], [], []
    for repeat in range(args.repeats):
        for monitored in (False, True):  # alternate, so drifts of the machine hit both sides
            with tempfile.TemporaryDirectory() as out:
                argv = ["--output-dir", out, "--threads", str(THREADS)] + (["--quick"] if args.quick else [])
                if not monitored:
                    argv.append("--no-monitor")
                result = run(build_parser().parse_args(argv))
            (with_monitor if monitored else without).append(result["fit_seconds"])
            if monitored:
                inside.append(result["monitor"].seconds_spent / result["fit_seconds"])
            print(f"repeat {repeat} monitor={monitored}: fit {result['fit_seconds']:.1f} s", flush=True)
    base, monitored = statistics.median(without), statistics.median(with_monitor)
    summary = {
        "model": "tiny GPT-2" if args.quick else "SmolLM2-135M-Instruct",
        "threads": THREADS,
        "repeats": args.repeats,
        "fit_s_without": base,
        "fit_s_with": monitored,
        "overhead_share_by_difference": (monitored - base) / base,
        # pairs run back to back share the machine's state: their ratios are less noisy
        "overhead_share_per_pair": [(w - wo) / wo for wo, w in zip(without, with_monitor)],
        "overhead_share_inside_monitor": statistics.median(inside),
    }
    print(json.dumps(summary, indent=1))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(summary, handle, indent=1)


if __name__ == "__main__":
    main()
