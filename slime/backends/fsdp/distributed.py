"""The trainer's process group and device mesh: use the caller's group, or start a 1-rank one.

    from slime.backends.fsdp.distributed import ensure_process_group, all_reduce_max, all_reduce_sum

NCCL on GPU, gloo on CPU. Collectives here take and return Python numbers so callers stay simple.
"""

from __future__ import annotations

import datetime
import socket

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_process_group(device: str, timeout_minutes: float = 10) -> None:
    if dist.is_initialized():
        return
    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
                            timeout=datetime.timedelta(minutes=timeout_minutes))


def build_mesh(device: str) -> DeviceMesh:
    if device == "cuda":
        torch.cuda.set_device(torch.cuda.current_device())
    return init_device_mesh(device, (dist.get_world_size(),), mesh_dim_names=("dp",))


def all_reduce_sum(value: float, device: str) -> float:
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item())


def all_reduce_max(value: int, device: str) -> int:
    t = torch.tensor([int(value)], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def all_reduce_sums(values: dict[str, float], device: str) -> dict[str, float]:
    """Sum each named number over ranks (all ranks must pass the same keys)."""
    keys = sorted(values)
    if not keys:
        return {}
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return dict(zip(keys, t.tolist()))
