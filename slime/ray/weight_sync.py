"""Push the trainer's weights to the rollout engines (DESIGN §4), run inside each train actor.

    sync = WeightSync(args, rank, mode="tensor" | "distributed" | "disk")
    version = sync.update(trainer, [{"url": "http://127.0.0.1:30001", "tp_size": 1}])

- tensor (colocated): buckets from `trainer.export_weights(--update-weight-buffer-size)`, serialised by
  reference (CUDA IPC on GPU, shared memory on CPU) and POSTed to /update_weights_from_tensor.
- distributed (disaggregated): trainer rank 0 and every engine rank form one group (NCCL on GPU,
  gloo on CPU) once; per bucket rank 0 POSTs /update_weights_from_distributed and broadcasts.
- disk (--update-weight-transport disk): HF safetensors written once, engines POST /update_weights_from_disk.
Generation is paused around the update. Every engine must then report the trainer's weight version
(GET /get_weight_version), else the update fails loudly.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, Iterator, TypeVar

import httpx

logger = logging.getLogger(__name__)

T = TypeVar("T")
MODES = ("tensor", "distributed", "disk")


def weight_sync_mode(args: Any) -> str:
    if getattr(args, "update_weight_transport", "nccl") == "disk":
        return "disk"
    return "tensor" if getattr(args, "colocate", False) else "distributed"


def _post(url: str, payload: dict[str, Any], timeout: float = 600.0) -> Any:
    r = httpx.post(url, json=payload, timeout=timeout)
    if r.status_code >= 400:
        raise RuntimeError(f"POST {url} answered HTTP {r.status_code}: {r.text[:500]}")
    return r.json() if r.content else None


def _with_last(iterable: Iterable[T]) -> Iterator[tuple[T, bool]]:
    """Yield (item, is_last) so the final bucket can carry flush_cache."""
    iterator = iter(iterable)
    try:
        previous = next(iterator)
    except StopIteration:
        return
    for item in iterator:
        yield previous, False
        previous = item
    yield previous, True


def check_engine_versions(urls: list[str], version: int) -> None:
    """Every engine must now report the trainer's weight version."""
    seen = {url: engine_weight_version(url) for url in urls}
    wrong = {u: v for u, v in seen.items() if v != str(version)}
    if wrong:
        raise RuntimeError(f"weight sync: engines report versions {wrong}, the trainer is at {version}")


def engine_weight_version(url: str) -> str:
    r = httpx.get(f"{url}/get_weight_version", timeout=60)
    r.raise_for_status()
    body = r.json()
    return str(body.get("weight_version") if isinstance(body, dict) else body)


