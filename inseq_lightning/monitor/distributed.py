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


def has_sharded_parameters(model: torch.nn.Module) -> bool:
    """FSDP (flat parameters), FSDP2 (DTensor parameters) or DeepSpeed ZeRO-3 (``ds_id`` parameters)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - old torch
        DTensor = ()  # noqa: N806
    for module in model.modules():
        if type(module).__name__ in ("FullyShardedDataParallel", "FSDPModule") or hasattr(module, "_fsdp_wrapped_module"):
            return True
    return any(isinstance(p, DTensor) or hasattr(p, "ds_id") for p in model.parameters())


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


@contextlib.contextmanager
def root_parameters_gathered(model: torch.nn.Module) -> Iterator[None]:
    """Under FSDP2 the root module's own parameters (embeddings, final norm, tied head) stay sharded
    between forwards, but attribution embeds the ids itself, before the model's forward. Gather
    the root's parameters for the pass (every rank does, so it is a collective in lockstep) and
    shard them again after. Submodules keep gathering in their own hooks, as in training;
    nothing like ``summon_full_params`` materialises the whole model."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - old torch
        FSDPModule = ()  # noqa: N806
    if not isinstance(model, FSDPModule):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()
