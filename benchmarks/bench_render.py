"""What a monitoring pass spends outside attribution, heatmaps drawn by matplotlib (before) or as pixels (now).

One process, one model, one probe set: 50 probes of the demo task on the tiny GPT-2, a TensorBoard
sink with everything on (scalars, Markdown table, heatmap, HTML page), torch on 2 threads. The
paths take turns, ``--repeats`` passes each after one warm-up pass: the sinks' heatmaps drawn by
matplotlib (``attribution_figure`` on Agg) and logged with ``SummaryWriter.add_image``, as they were
before; drawn by :mod:`inseq_lightning.viz.heatmap` and logged as fast-encoded PNG (now); and not
at all (``log_figures=False``, the floor). For each: median seconds of attribution
(``report.seconds``) and outside it (the rest of ``ProbeMonitor.run``: summaries, drift and the
sink), and the median times to draw one probe's heatmap and for the sink to encode and log it.

    .venv/bin/python benchmarks/bench_render.py
"""

import argparse
import json
import statistics
import tempfile
import time
from contextlib import contextmanager
from types import SimpleNamespace
from unittest import mock

import torch
from torch.utils.tensorboard import SummaryWriter

from inseq_lightning.demo.task import make_probes
from inseq_lightning.monitor import ProbeMonitor
from inseq_lightning.sinks import TensorBoardSink, render
from inseq_lightning.tiny_models import tiny_gpt2
from inseq_lightning.viz.figure import attribution_figure, figure_to_rgb

THREADS, PROBES = 2, 50
PATHS = ("matplotlib (before)", "pixels (now)", "figures off")


def matplotlib_heatmap(seq, title=None, evidence_rows=()):
    """The sinks' heatmap as it was drawn before: a matplotlib figure on Agg, read back as pixels."""
    return SimpleNamespace(pixels=figure_to_rgb(attribution_figure(seq, title=title)))


def add_image_before(sink, tag, pixels, step):
    """The sink's heatmap logging as it was before: ``SummaryWriter.add_image`` (float rescale, default PNG level)."""
    sink.writer.add_image(tag, pixels, step, dataformats="HWC")


@contextmanager
def drawing(path: str):
    if path != PATHS[0]:
        yield
        return
    with mock.patch.object(render, "attribution_heatmap", matplotlib_heatmap), \
            mock.patch.object(TensorBoardSink, "_add_png", add_image_before):
        yield


def one_pass(monitor, model, tokenizer, sink, step: int) -> tuple[float, float, object]:
    started = time.perf_counter()
    report = monitor.run(model, tokenizer, step, sinks=[sink])
    total = time.perf_counter() - started
    return report.seconds, total - report.seconds, report


def draw_and_log_seconds(report, sink, probes: int = 10) -> tuple[float, float]:
    """Median seconds to draw one probe's heatmap (outside a pass: nothing shared, nothing cached), and
    for the TensorBoard sink to encode and log it."""
    draw, log = [], []
    for result in report.results[:probes]:
        started = time.perf_counter()
        pixels = render.result_image(result, report)
        drawn = time.perf_counter()
        sink._add_png("heatmap", pixels, 0)
        draw.append(drawn - started)
        log.append(time.perf_counter() - drawn)
    return statistics.median(draw), statistics.median(log)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    model, tokenizer = tiny_gpt2()
    monitor = ProbeMonitor(make_probes(PROBES))
    logs = tempfile.TemporaryDirectory()
    sinks = {path: TensorBoardSink(SummaryWriter(f"{logs.name}/{i}"), log_figures=path != PATHS[2])
             for i, path in enumerate(PATHS)}
    attribution = {path: [] for path in PATHS}
    outside = {path: [] for path in PATHS}
    step = 0
    for repeat in range(args.repeats + 1):  # the first round warms up and is not counted
        for path in PATHS:
            with drawing(path):
                seconds, rest, report = one_pass(monitor, model, tokenizer, sinks[path], step)
            step += 1
            if repeat:
                attribution[path].append(seconds)
                outside[path].append(rest)
    draw = {}
    for path in PATHS[:2]:
        with drawing(path):
            draw[path] = draw_and_log_seconds(report, sinks[path])
    pixels = render.result_image(report.results[0], report).shape
    logs.cleanup()
    medians = {path: (statistics.median(attribution[path]), statistics.median(outside[path])) for path in PATHS}
    print(f"{PROBES} probes, tiny GPT-2, TensorBoard sink, {THREADS} threads, median of {args.repeats} passes")
    print(f"{'heatmaps':<22}{'attribution s':>15}{'outside s':>11}{'draw ms/probe':>15}{'log image ms/probe':>20}")
    for path in PATHS:
        drawn, logged = (f"{1000 * t:.1f}" for t in draw[path]) if path in draw else ("-", "-")
        print(f"{path:<22}{medians[path][0]:>15.3f}{medians[path][1]:>11.3f}{drawn:>15}{logged:>20}")
    ratio = medians[PATHS[0]][1] / medians[PATHS[1]][1]
    print(f"outside attribution, before / now: {ratio:.1f}x; drawing one heatmap: "
          f"{draw[PATHS[0]][0] / draw[PATHS[1]][0]:.0f}x faster (now {pixels[1]}x{pixels[0]} px for probe_0)")
    if args.json:
        summary = {"probes": PROBES, "threads": THREADS, "repeats": args.repeats,
                   "seconds": {p: {"attribution": a, "outside": o} for p, (a, o) in medians.items()},
                   "draw_and_add_image_seconds_per_probe": draw, "outside_ratio_before_over_now": ratio}
        with open(args.json, "w") as handle:
            json.dump(summary, handle, indent=1)


if __name__ == "__main__":
    main()
