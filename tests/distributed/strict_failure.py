"""Run under ``torchrun --nproc_per_node 2``: with ``strict=True``, a probe that fails on rank 1 only
must raise ``MonitoringError`` on *both* ranks (rank 0 must not wait forever in the gather).
Each rank writes ``<out>/rank_<r>.txt`` with what it saw."""

import datetime
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

import torch.distributed as dist

from inseq_lightning.demo.task import make_probes
from inseq_lightning.monitor import MonitoringError, Probe, ProbeMonitor
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
dist.barrier()
dist.destroy_process_group()
