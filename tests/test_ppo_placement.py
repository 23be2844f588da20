"""The PPO critic on train ranks of its own (--critic-num-nodes / --critic-num-gpus-per-node).

    python -m pytest -q tests/test_ppo_placement.py

Flag rules, then real Ray runs (gloo train ranks, a colocated engine): a critic on its own bundle trains while the
actor does and gives the same updates as one that shares the actor's bundle; a critic with more ranks than the
actor splits the rollout its own way.
"""

from __future__ import annotations

import json

import pytest
import torch

from ray_helpers import ray_session, tiny_task, train_argv
from slime.train_loop import parse_train_args, run

PPO = ("--colocate", "--advantage-estimator", "ppo", "--num-critic-only-steps", "1", "--critic-lr", "5e-2",
       "--kl-coef", "0.05")


@pytest.fixture(scope="module")
def ray_module():
    ray = ray_session()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return tiny_task(tmp_path_factory.mktemp("task"))


def _argv(tiny_model_dir, task, *extra):
    return train_argv(tiny_model_dir, task, *PPO, *extra)


def _error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc_info:
        parse_train_args(argv)
    assert exc_info.value.code == 2
    return capsys.readouterr().err


def test_critic_placement_flags(tiny_model_dir, task, capsys):
    args = parse_train_args(_argv(tiny_model_dir, task))
    assert args.critic_num_ranks == 0  # shares the actor's GPUs
    args = parse_train_args(_argv(tiny_model_dir, task, "--critic-num-gpus-per-node", "2"))
    assert (args.critic_num_nodes, args.critic_num_ranks) == (1, 2)  # nodes default to the actor's
    assert "need --advantage-estimator ppo" in _error(
        train_argv(tiny_model_dir, task, "--critic-num-gpus-per-node", "1"), capsys)
    assert "--critic-num-nodes must be > 0, got 0" in _error(_argv(tiny_model_dir, task, "--critic-num-nodes", "0"),
                                                             capsys)
    err = _error(_argv(tiny_model_dir, task, "--critic-num-gpus-per-node", "3"), capsys)  # 4 samples per step
    assert "--global-batch-size 4 is not divisible by the critic's ranks 3" in err


def _run(tiny_model_dir, task, metrics_dir, *extra):
    """Two rollouts (the first trains only the critic); the actor's digests, its shard of rollout 1, the records."""
    seen: dict = {}

    def on_start(loop, start):
        seen["placement"] = loop.placement
        seen["critic_world"] = loop.critic.world_size

    def on_step(loop, rollout_id, rollout_data, metrics):
        seen[rollout_id] = loop.trainer.weights_digest()
        seen[f"shard{rollout_id}"] = loop.trainer.last_rollout_data()[0]

    run(parse_train_args(_argv(tiny_model_dir, task, "--metrics-dir", str(metrics_dir), *extra)),
        on_start=on_start, on_step=on_step)
    seen["records"] = [json.loads(line) for line in (metrics_dir / "metrics.jsonl").read_text().splitlines()]
    return seen


@pytest.fixture(scope="module")
def shared(ray_module, tiny_model_dir, task, tmp_path_factory):
    """The critic on the actor's bundle (the default layout)."""
    return _run(tiny_model_dir, task, tmp_path_factory.mktemp("shared"))


def test_critic_on_its_own_bundle_trains_beside_the_actor_with_the_same_updates(shared, tiny_model_dir, task,
                                                                               tmp_path):
    own = _run(tiny_model_dir, task, tmp_path, "--critic-num-gpus-per-node", "1")

    placement = own["placement"]
    assert placement.critic_bundles and not set(placement.critic_bundles) & set(placement.actor_bundles)
    assert not set(placement.critic_bundles) & set(placement.rollout_bundles)
    assert shared["placement"].critic_bundles == [] and shared["critic_world"] == own["critic_world"] == 1
    # the same values, returns and updates whichever bundle the critic runs on (and whether it waits its turn)
    assert own[1] == shared[1] and own[0] == shared[0]
    assert all(torch.equal(a, b) for a, b in zip(own["shard1"]["values"], shared["shard1"]["values"], strict=True))
    for step in (0, 1):
        assert own["records"][step]["critic/value_loss"] == shared["records"][step]["critic/value_loss"]
    # rollout 1: beside the actor's training the critic only has to be waited for; sharing, it has no wait
    assert "time/critic_wait" in own["records"][1] and "time/critic_wait" not in shared["records"][1]
    assert "time/critic_wait" not in own["records"][0]  # rollout 0 trains only the critic


def test_critic_with_more_ranks_than_the_actor(shared, tiny_model_dir, task, tmp_path):
    two = _run(tiny_model_dir, task, tmp_path, "--critic-num-gpus-per-node", "2")
    assert two["critic_world"] == 2 and len(two["placement"].critic_bundles) == 2
    shard = two["shard1"]  # the actor's one rank holds every sample, its values gathered from both critic ranks
    assert [len(v) for v in shard["values"]] == shard["response_lengths"] and len(shard["values"]) == 4
    for a, b in zip(shard["values"], shared["shard1"]["values"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # one update of two halves = one of the whole
    assert two["records"][0]["critic/lr"] == pytest.approx(5e-2)
    for step in (0, 1):  # the same loss over a different split (float sums in another order)
        assert two["records"][step]["critic/value_loss"] == pytest.approx(
            shared["records"][step]["critic/value_loss"], rel=1e-4)
    assert two[1] != two[0]  # the actor trained on rollout 1
