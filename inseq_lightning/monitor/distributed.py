"""Monitoring across processes: which probes each rank attributes, and gathering to rank zero.

Two protocols, chosen from the model itself:

- **Replicated parameters** (DDP, or one process): the probes are split across ranks, each rank
  attributes its share on its full replica, the outputs are gathered, and rank zero logs them.
- **Sharded parameters** (FSDP, FSDP2 ``fully_shard``, DeepSpeed ZeRO-3): every forward and
  backward all-gathers parameter shards, so every rank must run the *same* sequence of passes or
  the job hangs. The number of backward passes of an attribution depends on the probes' lengths
  (steps are chunked to a memory budget), so equal-sized but different shares would still
  diverge. Every rank therefore attributes the *whole* probe set, in lockstep, and rank zero
  logs. This costs no more wall time than one process; it never waits on a missing collective.
"""

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def my_share(n_probes: int, rank: int, world: int) -> range:
    """Contiguous shares, in probe order (rank r gets ``[r * k, (r + 1) * k)`` with ``k = ceil(n / world)``)."""
    size = math.ceil(n_probes / world)
    return range(min(rank * size, n_probes), min((rank + 1) * size, n_probes))


def all_gather_objects(obj) -> list:
    """Every rank's ``obj`` on every rank (gloo and NCCL; pickled)."""
    _, world = rank_and_world()
    if world == 1:
        return [obj]
    gathered = [None] * world
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_from_zero(obj):
    """Rank zero's ``obj`` on every rank (pickled); ``obj`` itself in a single process."""
    _, world = rank_and_world()
    if world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def root_parameters_gathered(model: torch.nn.Module, root: torch.nn.Module | None = None) -> Iterator[None]:
    """Gather the sharded root's *own* parameters for an attribution pass, and shard them again after.

    Attribution embeds the ids itself, before the model's forward, but the root's own parameters
    (embeddings, final norm, tied head) stay sharded between forwards. Every rank gathers them (a
    collective in lockstep); submodules keep gathering in their own hooks, as in training: nothing
    materialises the whole model.

    - FSDP2 (``fully_shard``): ``root.unshard()`` / ``root.reshard()``.
    - FSDP1: ``FullyShardedDataParallel.summon_full_params(root, recurse=False)``.
    - DeepSpeed ZeRO-3: ``deepspeed.zero.GatheredParameters`` of the input embeddings.

    ``root`` is the outermost sharded module when it wraps ``model`` (Lightning's
    ``trainer.strategy.model``, the HF Trainer's ``model_wrapped``); default ``model``.
    """
    root = model if root is None else root
    try:
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1
    except ImportError:  # pragma: no cover - old torch
        yield
        return
    if isinstance(root, FSDPModule):
        root.unshard()
        try:
            yield
        finally:
            root.reshard()
    elif isinstance(root, FSDP1):
        with FSDP1.summon_full_params(root, recurse=False, writeback=False):
            yield
    elif any(hasattr(p, "ds_id") for p in model.get_input_embeddings().parameters()):
        # DeepSpeed ZeRO-3: only the input embeddings run outside the model's forward.
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.get_input_embeddings().parameters()), modifier_rank=None):
            yield
    else:
        yield
