"""Placement groups on a 2-node Ray cluster (two raylets on this host): bundles, ordering, clear failures.

    python -m pytest -q tests/test_ray_placement.py
"""

from __future__ import annotations

from argparse import Namespace

import pytest
import ray
from ray.cluster_utils import Cluster

from slime.ray.placement import create_placement, num_rollout_bundles, num_train_ranks


@pytest.fixture(scope="module")
def two_node_cluster():
    from slime.ray.placement import runtime_env

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, runtime_env=runtime_env(), log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def _args(**kw) -> Namespace:
    base = dict(actor_num_nodes=2, actor_num_gpus_per_node=1, rollout_num_gpus=2, colocate=False,
                debug_rollout_only=False, debug_train_only=False, load_debug_rollout_data=None,
                loss_type="policy_loss", rollout_external_engine_addrs=None)
    base.update(kw)
    return Namespace(**base)


@ray.remote(num_cpus=0)
def _where() -> str:
    return ray.get_runtime_context().get_node_id()


def _node_of(placement, pg, bundle: int) -> str:
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    strategy = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=bundle)
    return ray.get(_where.options(scheduling_strategy=strategy).remote())


def test_disaggregated_bundles_span_both_nodes_in_node_order(two_node_cluster):
    placement = create_placement(_args())
    try:
        assert not placement.use_gpu
        assert len(placement.actor_bundles) == 2 and len(placement.rollout_bundles) == 2
        assert set(placement.actor_bundles).isdisjoint(placement.rollout_bundles)
        nodes = [placement.bundle_nodes[b] for b in placement.actor_bundles + placement.rollout_bundles]
        assert len(set(nodes)) == 2
        assert nodes == sorted(nodes, key=nodes.index)  # consecutive bundles share a node
        for bundle in placement.actor_bundles + placement.rollout_bundles:
            assert _node_of(placement, placement.actor_pg, bundle) == placement.bundle_nodes[bundle]
    finally:
        placement.remove()


def test_colocated_engines_share_the_train_bundles(two_node_cluster):
    placement = create_placement(_args(colocate=True, actor_num_gpus_per_node=2, rollout_num_gpus=4))
    try:
        assert placement.actor_bundles == placement.rollout_bundles and placement.actor_pg is placement.rollout_pg
        assert len({placement.bundle_nodes[b] for b in placement.actor_bundles}) == 2
    finally:
        placement.remove()


def test_modes_without_engines_or_trainer():
    assert num_rollout_bundles(_args(loss_type="sft_loss")) == 0
    assert num_rollout_bundles(_args(debug_train_only=True)) == 0
    assert num_rollout_bundles(_args(rollout_external_engine_addrs=["127.0.0.1:30000"])) == 0
    assert num_train_ranks(_args(debug_rollout_only=True)) == 0


def test_too_many_bundles_fail_clearly(two_node_cluster, monkeypatch):
    monkeypatch.setattr("slime.ray.placement.PLACEMENT_TIMEOUT_S", 3)
    with pytest.raises(ValueError, match="could not place 9 bundles"):
        create_placement(_args(actor_num_nodes=1, actor_num_gpus_per_node=5, rollout_num_gpus=4))


def test_runtime_env_carries_the_trainer_switches_to_every_actor(monkeypatch):
    from slime.ray.placement import runtime_env

    monkeypatch.setenv("SLIME_FSDP_COMPILE", "layer")
    monkeypatch.delenv("SLIME_FSDP_COMPILE_BACKEND", raising=False)
    env = runtime_env()["env_vars"]
    assert env["SLIME_FSDP_COMPILE"] == "layer" and "SLIME_FSDP_COMPILE_BACKEND" not in env
