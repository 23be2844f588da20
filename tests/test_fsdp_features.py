"""FSDP trainer features on one gloo rank: freezing, offload/onload, chunking, temperature, --ref-load,
activation checkpointing, custom loss, LR in metrics, --reset-optimizer-states.

    python -m pytest -q tests/test_fsdp_features.py
"""

from __future__ import annotations

import pytest
import torch

from test_fsdp_harness import hf_response_log_probs, make_args, make_rollout_data, run_ranks

BASE = dict(global_batch_size=4, micro_batch_size=3, lr=1e-2)


def sft_like_custom_loss(args, batch, logits, sum_of_sample_mean):
    """A --custom-loss-function-path plugin: masked NLL of the response tokens, from the packed row's logits."""
    log_probs, offset = [], 0
    logp = torch.log_softmax(logits[0].float(), -1)
    for tokens, total, resp in zip(batch["unconcat_tokens"], batch["total_lengths"], batch["response_lengths"]):
        positions = torch.arange(offset + total - resp - 1, offset + total - 1)
        log_probs.append(logp[positions, tokens[total - resp:]])
        offset += total
    loss = -sum_of_sample_mean(torch.cat(log_probs))
    return loss, {"custom_nll": loss.detach()}


POSTPROCESS_SEEN: list = []


def zero_advantages(args, rollout_id, rollout_data):
    """A --rollout-data-postprocess-path plugin (original signature) that silences the policy gradient."""
    POSTPROCESS_SEEN.append((rollout_id, sorted(k for k in ("advantages", "log_probs", "returns") if k in rollout_data)))
    rollout_data["advantages"] = [a * 0 for a in rollout_data["advantages"]]


def _params(trainer) -> dict[str, torch.Tensor]:
    return {n: t.clone() for b in trainer.export_weights(1 << 20) for n, t in b}


def _max_diff(a: dict, b: dict) -> dict[str, float]:
    return {n: float((a[n] - b[n]).abs().max()) for n in a}


def _features(rank: int, world_size: int, model_dir: str, other_model_dir: str) -> dict:
    from slime.backends.fsdp.trainer import FSDPTrainer

    data = make_rollout_data(8, seed=7)
    out: dict = {}

    # freezing: only layer 1's MLP moves
    trainer = FSDPTrainer(make_args(model_dir, only_train_params_name_list=[r"layers\.1\.mlp"], **BASE))
    trainer.init()
    before = _params(trainer)
    trainer.train(0, data)
    out["freeze_diff"] = _max_diff(_params(trainer), before)

    # --rollout-data-postprocess-path runs after advantages, before the optimizer steps
    post_args = make_args(model_dir, **BASE)
    post_args.rollout_data_postprocess_path = "test_fsdp_features.zero_advantages"
    trainer = FSDPTrainer(post_args)
    trainer.init()
    before = _params(trainer)
    trainer.train(3, data)
    out["postprocess_diff"] = _max_diff(_params(trainer), before)
    out["postprocess_seen"] = list(POSTPROCESS_SEEN)

    # offload / onload round trip keeps params and optimizer state; training continues identically
    trainer = FSDPTrainer(make_args(model_dir, **BASE))
    twin = FSDPTrainer(make_args(model_dir, **BASE))
    trainer.init(), twin.init()
    trainer.train(0, data), twin.train(0, data)
    optim_before = [{k: v.to_local().clone() if hasattr(v, "to_local") else v.clone() for k, v in s.items()}
                    for s in trainer.optimizer.state.values()]
    params_before = _params(trainer)
    trainer.offload()
    out["offloaded_devices"] = sorted({p.device.type for p in trainer.model.parameters()})
    trainer.onload()
    optim_after = [{k: v.to_local() if hasattr(v, "to_local") else v for k, v in s.items()}
                   for s in trainer.optimizer.state.values()]
    out["offload_params_equal"] = all(torch.equal(a, params_before[n]) for n, a in _params(trainer).items())
    out["offload_optim_equal"] = len(optim_before) > 0 and all(
        torch.equal(a[k], b[k]) for a, b in zip(optim_before, optim_after) for k in a)
    m1, m2 = trainer.train(1, data), twin.train(1, data)
    out["offload_then_train_equal"] = m1["steps"] == m2["steps"] and all(
        torch.equal(a, b) for a, b in zip(_params(trainer).values(), _params(twin).values()))

    # chunked == unchunked log-probs; temperature divides the logits
    chunked = FSDPTrainer(make_args(model_dir, log_probs_chunk_size=3, rollout_temperature=0.7, **BASE))
    chunked.init()
    whole = FSDPTrainer(make_args(model_dir, log_probs_chunk_size=-1, rollout_temperature=0.7, **BASE))
    whole.init()
    out["chunked"] = chunked.compute_log_probs(data)
    out["whole"] = whole.compute_log_probs(data)

    # --ref-load from another HF checkpoint; initial weights are the policy's
    ref = FSDPTrainer(make_args(model_dir, ref_load=other_model_dir, use_kl_loss=True, **BASE))
    ref.init()
    out["ref_other"] = ref.compute_ref_log_probs(data)
    out["policy_initial"] = ref.compute_log_probs(data)
    follow = FSDPTrainer(make_args(model_dir, ref_update_interval=1, use_kl_loss=True, **BASE))
    follow.init()
    follow.train(0, data)
    out["ref_follows"] = (follow.compute_ref_log_probs(data), follow.compute_log_probs(data))

    # activation checkpointing gives the same step
    plain = FSDPTrainer(make_args(model_dir, **BASE))
    plain.init()
    recompute = FSDPTrainer(make_args(model_dir, recompute_granularity="full", **BASE))
    recompute.init()
    out["recompute_layers"] = [getattr(layer, "gradient_checkpointing", False) for layer in recompute.model.hf.model.layers]
    out["recompute_steps"] = (plain.train(0, data)["steps"], recompute.train(0, data)["steps"])
    out["recompute_diff"] = _max_diff(_params(plain), _params(recompute))

    # custom loss plugin (logits) == built-in sft loss
    sft = FSDPTrainer(make_args(model_dir, loss_type="sft_loss", **BASE))
    sft.init()
    custom = FSDPTrainer(make_args(model_dir, loss_type="custom_loss",
                                   custom_loss_function_path="test_fsdp_features.sft_like_custom_loss", **BASE))
    custom.init()
    out["sft_steps"], out["custom_steps"] = sft.train(0, data)["steps"], custom.train(0, data)["steps"]
    out["custom_diff"] = _max_diff(_params(sft), _params(custom))

    # PPO: the critic learns its value targets; the actor trains with the critic's values (GAE)
    critic = FSDPTrainer(make_args(model_dir, advantage_estimator="ppo", **BASE), role="critic")
    critic.init()
    out["values"] = critic.compute_values(data)
    out["value_losses"] = [critic.train(i, data)["train/value_loss"] for i in range(4)]
    actor = FSDPTrainer(make_args(model_dir, advantage_estimator="ppo", **BASE))
    actor.init()
    try:
        actor.train(0, data)
    except ValueError as exc:
        out["ppo_without_values"] = str(exc)
    out["ppo_actor_steps"] = actor.train(0, dict(data, values=out["values"]))["steps"]

    # LR warmup shows in the metrics; --reset-optimizer-states clears Adam state before training
    warm = FSDPTrainer(make_args(model_dir, lr_warmup_iters=2, lr_decay_style="linear", num_rollout=2,
                                 reset_optimizer_states=True, **BASE))
    warm.init()
    out["lrs"] = [s["lr"] for s in warm.train(0, data)["steps"]]
    out["adam_steps_after_reset"] = sorted({float(s["step"]) for s in warm.optimizer.state.values()})
    warm.train(1, data)
    out["adam_steps_after_second"] = sorted({float(s["step"]) for s in warm.optimizer.state.values()})
    return out


