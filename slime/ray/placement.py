"""Ray start-up and placement groups for train ranks and rollout engines, colocated or disaggregated.

    from slime.ray.placement import init_ray, create_placement
    init_ray(args); placement = create_placement(args)

One bundle per train rank / engine GPU. On GPU hosts a bundle is {"GPU": 1, "CPU": 1}; on hosts
without GPUs it is {"CPU": 1} and Ray's CPU resources are logical, so `init_ray` starts a local
cluster with as many logical CPUs as the run needs, whatever the physical core count.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
PLACEMENT_TIMEOUT_S = float(os.environ.get("SLIME_PLACEMENT_TIMEOUT_S", "120"))


def num_train_ranks(args: Any) -> int:
    if getattr(args, "debug_rollout_only", False):
        return 0
    return int(args.actor_num_nodes) * int(args.actor_num_gpus_per_node)


def num_critic_bundles(args: Any) -> int:
    """The PPO critic's own GPUs (0: its ranks share the actor's bundles)."""
    if getattr(args, "debug_rollout_only", False) or not getattr(args, "use_critic", False):
        return 0
    return int(getattr(args, "critic_num_ranks", 0) or 0)


def num_rollout_bundles(args: Any) -> int:
    """Bundles the engines need (0: none started: SFT, --debug-train-only, external engines, router only)."""
    if not needs_engines(args):
        return 0
    if getattr(args, "colocate", False):
        return num_train_ranks(args) or int(args.rollout_num_gpus or 0)
    return int(args.rollout_num_gpus or 0)


def needs_engines(args: Any) -> bool:
    if getattr(args, "debug_train_only", False) or getattr(args, "load_debug_rollout_data", None):
        return False
    if getattr(args, "loss_type", "policy_loss") == "sft_loss":
        return False
    if getattr(args, "rollout_external_engine_addrs", None):
        return False
    return True


def runtime_env() -> dict[str, Any]:
    python_path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {"PYTHONPATH": python_path, "TOKENIZERS_PARALLELISM": "false", "RAY_DEDUP_LOGS": "0"}
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "SLIME_PROGRESS", "OMP_NUM_THREADS", "SLIME_FSDP_COMPILE",
                "SLIME_FSDP_COMPILE_BACKEND", "SLIME_FSDP_COMPILE_DYNAMIC", "SLIME_FSDP_COMPILE_HEAD"):
        if key in os.environ:
            env[key] = os.environ[key]
    return {"env_vars": env}


def init_ray(args: Any) -> bool:
    """Join the cluster named by RAY_ADDRESS, or start a local one sized to this run. Returns True if started here."""
    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=runtime_env(), log_to_driver=True)
        return True
    bundles = num_train_ranks(args) + (0 if getattr(args, "colocate", False) else num_rollout_bundles(args))
    if getattr(args, "colocate", False):
        bundles = max(bundles, num_rollout_bundles(args))
    bundles += num_critic_bundles(args)
    # bundles + rollout manager + engine launchers + router + slack; logical CPUs, not cores
    start_local_ray(bundles + 4 + num_rollout_bundles(args))
    return True


def start_local_ray(num_cpus: int, log_to_driver: bool = True) -> None:
    """A local Ray instance with `num_cpus` logical CPUs whose workers import this checkout of slime."""
    ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env=runtime_env(), log_to_driver=log_to_driver)


def cluster_has_gpus() -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0


@dataclass
class Placement:
    """Where each train rank and each engine GPU runs: a placement group plus an ordered bundle list."""

    use_gpu: bool
    actor_pg: PlacementGroup | None
    actor_bundles: list[int]
    rollout_pg: PlacementGroup | None
    rollout_bundles: list[int]
    bundle_nodes: dict[int, str] = field(default_factory=dict)  # bundle index -> Ray node id (multi-node only)
    critic_bundles: list[int] = field(default_factory=list)  # PPO critic on GPUs of its own; empty: shares the actor's

    def train_bundles(self, role: str) -> list[int]:
        """The bundles of a train group's ranks: the critic's own, or the actor's (which a critic then shares)."""
        return self.critic_bundles if role == "critic" and self.critic_bundles else self.actor_bundles

    def train_strategy(self, role: str, rank: int) -> PlacementGroupSchedulingStrategy:
        assert self.actor_pg is not None
        return PlacementGroupSchedulingStrategy(self.actor_pg,
                                                placement_group_bundle_index=self.train_bundles(role)[rank])

    def rollout_strategy(self, gpu_index: int) -> PlacementGroupSchedulingStrategy:
        assert self.rollout_pg is not None
        return PlacementGroupSchedulingStrategy(self.rollout_pg, placement_group_bundle_index=self.rollout_bundles[gpu_index])

    def remove(self) -> None:
        for pg in {id(p): p for p in (self.actor_pg, self.rollout_pg) if p is not None}.values():
            remove_placement_group(pg)


