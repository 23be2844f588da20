"""python -m pytest -q tests/test_ppo_handover.py

PPO with --kl-coef: the actor's old / reference log-probs handed to the critic (and back to the actor) are the
ones the actor would compute itself, so the update is unchanged; the critic needs them to shape its rewards."""

from __future__ import annotations

import torch

from test_fsdp_harness import make_args, make_rollout_data, run_ranks

PPO = dict(advantage_estimator="ppo", kl_coef=0.05, global_batch_size=4, micro_batch_size=4, lr=1e-2)


def _scenario(rank: int, world_size: int, model_dir: str) -> dict:
    from slime.backends.fsdp.trainer import FSDPTrainer

    data = make_rollout_data(8, seed=9)
    critic = FSDPTrainer(make_args(model_dir, **PPO), role="critic")
    critic.init()
    data = dict(data, values=critic.compute_values(data))
    out = {}
    try:
        critic.train(0, data)
    except ValueError as e:
        out["critic_without_log_probs"] = str(e)

    own, handed = FSDPTrainer(make_args(model_dir, **PPO)), FSDPTrainer(make_args(model_dir, **PPO))
    own.init()
    handed.init()
    handover = handed.handover_log_probs(data)
    out["keys"] = sorted(handover)
    out["critic_loss"] = critic.train(0, dict(data, **handover))["train/value_loss"]
    own.train(0, data)
    handed.train(0, dict(data, **handover))
    weights = [{n: w.clone() for bucket in t.export_weights(1 << 20) for n, w in bucket} for t in (own, handed)]
    out["same_update"] = all(torch.equal(weights[0][n], weights[1][n]) for n in weights[0])
    return out


def test_handed_over_log_probs_shape_the_critic_and_leave_the_actor_update_unchanged(tmp_path, tiny_model_dir):
    out = run_ranks(_scenario, 1, tmp_path, model_dir=str(tiny_model_dir))[0]
    assert "log_probs" in out["critic_without_log_probs"]
    assert out["keys"] == ["log_probs", "ref_log_probs"] and out["critic_loss"] > 0
    assert out["same_update"]