def test_trainer_features(tmp_path, tiny_model_factory):
    model_dir, other_dir = tiny_model_factory("tiny", 0), tiny_model_factory("tiny", 1)
    out = run_ranks(_features, 1, tmp_path, model_dir=str(model_dir), other_model_dir=str(other_dir))[0]

    frozen = {n: d for n, d in out["freeze_diff"].items() if "layers.1.mlp" not in n}
    trained = {n: d for n, d in out["freeze_diff"].items() if "layers.1.mlp" in n}
    assert len(trained) == 3 and all(d > 0 for d in trained.values())
    assert all(d == 0 for d in frozen.values())

    assert out["postprocess_seen"] == [(3, ["advantages", "log_probs", "returns"])]
    assert max(out["postprocess_diff"].values()) == 0.0  # zeroed advantages: no update

    assert out["offloaded_devices"] == ["cpu"]
    assert out["offload_params_equal"] and out["offload_optim_equal"] and out["offload_then_train_equal"]

    data = make_rollout_data(8, seed=7)
    hf_hot = hf_response_log_probs(model_dir, data, temperature=0.7)
    for a, b, expected in zip(out["chunked"], out["whole"], hf_hot):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(a, expected, rtol=1e-5, atol=1e-5)

    for got, expected in zip(out["ref_other"], hf_response_log_probs(other_dir, data)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for got, expected in zip(out["policy_initial"], hf_response_log_probs(model_dir, data)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    assert out["recompute_layers"] == [True, True]
    ref_after, policy_after = out["ref_follows"]  # --ref-update-interval 1: ref = actor after each rollout
    for got, expected, initial in zip(ref_after, policy_after, out["policy_initial"]):
        assert torch.equal(got, expected) and not torch.equal(got, initial)
    plain_steps, recompute_steps = out["recompute_steps"]
    for a, b in zip(plain_steps, recompute_steps):
        assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6) for k in a)
    assert max(out["recompute_diff"].values()) < 1e-6

    assert len(out["custom_steps"]) == 2 and "custom_nll" in out["custom_steps"][0]
    for a, b in zip(out["sft_steps"], out["custom_steps"]):
        assert b["custom_nll"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
    assert max(out["custom_diff"].values()) < 1e-4  # the steps moved weights by ~lr = 1e-2

    assert [len(v) for v in out["values"]] == data["response_lengths"]
    losses = out["value_losses"]
    assert losses[-1] < 0.5 * losses[0], losses
    assert "critic's values" in out["ppo_without_values"]
    assert len(out["ppo_actor_steps"]) == 2 and out["ppo_actor_steps"][0]["grad_norm"] > 0

    assert out["lrs"] == pytest.approx([0.0, 0.5e-2])
    assert out["adam_steps_after_reset"] == [2.0] and out["adam_steps_after_second"] == [2.0]
