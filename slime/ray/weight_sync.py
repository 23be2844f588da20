"""Push the trainer's weights to the rollout engines (DESIGN §4), run inside each train actor.

    sync = WeightSync(args, rank, mode="tensor" | "distributed" | "disk")
    version = sync.update(trainer, [{"url": "http://127.0.0.1:30001", "tp_size": 1}])

- tensor (colocated): buckets from `trainer.export_weights(--update-weight-buffer-size)`, serialised by
  reference (CUDA IPC on GPU, shared memory on CPU) and POSTed to /update_weights_from_tensor. For the
  built-in engine a CUDA bucket is first packed into one buffer (load_format "flattened_bucket": one
  IPC handle per bucket, not one per tensor; `flatten`: None = CUDA buckets only, True / False = always /
  never). SGLang engines, and CPU buckets by default, get SGLang's per-tensor format (on CPU packing
  would cost a copy into the buffer plus one into shared memory on every sync).
- distributed (disaggregated): trainer rank 0 and every engine rank form one group (NCCL on GPU,
  gloo on CPU) once; per bucket rank 0 POSTs /update_weights_from_distributed (names, dtypes,
  shapes) and broadcasts. The built-in engine gets load_format "flattened_bucket": the bucket is
  packed into one buffer per dtype, so a bucket costs one collective per dtype, not one per tensor
  (`flatten` False: per tensor here too). SGLang engines get one broadcast per tensor.
- disk (--update-weight-transport disk): HF safetensors written once, engines POST /update_weights_from_disk.
Generation is paused around the update. Every engine must then report the trainer's weight version
(GET /get_weight_version), else the update fails loudly. `last_timings` holds the seconds the last
update spent per phase on this rank (benchmarks/weight_sync.py reports them).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator, TypeVar

import httpx

logger = logging.getLogger(__name__)

T = TypeVar("T")
MODES = ("tensor", "distributed", "disk")


def weight_sync_mode(args: Any) -> str:
    if getattr(args, "update_weight_transport", "nccl") == "disk":
        return "disk"
    return "tensor" if getattr(args, "colocate", False) else "distributed"


def _post(url: str, payload: dict[str, Any], timeout: float = 600.0, client: httpx.Client | None = None) -> Any:
    r = (client or httpx).post(url, json=payload, timeout=timeout)
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


def check_weight_update_equal(urls: list[str], push: Callable[[], Any]) -> None:
    """--check-weight-update-equal: every engine snapshots its weights (equal to the trainer's at this point) and
    overwrites them with noise; `push()` sends the trainer's weights; every engine must then hold its snapshot
    again, bit for bit. Raises naming the engine and the tensors that differ."""
    for action in ("snapshot", "reset_tensors"):
        for url in urls:
            _post(f"{url}/weights_checker", {"action": action})
    push()
    failures = []
    for url in urls:
        try:
            _post(f"{url}/weights_checker", {"action": "compare"})
        except RuntimeError as e:
            failures.append(str(e))
    if failures:
        raise RuntimeError("--check-weight-update-equal: the weight update did not restore every engine tensor: "
                           + "; ".join(failures))


def _first_failure(futures: list[Future]) -> str | None:
    """The error of the first finished request that failed, else None."""
    for future in futures:
        if future.done() and future.exception() is not None:
            return str(future.exception())
    return None


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
        self._abandoned: list[Any] = []  # groups left mid-broadcast (see _abandon_group)
        self._pool = ThreadPoolExecutor(max_workers=16)
        # one keep-alive client: a fresh httpx client per request costs ~10-30 ms (TLS context, connect)
        self._http = httpx.Client(limits=httpx.Limits(max_connections=64, max_keepalive_connections=64))
        # packed buckets are the built-in engine's "flattened_bucket" format; SGLang engines never get them
        self.flatten: bool | None = None if getattr(args, "rollout_backend", "builtin") == "builtin" else False
        self.last_timings: dict[str, float] = {}

    # ---- entry point ----------------------------------------------------------------------------
    def update(self, trainer: Any, engines: list[dict[str, Any]]) -> int:
        """All train ranks call this (export is collective); rank 0 talks to the engines. Returns the version."""
        version = int(trainer.weight_version)
        urls = [e["url"] for e in engines]
        if not engines:  # every engine is down (--use-fault-tolerance restarts them and pushes then)
            return version
        start = time.perf_counter()
        self.last_timings = dict.fromkeys(("pause_s", "export_s", "pack_s", "engine_s", "resume_s"), 0.0)
        if self.rank == 0:
            self._post_all(urls, "pause_generation", {})
        self.last_timings["pause_s"] = time.perf_counter() - start
        try:
            if self.mode == "tensor":
                self._update_by_tensor(trainer, engines, version)
            elif self.mode == "distributed":
                self._update_by_broadcast(trainer, engines, version)
            else:
                self._update_by_disk(trainer, urls, version)
        finally:
            resume_start = time.perf_counter()
            if self.rank == 0:
                self._post_all(urls, "continue_generation", {})
            self.last_timings["resume_s"] = time.perf_counter() - resume_start
        self.last_timings["total_s"] = time.perf_counter() - start
        if self.rank == 0:
            logger.info("weights v%d pushed to %d engine(s) by %s in %.2fs", version, len(urls), self.mode,
                        time.perf_counter() - start)
        return version

    def _timed_buckets(self, trainer: Any) -> Iterator[tuple[list[tuple[str, Any]], bool]]:
        """`trainer.export_weights` buckets with is_last; the time spent producing them counts as export_s."""
        iterator = iter(_with_last(trainer.export_weights(self.bucket_bytes)))
        while True:
            start = time.perf_counter()
            try:
                item = next(iterator)
            except StopIteration:
                return
            finally:
                self.last_timings["export_s"] += time.perf_counter() - start
            yield item

    def _add_time(self, key: str, start: float) -> None:
        self.last_timings[key] = self.last_timings.get(key, 0.0) + time.perf_counter() - start

    def _post(self, url: str, payload: dict[str, Any], timeout: float = 600.0) -> Any:
        return _post(url, payload, timeout, client=self._http)

    def _post_all(self, urls: list[str], path: str, payload: dict[str, Any]) -> list[Any]:
        futures = [self._pool.submit(self._post, f"{u}/{path}", payload) for u in urls]
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
        """One bucket in flight: the next bucket is exported while the engines load this one and is packed
        and sent once they have answered (buckets arrive in order; at most two buckets' bytes are alive)."""
        targets = self._tensor_targets(engines)
        in_flight: tuple[list[Future], Any] | None = None
        try:
            for bucket, is_last in self._timed_buckets(trainer):
                if not targets:
                    continue
                self._wait(in_flight)
                in_flight = None  # frees the previous bucket before this one is packed
                serialized, payload, keep_alive = self._pack_tensor_bucket(bucket, version, flush=is_last)
                futures = []
                for e in targets:
                    request = {**payload, "serialized_named_tensors": [serialized] * int(e.get("tp_size", 1))}
                    futures.append(self._pool.submit(self._post, f"{e['url']}/update_weights_from_tensor", request))
                in_flight = (futures, keep_alive)
        finally:
            self._wait(in_flight)  # the sender's tensors must outlive every engine's read

    def _pack_tensor_bucket(self, bucket: list[tuple[str, Any]], version: int, flush: bool
                            ) -> tuple[str, dict[str, Any], Any]:
        """(serialized bucket, the rest of the request, what must stay alive until the engines answer)."""
        from slime.engine.weight_transport import serialize_flattened_bucket, serialize_named_tensors

        start = time.perf_counter()
        named = [(name, t.detach().contiguous()) for name, t in bucket]
        payload: dict[str, Any] = {"flush_cache": flush, "weight_version": str(version)}
        if self.flatten or (self.flatten is None and bool(named) and named[0][1].is_cuda):
            serialized, keep_alive = serialize_flattened_bucket(named)
            payload["load_format"] = "flattened_bucket"
            named.clear()
            bucket.clear()  # the packed buffer holds the bytes now; free the exported tensors early
        else:
            serialized, keep_alive = serialize_named_tensors(named), named
        self._add_time("pack_s", start)
        return serialized, payload, keep_alive

    def _wait(self, in_flight: tuple[list[Future], Any] | None) -> None:
        if in_flight is None:
            return
        start = time.perf_counter()
        try:
            for f in in_flight[0]:
                f.result()
        finally:
            self._add_time("engine_s", start)

    # ---- broadcast (disaggregated) --------------------------------------------------------------
    def _ensure_group(self, engines: list[dict[str, Any]]) -> None:
        from slime.engine.weight_transport import init_weights_update_group

        urls = tuple(e["url"] for e in engines)
        # a restarted engine (same url, new process) or one left out while down needs a new group
        key = tuple((e["url"], int(e.get("restarts", 0))) for e in engines)
        if self._group is not None and key == self._group_key:
            return
        self._destroy_group()
        import torch

        from slime.ray.train_group import free_port

        backend = "nccl" if torch.cuda.is_available() else "gloo"
        master_address = "127.0.0.1"
        if any("127.0.0.1" not in u for u in urls):
            import ray

            master_address = ray.util.get_node_ip_address()
        master_port = free_port()
        world_size = 1 + sum(int(e.get("tp_size", 1)) for e in engines)
        futures = []
        offset = 1
        for e in engines:
            futures.append(self._pool.submit(self._post, f"{e['url']}/init_weights_update_group", {
                "master_address": master_address, "master_port": master_port, "rank_offset": offset,
                "world_size": world_size, "group_name": self._group_name, "backend": backend}))
            offset += int(e.get("tp_size", 1))
        self._group = init_weights_update_group(master_address, master_port, 0, world_size, self._group_name, backend)
        for f in futures:
            f.result()
        self._group_engines = urls
        self._group_key = key

    def _update_by_broadcast(self, trainer: Any, engines: list[dict[str, Any]], version: int) -> None:
        from slime.engine.weight_transport import (
            FLATTENED_BUCKET,
            BroadcastAborted,
            broadcast_tensors,
            dtype_name,
            pack_by_dtype,
        )

        if self.rank == 0:
            self._ensure_group(engines)
        packed = self.flatten is not False  # the built-in engine (CPU buckets too: no shared-memory copy here)
        for bucket, is_last in self._timed_buckets(trainer):
            if self.rank != 0:
                continue
            start = time.perf_counter()
            payload: dict[str, Any] = {
                "names": [n for n, _ in bucket], "dtypes": [dtype_name(t.dtype) for _, t in bucket],
                "shapes": [list(t.shape) for _, t in bucket], "group_name": self._group_name,
                "flush_cache": is_last, "weight_version": str(version)}
            if packed:
                payload["load_format"] = FLATTENED_BUCKET
                tensors = pack_by_dtype(bucket, self._group.device)
                bucket.clear()  # the buffers hold the bytes now; free the exported tensors early
            else:
                tensors = [t.detach().to(self._group.device).contiguous() for _, t in bucket]
            self._add_time("pack_s", start)
            start = time.perf_counter()
            futures = [self._pool.submit(self._post, f"{e['url']}/update_weights_from_distributed", payload)
                       for e in engines]
            try:
                broadcast_tensors(self._group, tensors, src=0, abort_reason=lambda: _first_failure(futures))
            except BroadcastAborted as e:
                self._abandon_group()
                raise RuntimeError(f"weight sync: an engine refused the bucket, so the broadcast was abandoned "
                                   f"(the next update forms a new group): {e}") from None
            for f in futures:
                f.result()
            self._add_time("engine_s", start)

    def _abandon_group(self) -> None:
        """Forget a group whose broadcast a peer never joined. NCCL: aborted (local). Gloo: not shut down (it
        would wait on the pending send), kept referenced instead. The engines are asked to leave."""
        group = self._group
        if getattr(group, "backend", None) == "nccl":
            try:
                group.process_group.abort()  # local: frees the stream the pending broadcast holds
            except Exception as e:  # noqa: BLE001 - best effort; the run is failing anyway
                logger.warning("aborting the weight update group failed: %s", e)
        self._abandoned.append(group)
        self._forget_group(engine_timeout=10)  # an engine still inside the broadcast answers after its own timeout
        self._group_name = f"slime_weights_{os.getpid()}_{len(self._abandoned)}"  # in case an engine kept the old

    def _destroy_group(self) -> None:
        if self._group is None:
            return
        from slime.engine.weight_transport import destroy

        group = self._group
        self._forget_group(engine_timeout=60)
        destroy(group)

    def _forget_group(self, engine_timeout: float) -> None:
        """Ask the group's engines to leave it (best effort: an engine may be gone already), then drop it."""
        for url in self._group_engines:
            try:
                self._post(f"{url}/destroy_weights_update_group", {"group_name": self._group_name},
                           timeout=engine_timeout)
            except Exception as e:  # noqa: BLE001
                logger.warning("destroy_weights_update_group on %s failed: %s", url, e)
        self._group = None
        self._group_engines = ()
        self._group_key = ()

    # ---- disk -----------------------------------------------------------------------------------
    def _update_by_disk(self, trainer: Any, urls: list[str], version: int) -> None:
        base = getattr(self.args, "update_weight_disk_dir", None) or os.path.join(tempfile.gettempdir(), "slime_weights")
        path = os.path.join(base, f"weights_v{version}")
        start = time.perf_counter()
        trainer.save_hf(path)
        self._add_time("export_s", start)
        start = time.perf_counter()
        if self.rank == 0:
            self._post_all(urls, "update_weights_from_disk", {"model_path": path, "weight_version": str(version)})
        self._add_time("engine_s", start)

    def close(self) -> None:
        if self.rank == 0:
            self._destroy_group()
        self._pool.shutdown(wait=False)
        self._http.close()
