"""The train actor group: one Ray actor per train rank, torch.distributed (gloo on CPU, NCCL on GPU) among them.

    group = TrainGroup(args, placement); start_rollout_id = group.init()
    metrics = group.train(rollout_id, rollout_data)      # the dict is split across ranks here
    group.update_weights(engines)                        # see slime/ray/weight_sync.py

Each actor wraps `slime.backends.fsdp.trainer.FSDPTrainer` (docs/internals.md). Rank 0 is created
first and names the rendezvous address (its node IP and a free port) for the others.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import socket
from typing import Any

import ray

from slime.ray.data_split import split_rollout_data
from slime.ray.placement import Placement

logger = logging.getLogger(__name__)


def free_port(host: str = "") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class TrainActor:
    """One train rank. Created through `ray.remote(TrainActor)` by `TrainGroup`."""

    def __init__(self, args: Any, rank: int, world_size: int, role: str = "actor") -> None:
        self.args = args
        self.rank = rank
        self.world_size = world_size
        self.role = role
        self.trainer: Any = None
        self.last_rollout_data: dict[str, Any] | None = None
        self._weight_sync: Any = None
        for key, value in (getattr(args, "train_env_vars", None) or {}).items():
            os.environ[str(key)] = str(value)

    def node_address(self) -> tuple[str, int]:
        return ray.util.get_node_ip_address(), free_port()

    def init(self, master_addr: str, master_port: int) -> int:
        import torch
        import torch.distributed as dist

        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(self.rank),
                          WORLD_SIZE=str(self.world_size), LOCAL_RANK="0")
        use_cuda = torch.cuda.is_available() and bool(ray.get_gpu_ids())
        backend = getattr(self.args, "distributed_backend", None) or ("nccl" if use_cuda else "gloo")
        if use_cuda:
            torch.cuda.set_device(0)  # Ray narrows CUDA_VISIBLE_DEVICES to this actor's GPU
        timeout = datetime.timedelta(minutes=float(getattr(self.args, "distributed_timeout_minutes", 10) or 10))
        dist.init_process_group(backend, init_method=f"tcp://{master_addr}:{master_port}", rank=self.rank,
                                world_size=self.world_size, timeout=timeout)
        if not use_cuda and getattr(self.args, "device", "cpu") == "cuda":
            self.args.device = "cpu"
        from slime.backends.fsdp.trainer import FSDPTrainer

        self.trainer = FSDPTrainer(self.args, role=self.role)
        return int(self.trainer.init())

    def train(self, rollout_id: int, rollout_data: dict[str, Any]) -> dict[str, Any]:
        """The trainer's metrics plus, on GPU, this rank's peak memory in GiB."""
        import torch

        self.last_rollout_data = rollout_data
        if getattr(self.args, "save_debug_train_data", None) and self.role == "actor":
            from slime.ray.debug_dumps import save_debug_train_data

            save_debug_train_data(self.args.save_debug_train_data, rollout_id, self.rank, rollout_data)
        on_gpu = torch.cuda.is_available() and getattr(self.trainer, "device", "cpu") == "cuda"
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        metrics = dict(self.trainer.train(rollout_id, rollout_data) or {})
        if on_gpu:
            metrics["perf/trainer_peak_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
            metrics["perf/trainer_peak_reserved_gb"] = torch.cuda.max_memory_reserved() / 2**30
        return metrics

    def get_last_rollout_data(self) -> dict[str, Any] | None:
        return self.last_rollout_data

    def compute_log_probs(self, rollout_data: dict[str, Any]) -> list[list[float]]:
        return [t.detach().float().cpu().tolist() for t in self.trainer.compute_log_probs(rollout_data)]

    def compute_values(self, rollout_data: dict[str, Any]) -> list[Any]:
        return [t.detach().float().cpu() for t in self.trainer.compute_values(rollout_data)]

    def handover_log_probs(self, rollout_data: dict[str, Any]) -> dict[str, list[Any]]:
        return {key: [t.detach().float().cpu() for t in values]
                for key, values in self.trainer.handover_log_probs(rollout_data).items()}

    def save(self, rollout_id: int) -> None:
        self.trainer.save(rollout_id)

    def save_hf(self, path: str) -> None:
        self.trainer.save_hf(path)

    def offload(self) -> None:
        self.trainer.offload()

    def onload(self) -> None:
        self.trainer.onload()

    def weight_version(self) -> int:
        return int(self.trainer.weight_version)

    def weights_digest(self) -> str:
        """sha256 over every exported weight (names and bytes): equal digests mean equal weights."""
        digest = hashlib.sha256()
        for bucket in self.trainer.export_weights(64 * 1024 * 1024):
            for name, tensor in bucket:
                digest.update(name.encode())
                digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()

    def update_weights(self, engines: list[dict[str, Any]], mode: str) -> int:
        from slime.ray.weight_sync import WeightSync

        if self._weight_sync is None:
            self._weight_sync = WeightSync(self.args, self.rank, mode)
        version = self._weight_sync.update(self.trainer, engines)
        self.trainer.weights_synced()
        return version

    def shutdown(self) -> None:
        import torch.distributed as dist

        if self.trainer is not None:
            self.trainer.finish_saving()  # --async-save: the last checkpoint is committed before the group goes
        if self._weight_sync is not None:
            self._weight_sync.close()
        if dist.is_initialized():
            dist.destroy_process_group()


class TrainGroup:
    """Driver-side handle on the train actors; every call fans out to all ranks and waits."""

    def __init__(self, args: Any, placement: Placement, role: str = "actor") -> None:
        """role "critic" (PPO), its own torch.distributed group: on bundles of its own (--critic-num-gpus-per-node),
        or a second group on the actor's bundles, each rank sharing its GPU with the actor rank and, colocated,
        the engine."""
        self.args = args
        self.role = role
        self.owns_gpus = role == "actor" or bool(placement.critic_bundles)
        self.world_size = len(placement.train_bundles(role))
        if self.world_size == 0:
            raise ValueError("no train ranks placed: set --actor-num-nodes and --actor-num-gpus-per-node")
        actor_cls = ray.remote(TrainActor)
        num_cpus, gpu_share = (0.5, 0.4) if self.owns_gpus else (0.25, 0.2)
        self.actors = [
            actor_cls.options(
                num_cpus=num_cpus, num_gpus=gpu_share if placement.use_gpu else 0,
                scheduling_strategy=placement.train_strategy(role, rank), name=None, max_concurrency=2,
            ).remote(args, rank, self.world_size, role)
            for rank in range(self.world_size)
        ]

    def init(self) -> int:
        master_addr, master_port = ray.get(self.actors[0].node_address.remote())
        starts = ray.get([a.init.remote(master_addr, master_port) for a in self.actors])
        if len(set(starts)) != 1:
            raise RuntimeError(f"train ranks disagree on the rollout to resume from: {starts}")
        return starts[0]

    def _all(self, method: str, *args: Any) -> list[Any]:
        return ray.get([getattr(a, method).remote(*args) for a in self.actors])

    def train(self, rollout_id: int, rollout_data: dict[str, Any]) -> dict[str, Any]:
        return self.finish_train(self.start_train(rollout_id, rollout_data))

    def start_train(self, rollout_id: int, rollout_data: dict[str, Any]) -> list[ray.ObjectRef]:
        """Send every rank its share and return without waiting (`finish_train` waits)."""
        shards = split_rollout_data(rollout_data, self.world_size, getattr(self.args, "global_batch_size", None),
                                    balance=bool(getattr(self.args, "balance_data", False)))
        return [a.train.remote(rollout_id, shard) for a, shard in zip(self.actors, shards)]

    @staticmethod
    def finish_train(pending: list[ray.ObjectRef]) -> dict[str, Any]:
        return ray.get(pending)[0]

    def save(self, rollout_id: int) -> None:
        self._all("save", rollout_id)

    def save_hf(self, path: str) -> None:
        self._all("save_hf", path)

    def offload(self) -> None:
        self._all("offload")

    def onload(self) -> None:
        self._all("onload")

    def update_weights(self, engines: list[dict[str, Any]], mode: str) -> int:
        """Push weights to every engine, then check that each reports the trainer's version."""
        from slime.ray.weight_sync import check_engine_versions

        versions = self._all("update_weights", engines, mode)
        check_engine_versions([e["url"] for e in engines], versions[0])
        return versions[0]

    def weights_digest(self) -> str:
        return self._all("weights_digest")[0]

    def _per_rank(self, method: str, rollout_data: dict[str, Any]) -> list[Any]:
        """`method` of every rank on its contiguous part of the rollout: rank order is sample order."""
        shards = split_rollout_data(rollout_data, self.world_size, None)
        return ray.get([getattr(a, method).remote(s) for a, s in zip(self.actors, shards)])

    def compute_log_probs(self, rollout_data: dict[str, Any]) -> list[list[float]]:
        return [lp for part in self._per_rank("compute_log_probs", rollout_data) for lp in part]

    def compute_values(self, rollout_data: dict[str, Any]) -> list[Any]:
        """Critic: per-sample value tensors, in the rollout's sample order."""
        return [values for part in self._per_rank("compute_values", rollout_data) for values in part]

    def handover_log_probs(self, rollout_data: dict[str, Any]) -> dict[str, list[Any]]:
        """Actor: old / reference log-probs per sample, in the rollout's sample order (PPO with --kl-coef)."""
        parts = self._per_rank("handover_log_probs", rollout_data)
        return {key: [values for part in parts for values in part[key]] for key in parts[0]}

    def last_rollout_data(self) -> list[dict[str, Any] | None]:
        return self._all("get_last_rollout_data")

    def shutdown(self) -> None:
        try:
            self._all("shutdown")
        finally:
            for actor in self.actors:
                ray.kill(actor)
