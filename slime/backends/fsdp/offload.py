"""Move the trainer's parameters, gradients and optimizer state to CPU and back (colocation with the engine).

    from slime.backends.fsdp.offload import offload_to_cpu, onload_to_device

FSDP2 modules re-point their sharded parameters after `Module.to` (its `_apply` hook), so moving
the module moves the shards; optimizer state tensors are moved one by one. On GPU the caching
allocator is emptied afterwards so the engine can take the memory.
"""

from __future__ import annotations

import gc

import torch
from torch import nn


def _move_optimizer_state(optimizer: torch.optim.Optimizer, device: str) -> None:
    for state in optimizer.state.values():
        for key, value in list(state.items()):
            if isinstance(value, torch.Tensor) and key != "step":
                state[key] = value.to(device, non_blocking=True)


def offload_to_cpu(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    model.to("cpu")
    if optimizer is not None:
        _move_optimizer_state(optimizer, "cpu")
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        gc.collect()
        torch.cuda.empty_cache()


def onload_to_device(model: nn.Module, optimizer: torch.optim.Optimizer | None, device: str) -> None:
    model.to(device)
    if optimizer is not None:
        _move_optimizer_state(optimizer, device)
    if device == "cuda":
        torch.cuda.synchronize()
