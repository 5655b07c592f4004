"""Whether a model's parameters are sharded across processes (FSDP, FSDP2, DeepSpeed ZeRO-3)."""

import torch


def has_sharded_parameters(model: torch.nn.Module) -> bool:
    """FSDP (flat parameters), FSDP2 (``fully_shard`` modules, DTensor parameters) or DeepSpeed
    ZeRO-3 (``ds_id`` parameters). FSDP2 swaps plain tensors in while a module is unsharded, so
    the modules are checked as well as the parameters."""
    try:
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - old torch
        FSDPModule = DTensor = ()  # noqa: N806
    for module in model.modules():
        if isinstance(module, FSDPModule) or hasattr(module, "_fsdp_wrapped_module"):
            return True
        if type(module).__name__ == "FullyShardedDataParallel":
            return True
    return any(isinstance(p, DTensor) or hasattr(p, "ds_id") for p in model.parameters())
