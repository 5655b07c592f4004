"""Run under ``torchrun --nproc_per_node 2``: with ``strict=True``, a probe that fails on rank 1 only,
and then a sink that fails on rank 0 only (after the gather), must each raise ``MonitoringError`` on
*both* ranks (no rank may wait forever for the other). Each rank writes ``<out>/rank_<r>.txt`` (the
probe failure) and ``<out>/sink_rank_<r>.txt`` (the sink failure) with what it saw."""

import datetime
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

import torch.distributed as dist
from leave import leave_together

from inseq_lightning.demo.task import make_probes
from inseq_lightning.monitor import MonitoringError, Probe, ProbeMonitor
from inseq_lightning.sinks import Sink
from inseq_lightning.tiny_models import tiny_gpt2

out = Path(sys.argv[1])
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
model, tok = tiny_gpt2()
probes = [*make_probes(2), Probe("Facts: " + "Mia keeps a red kite. " * 40, " x", name="too_long")]  # rank 1's share
try:
    ProbeMonitor(probes, strict=True).run(model, tok, 0)
    seen = "no error"
except MonitoringError as error:
    seen = f"MonitoringError: {error}"
(out / f"rank_{dist.get_rank()}.txt").write_text(seen)


class BrokenSink(Sink):
    def log_report(self, report):
        raise OSError("tracker unreachable")


try:  # sinks only run on rank zero, after the other ranks have handed over their share
    ProbeMonitor(make_probes(2), strict=True).run(model, tok, 1, sinks=[BrokenSink()])
    seen = "no error"
except MonitoringError as error:
    seen = f"MonitoringError: {error}"
(out / f"sink_rank_{dist.get_rank()}.txt").write_text(seen)
leave_together()
