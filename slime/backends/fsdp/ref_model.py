"""Reference-policy weights for the KL term: CPU copies of this rank's parameter shards, swapped in on demand.

    from slime.backends.fsdp.ref_model import snapshot_shards, swapped_in

The reference model has the policy's architecture and sharding, so instead of a second FSDP model
we keep its local shards on CPU (pinned on GPU hosts) and copy them into the policy's own
parameters while reference log-probs are computed, then copy the policy's weights back.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from slime.backends.fsdp.model import reshard_all


def _local(param: torch.Tensor) -> torch.Tensor:
    return param.to_local() if isinstance(param, DTensor) else param


def snapshot_shards(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU clones of every parameter's local shard (pinned when CUDA is available)."""
    reshard_all(model)
    pin = torch.cuda.is_available()
    out = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            local = _local(param).detach()
            copy = torch.empty(local.shape, dtype=local.dtype, device="cpu", pin_memory=pin)
            copy.copy_(local)
            out[name] = copy
    return out


def load_shards(model: nn.Module, shards: dict[str, torch.Tensor]) -> None:
    reshard_all(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            _local(param).copy_(shards[name], non_blocking=True)
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@contextlib.contextmanager
def swapped_in(model: nn.Module, shards: dict[str, torch.Tensor]) -> Iterator[None]:
    """Run the body with `shards` as the model's weights; the model's own weights come back afterwards."""
    own = snapshot_shards(model)
    load_shards(model, shards)
    try:
        yield
    finally:
        load_shards(model, own)