class WeightSync:
    def __init__(self, args: Any, rank: int, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown weight sync mode {mode!r} (choose from {MODES})")
        self.args = args
        self.rank = rank
        self.mode = mode
        self.bucket_bytes = int(getattr(args, "update_weight_buffer_size", 512 * 1024**2))
        self._group: Any = None
        self._group_engines: tuple[str, ...] = ()
        self._group_key: tuple[tuple[str, int], ...] = ()
        self._group_name = f"slime_weights_{os.getpid()}"
        self._pool = ThreadPoolExecutor(max_workers=16)

    # ---- entry point ----------------------------------------------------------------------------
    def update(self, trainer: Any, engines: list[dict[str, Any]]) -> int:
        """All train ranks call this (export is collective); rank 0 talks to the engines. Returns the version."""
        version = int(trainer.weight_version)
        urls = [e["url"] for e in engines]
        if not engines:  # every engine is down (--use-fault-tolerance restarts them and pushes then)
            return version
        start = time.perf_counter()
        if self.rank == 0:
            self._post_all(urls, "pause_generation", {})
        try:
            if self.mode == "tensor":
                self._update_by_tensor(trainer, engines, version)
            elif self.mode == "distributed":
                self._update_by_broadcast(trainer, engines, version)
            else:
                self._update_by_disk(trainer, urls, version)
        finally:
            if self.rank == 0:
                self._post_all(urls, "continue_generation", {})
        if self.rank == 0:
            logger.info("weights v%d pushed to %d engine(s) by %s in %.2fs", version, len(urls), self.mode,
                        time.perf_counter() - start)
        return version

    def _post_all(self, urls: list[str], path: str, payload: dict[str, Any]) -> list[Any]:
        futures = [self._pool.submit(_post, f"{u}/{path}", payload) for u in urls]
        return [f.result() for f in futures]

    # ---- tensor (colocated) ---------------------------------------------------------------------
    def _tensor_targets(self, engines: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Colocated: engine e shares its first GPU with train rank e * tp_size, so that rank sends it the
        handles (CUDA IPC needs the same node). When the counts do not line up, rank 0 serves every engine."""
        import torch.distributed as dist

        world = dist.get_world_size() if dist.is_initialized() else 1
        tp = int(engines[0].get("tp_size", 1)) if engines else 1
        if len(engines) * tp == world:
            return [e for i, e in enumerate(engines) if i * tp == self.rank]
        return engines if self.rank == 0 else []

    def _update_by_tensor(self, trainer: Any, engines: list[dict[str, Any]], version: int) -> None:
        targets = self._tensor_targets(engines)
        for bucket, is_last in _with_last(trainer.export_weights(self.bucket_bytes)):
            if targets:
                self._send_tensor_bucket(targets, bucket, version, flush=is_last)

    def _send_tensor_bucket(self, engines: list[dict[str, Any]], bucket: list[tuple[str, Any]], version: int,
                            flush: bool) -> None:
        from slime.engine.weight_transport import serialize_named_tensors

        # the tensors stay referenced by `bucket` until every engine has answered
        serialized = serialize_named_tensors([(name, t.detach().contiguous()) for name, t in bucket])
        futures = [
            self._pool.submit(_post, f"{e['url']}/update_weights_from_tensor", {
                "serialized_named_tensors": [serialized] * int(e.get("tp_size", 1)),
                "flush_cache": flush, "weight_version": str(version)})
            for e in engines
        ]
        for f in futures:
            f.result()

    # ---- broadcast (disaggregated) --------------------------------------------------------------
    def _ensure_group(self, engines: list[dict[str, Any]]) -> None:
        from slime.engine.weight_transport import init_weights_update_group

        urls = tuple(e["url"] for e in engines)
        # a restarted engine (same url, new process) or one left out while down needs a new group
        key = tuple((e["url"], int(e.get("restarts", 0))) for e in engines)
        if self._group is not None and key == self._group_key:
            return
        self._destroy_group()
        import ray
        import torch

        from slime.ray.train_group import free_port

        backend = "nccl" if torch.cuda.is_available() else "gloo"
        master_address = ray.util.get_node_ip_address() if any("127.0.0.1" not in u for u in urls) else "127.0.0.1"
        master_port = free_port()
        world_size = 1 + sum(int(e.get("tp_size", 1)) for e in engines)
        futures = []
        offset = 1
        for e in engines:
            futures.append(self._pool.submit(_post, f"{e['url']}/init_weights_update_group", {
                "master_address": master_address, "master_port": master_port, "rank_offset": offset,
                "world_size": world_size, "group_name": self._group_name, "backend": backend}))
            offset += int(e.get("tp_size", 1))
        self._group = init_weights_update_group(master_address, master_port, 0, world_size, self._group_name, backend)
        for f in futures:
            f.result()
        self._group_engines = urls
        self._group_key = key

    def _update_by_broadcast(self, trainer: Any, engines: list[dict[str, Any]], version: int) -> None:
        from slime.engine.weight_transport import broadcast_tensors, dtype_name

        if self.rank == 0:
            self._ensure_group(engines)
        for bucket, is_last in _with_last(trainer.export_weights(self.bucket_bytes)):
            if self.rank != 0:
                continue
            tensors = [t.detach().to(self._group.device).contiguous() for _, t in bucket]
            payload = {"names": [n for n, _ in bucket], "dtypes": [dtype_name(t.dtype) for t in tensors],
                       "shapes": [list(t.shape) for t in tensors], "group_name": self._group_name,
                       "flush_cache": is_last, "weight_version": str(version)}
            futures = [self._pool.submit(_post, f"{e['url']}/update_weights_from_distributed", payload) for e in engines]
            broadcast_tensors(self._group, tensors, src=0)
            for f in futures:
                f.result()

    def _destroy_group(self) -> None:
        if self._group is None:
            return
        from slime.engine.weight_transport import destroy

        for url in self._group_engines:
            try:
                _post(f"{url}/destroy_weights_update_group", {"group_name": self._group_name}, timeout=60)
            except Exception as e:  # the engine may be gone already
                logger.warning("destroy_weights_update_group on %s failed: %s", url, e)
        destroy(self._group)
        self._group = None
        self._group_engines = ()
        self._group_key = ()

    # ---- disk -----------------------------------------------------------------------------------
    def _update_by_disk(self, trainer: Any, urls: list[str], version: int) -> None:
        base = getattr(self.args, "update_weight_disk_dir", None) or os.path.join(tempfile.gettempdir(), "slime_weights")
        path = os.path.join(base, f"weights_v{version}")
        trainer.save_hf(path)
        if self.rank == 0:
            self._post_all(urls, "update_weights_from_disk", {"model_path": path, "weight_version": str(version)})

    def close(self) -> None:
        if self.rank == 0:
            self._destroy_group()
        self._pool.shutdown(wait=False)
