"""Tensor parallelism of one engine: the rank's place in its group, the all-reduce, and how weights are cut.

    from slime.engine.parallel import TPInfo, init_tp_group, check_tp_size
    tp = init_tp_group("127.0.0.1", port, rank=1, size=2, device=torch.device("cuda", 1))
    y = tp.all_reduce(partial_sum)               # in place, summed over the tp ranks

Every rank of an engine is its own process (rank 0: the server; 1..N-1: `slime.engine.tp_worker`).
They meet in a standalone process group (own TCPStore hosted by rank 0, own gloo / NCCL backend
object), so the default process group of any of them stays free, and so does a weight-update group
the ranks join later. Layout (Megatron style): q/k/v heads and gate/up columns are split by rank,
o_proj / down_proj rows are split and all-reduced; k/v heads are replicated when there are fewer
than ranks (rank r keeps head r * kv_heads // tp); MoE experts split their intermediate dim; norms,
embedding and lm_head stay replicated. Weight loaders always receive the full HF tensor and keep
their slice (`shard_range`).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, NoReturn

import torch
import torch.distributed as dist

TP_TIMEOUT_S = 1800.0
logger = logging.getLogger(__name__)


@dataclass
class TPInfo:
    """Rank `rank` of `size`; `process_group` is None for a single rank (all-reduce is then a no-op)."""

    rank: int = 0
    size: int = 1
    process_group: Any = field(default=None, repr=False)
    store: Any = field(default=None, repr=False)

    def all_reduce(self, tensor: torch.Tensor, op: Any = None) -> torch.Tensor:
        """Sum (or `op`) `tensor` over the ranks, in place; returns it. Capturable in a CUDA graph on NCCL."""
        if self.size == 1:
            return tensor
        options = dist.AllreduceOptions()
        options.reduceOp = dist.ReduceOp.SUM if op is None else op
        self.process_group.allreduce([tensor], options).wait()
        return tensor

    def min_int(self, value: int, device: torch.device) -> int:
        """The smallest `value` over the ranks (also warms the communicator before any graph capture)."""
        if self.size == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.int64, device=device)
        return int(self.all_reduce(tensor, dist.ReduceOp.MIN).item())

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Release the group without waiting on the peers for more than `timeout_s`.

        On 2xH100 and 4xH200 (torch 2.11) rank 0's `ProcessGroupNCCL.abort()` hung once its workers had left, so
        the release runs in a daemon thread: a stuck NCCL teardown costs `timeout_s`, never the server. A stuck
        group then makes the interpreter's exit call std::terminate (exit code 134 after a finished run), which
        `exit_process` avoids."""
        group, self.process_group, self.store = self.process_group, None, None
        if group is None:
            return

        def release() -> None:
            try:
                if hasattr(group, "abort") and "NCCL" in type(group).__name__:
                    group.abort()
                else:
                    group.shutdown()
            except RuntimeError:
                pass

        releaser = threading.Thread(target=release, name="tp-group-release", daemon=True)
        releaser.start()
        releaser.join(timeout_s)
        if releaser.is_alive():
            _STUCK_RELEASES.append(releaser)
            logger.warning("the tensor-parallel group did not shut down within %.0fs; leaving it to process exit",
                           timeout_s)


_STUCK_RELEASES: list[threading.Thread] = []


def exit_process(code: int) -> NoReturn:
    """`sys.exit(code)`, or, when a group's release is stuck (`TPInfo.shutdown`), flush and `os._exit(code)`,
    skipping the interpreter's teardown that would abort the process."""
    if not any(thread.is_alive() for thread in _STUCK_RELEASES):
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def create_tp_store(size: int) -> Any:
    """Rank 0's TCPStore on a free local port (`store.port`); the workers connect to it."""
    return dist.TCPStore("127.0.0.1", 0, size, is_master=True, wait_for_workers=False,
                         timeout=timedelta(seconds=TP_TIMEOUT_S))


def init_tp_group(port: int, rank: int, size: int, device: torch.device, store: Any = None) -> TPInfo:
    """Join the engine's group (blocks until all `size` ranks have joined): NCCL on CUDA, gloo on CPU."""
    if size == 1:
        return TPInfo()
    timeout = timedelta(seconds=TP_TIMEOUT_S)
    if store is None:
        store = dist.TCPStore("127.0.0.1", port, size, is_master=False, timeout=timeout)
    prefixed = dist.PrefixStore("slime_engine_tp", store)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        group = dist.ProcessGroupNCCL(prefixed, rank, size, options)
    else:
        group = dist.ProcessGroupGloo(prefixed, rank, size, timeout)
    return TPInfo(rank, size, group, store)


def shard_range(total: int, rank: int, size: int, what: str) -> tuple[int, int]:
    """(start, length) of rank's equal slice of `total`."""
    assert total % size == 0, f"{what} ({total}) is not divisible by the tp size {size}"
    length = total // size
    return rank * length, length


def kv_head_range(num_kv_heads: int, rank: int, size: int) -> tuple[int, int]:
    """(first kv head, count) kept by `rank`: an equal slice, or one replicated head when heads < ranks."""
    if num_kv_heads >= size:
        return shard_range(num_kv_heads, rank, size, "num_key_value_heads")
    return rank * num_kv_heads // size, 1


def rank_device(device: str, rank: int) -> str:
    """Rank r of an engine on `cuda[:k]` uses cuda:k+r; on CPU every rank uses the CPU."""
    if device == "cpu":
        return device
    base = int(device.split(":", 1)[1]) if ":" in device else 0
    return f"cuda:{base + rank}"


def check_tp_size(model_path: str, tp_size: int, device: str) -> None:
    """ValueError naming --tp-size when the checkpoint's shapes or the visible GPUs cannot be split."""
    if tp_size < 1:
        raise ValueError(f"--tp-size must be >= 1, got {tp_size}")
    if tp_size == 1:
        return
    try:
        cfg = json.load(open(os.path.join(model_path, "config.json")))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"--model-path {model_path!r}: cannot read config.json ({exc})") from exc
    cfg = {**cfg.get("text_config", {}), **cfg}
    heads = int(cfg.get("num_attention_heads", 0) or 0)
    kv_heads = int(cfg.get("num_key_value_heads", 0) or 0) or heads
    sizes = {"num_attention_heads": heads, "intermediate_size": int(cfg.get("intermediate_size", 0) or 0)}
    if int(cfg.get("num_experts", 0) or 0) > 0:
        sizes["moe_intermediate_size"] = int(cfg.get("moe_intermediate_size", 0) or 0)
    for name, value in sizes.items():
        if value % tp_size:
            raise ValueError(f"--tp-size {tp_size} does not divide the model's {name} ({value})")
    if kv_heads % tp_size and tp_size % kv_heads:
        raise ValueError(f"--tp-size {tp_size} and the model's num_key_value_heads ({kv_heads}) must divide one another")
    if device.startswith("cuda"):
        base = int(device.split(":", 1)[1]) if ":" in device else 0
        visible = torch.cuda.device_count()
        if base + tp_size > visible:
            raise ValueError(f"--tp-size {tp_size} needs {base + tp_size} visible CUDA devices from {device}, "
                             f"found {visible} (CUDA_VISIBLE_DEVICES)")
