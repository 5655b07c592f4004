"""Whether a model's parameters are sharded across processes (FSDP, FSDP2, DeepSpeed ZeRO-3)."""

import torch


def has_sharded_parameters(model: torch.nn.Module) -> bool:
    """FSDP (flat parameters), FSDP2 (``fully_shard`` modules, DTensor parameters) or DeepSpeed
    ZeRO-3 (``ds_id`` parameters). FSDP2 swaps plain tensors in while a module is unsharded, so
    the modules are checked as well as the parameters."""
    try:
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - old torch
        FSDPModule = FSDP1 = DTensor = ()
    if any(isinstance(module, (FSDPModule, FSDP1)) for module in model.modules()):
        return True
    # DeepSpeed sets ``ds_id`` as an instance attribute (a dict lookup: hasattr would raise and catch)
    return any(isinstance(p, DTensor) or "ds_id" in p.__dict__ for p in model.parameters())