@ray.remote(num_cpus=0)
def _bundle_info() -> tuple[str, str, str]:
    gpu_ids = ray.get_gpu_ids()
    return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address(), str(gpu_ids[0]) if gpu_ids else ""


def _ordered_bundles(pg: PlacementGroup, count: int, use_gpu: bool) -> tuple[list[int], dict[int, str]]:
    """Bundle indices sorted by (node, GPU id) so consecutive ranks share a node; probed only on multi-node clusters."""
    alive_nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(alive_nodes) <= 1:
        return list(range(count)), {}
    probes = [
        _bundle_info.options(
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i),
            num_gpus=0.01 if use_gpu else 0,
        ).remote()
        for i in range(count)
    ]
    infos = ray.get(probes)

    def key(i: int) -> tuple:
        node_id, ip, gpu = infos[i]
        return (tuple(int(x) if x.isdigit() else 0 for x in ip.split(".")), node_id, int(gpu) if gpu.isdigit() else i)

    order = sorted(range(count), key=key)
    return order, {i: infos[i][0] for i in range(count)}


def _make_pg(count: int, use_gpu: bool, name: str) -> PlacementGroup:
    bundle = {"GPU": 1, "CPU": 1} if use_gpu else {"CPU": 1}
    pg = placement_group([dict(bundle) for _ in range(count)], strategy="PACK", name=name)
    ready, _ = ray.wait([pg.ready()], timeout=PLACEMENT_TIMEOUT_S)
    if not ready:
        available = ray.available_resources()
        remove_placement_group(pg)
        kind = "GPU" if use_gpu else "CPU"
        raise ValueError(
            f"could not place {count} bundles of {bundle} within {PLACEMENT_TIMEOUT_S:.0f}s "
            f"(cluster has {available.get(kind, 0):g} free {kind}); lower --actor-num-nodes / "
            f"--actor-num-gpus-per-node / --rollout-num-gpus / --critic-num-gpus-per-node or add nodes"
        )
    return pg


def create_placement(args: Any) -> Placement:
    """One group. Colocated: engines on the train bundles; disaggregated: train bundles first, then the engines'.
    A PPO critic with GPUs of its own (--critic-num-gpus-per-node) takes the last bundles."""
    use_gpu = cluster_has_gpus()
    n_train = num_train_ranks(args)
    n_rollout = num_rollout_bundles(args)
    colocate = bool(getattr(args, "colocate", False))
    if colocate and n_train and n_rollout and n_rollout != n_train:
        raise ValueError(
            f"--colocate needs --rollout-num-gpus equal to the train ranks ({n_train}); got {n_rollout}"
        )
    n_critic = num_critic_bundles(args) if n_train else 0
    shared = max(n_train, n_rollout) if colocate else n_train + n_rollout
    total = shared + n_critic
    if total == 0:
        return Placement(use_gpu, None, [], None, [])
    pg = _make_pg(total, use_gpu, name=f"slime_{os.getpid()}")
    order, nodes = _ordered_bundles(pg, total, use_gpu)
    actor_bundles = order[:n_train]
    rollout_bundles = order[:n_rollout] if colocate else order[n_train:n_train + n_rollout]
    return Placement(
        use_gpu=use_gpu,
        actor_pg=pg if n_train else None,
        actor_bundles=actor_bundles,
        rollout_pg=pg if n_rollout else None,
        rollout_bundles=rollout_bundles,
        bundle_nodes=nodes,
        critic_bundles=order[shared:],
    )
