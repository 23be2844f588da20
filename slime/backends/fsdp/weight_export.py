"""Full tensors with Hugging Face names, in buckets of about `--update-weight-buffer-size` bytes, for weight sync.

    from slime.backends.fsdp.weight_export import iter_weight_buckets

Collective: every rank must iterate to the end in the same order (each DTensor is all-gathered
with `full_tensor()`); every rank receives the same buckets. Tied parameters are exported once,
under their first name (as `named_parameters()` dedups them), plus persistent buffers.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import nn
from torch.distributed.tensor import DTensor


def named_exported_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from model.named_parameters()
    for module_name, module in model.named_modules():
        for buffer_name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and buffer_name not in module._non_persistent_buffers_set:
                yield (f"{module_name}.{buffer_name}" if module_name else buffer_name), buffer


def iter_weight_buckets(model: nn.Module, bucket_bytes: int, *, name_map: Callable[[str], str] = lambda n: n,
                        dtype: torch.dtype | None = None) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Yield lists of (hf_name, full tensor); a bucket closes once it reaches `bucket_bytes` (one tensor may exceed it)."""
    if bucket_bytes <= 0:
        raise ValueError(f"--update-weight-buffer-size must be > 0, got {bucket_bytes}")
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    with torch.no_grad():
        for name, tensor in named_exported_tensors(model):
            full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor.detach()
            if dtype is not None and full.is_floating_point():
                full = full.to(dtype)
            nbytes = full.numel() * full.element_size()
            if bucket and size + nbytes > bucket_bytes:
                yield bucket
                bucket, size = [], 0
            bucket.append((name_map(name), full))
            size += nbytes
    if bucket:
        yield bucket
