"""Run under ``torchrun --nproc_per_node 2``: attribute the probes on a model sharded with torch's FSDP2
(``fully_shard``) or FSDP1 (``FullyShardedDataParallel``), gloo on CPU. Every rank runs the same
passes (the monitor's lockstep protocol for sharded parameters); rank zero writes to ``<out>``.

    torchrun --nproc_per_node 2 fsdp_attribute.py <out> fsdp2|fsdp1
"""

import json
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

import torch
import torch.distributed as dist
from leave import leave_together
from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from transformers.models.gpt2.modeling_gpt2 import GPT2Block

from inseq_lightning.demo.task import make_probes
from inseq_lightning.monitor import ProbeMonitor
from inseq_lightning.sinks import FileSink
from inseq_lightning.tiny_models import tiny_gpt2
from inseq_lightning.utils.sharding import has_sharded_parameters

out = Path(sys.argv[1])
dist.init_process_group("gloo")
model, tok = tiny_gpt2()
root = None
if sys.argv[2] == "fsdp2":
    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)
else:  # FSDP1: the root wraps the model, as Lightning's strategy.model and the HF Trainer's model_wrapped do
    root = FullyShardedDataParallel(model, auto_wrap_policy=ModuleWrapPolicy({GPT2Block}),
                                    device_id=torch.device("cpu"), use_orig_params=True)
    model = root.module
assert has_sharded_parameters(model)
monitor = ProbeMonitor(make_probes(3), step_scores=("probability",))
reports = []
for step in (0, 1):
    report = monitor.run(model, tok, step, sinks=[FileSink(out)] if dist.get_rank() == 0 else [], sharded_root=root)
    reports.append(None if report is None else [r.probe.name for r in report.results])
if dist.get_rank() == 0:
    (out / "reports.json").write_text(json.dumps({"reports": reports, "world_size": dist.get_world_size()}))
else:
    assert reports == [None, None]
leave_together()
