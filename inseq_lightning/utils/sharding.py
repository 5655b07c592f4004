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
    # One walk over the modules, reading each one's own parameters (cheaper than parameters(),
    # which deduplicates and builds names). DeepSpeed sets ``ds_id`` as an instance attribute (a
    # dict lookup: hasattr would raise and catch).
    for module in model.modules():
        if isinstance(module, (FSDPModule, FSDP1)):
            return True
        for p in module._parameters.values():
            if p is not None and (isinstance(p, DTensor) or "ds_id" in p.__dict__):
                return True
    return False
