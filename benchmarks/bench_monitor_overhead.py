"""The monitor's overhead as a share of the fit's wall time, at the demo's default cadence.

Runs the demo's fine-tuning (same model, data, steps and seed) without and with the
AttributionMonitor, each fit in a fresh process, alternating, ``--repeats`` pairs, with a fixed
torch thread count. Also checks that every fit, monitored or not, has the same training losses. Reports
(1) the difference of median fit wall times over the median without the monitor, and the same
per back-to-back pair; (2) the time measured inside the monitor (attribution + every sink) over
the monitored fit's wall time, which is immune to run-to-run noise of training itself (on this
shared 2-core machine, fits of identical work vary by 10% or more).

    .venv/bin/python benchmarks/bench_monitor_overhead.py            # SmolLM2-135M, the demo's defaults
    .venv/bin/python benchmarks/bench_monitor_overhead.py --quick    # tiny GPT-2 (mechanics only)
    .venv/bin/python benchmarks/bench_monitor_overhead.py --faithfulness  # + faithfulness and its alert rules
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

THREADS = 2


def fit_once(monitored: bool, quick: bool, faithfulness: bool = False) -> dict:
    """One demo fit in a fresh process (as a real training job runs): nothing carries over between fits."""
    with tempfile.TemporaryDirectory() as out:
        timings = Path(out) / "timings.json"
        command = [sys.executable, "-m", "inseq_lightning.demo.run", "--output-dir", out, "--threads", str(THREADS),
                   "--timings-json", str(timings)] + (["--quick"] if quick else []) + ([] if monitored else ["--no-monitor"])
        command += ["--faithfulness"] if faithfulness and monitored else []
        env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": str(THREADS)}
        subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return json.loads(timings.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--faithfulness", action="store_true",
                        help="the monitor also measures faithfulness every pass, watched by the demo's alert rules")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    without, with_monitor, inside, losses = [], [], [], []
    for repeat in range(args.repeats):
        for monitored in (False, True):  # alternate, so drifts of the machine hit both sides
            result = fit_once(monitored, args.quick, args.faithfulness)
            (with_monitor if monitored else without).append(result["fit_seconds"])
            losses.append(result["losses"])
            if monitored:
                inside.append(result["monitor_seconds"] / result["fit_seconds"])
            print(f"repeat {repeat} monitor={monitored}: fit {result['fit_seconds']:.1f} s", flush=True)
    base, monitored = statistics.median(without), statistics.median(with_monitor)
    summary = {
        "model": "tiny GPT-2" if args.quick else "SmolLM2-135M-Instruct",
        "threads": THREADS,
        "faithfulness_and_alerts": args.faithfulness,
        "repeats": args.repeats,
        "fit_s_without": base,
        "fit_s_with": monitored,
        "overhead_share_by_difference": (monitored - base) / base,
        # pairs run back to back share the machine's state: their ratios are less noisy
        "overhead_share_per_pair": [(w - wo) / wo for wo, w in zip(without, with_monitor)],
        "overhead_share_inside_monitor": statistics.median(inside),
        "losses_identical_with_and_without_monitor": all(run == losses[0] for run in losses),
    }
    print(json.dumps(summary, indent=1))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(summary, handle, indent=1)


if __name__ == "__main__":
    main()
