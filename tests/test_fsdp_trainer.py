"""FSDP trainer on 2 gloo ranks vs one process: same losses, same updates, dynamic batching, weight export.

    python -m pytest -q tests/test_fsdp_trainer.py
"""

from __future__ import annotations

import torch

from test_fsdp_harness import hf_response_log_probs, make_args, make_rollout_data, run_ranks

NUM_SAMPLES = 8
# adam_eps far above |grad| makes Adam's first update lr * g / eps: linear in the gradient, so equal
# weights after a step mean equal gradients (with the default eps the update is ~lr * sign(g)).
BASE = dict(global_batch_size=4, micro_batch_size=2, use_kl_loss=True, kl_loss_coef=0.1, entropy_coef=0.01,
            adam_eps=1e3, lr=1.0, clip_grad=0.0)


def _train_configs(rank: int, world_size: int, model_dir: str, configs: list[dict]) -> list[dict]:
    from slime.ray.data_split import split_rollout_data
    from slime.backends.fsdp.checkpoint import full_state_dict
    from slime.backends.fsdp.model import hf_name
    from slime.backends.fsdp.trainer import FSDPTrainer

    results = []
    data = make_rollout_data(NUM_SAMPLES, seed=1)
    for overrides in configs:
        overrides = dict(overrides)
        uneven = overrides.pop("uneven_shards", False)
        args = make_args(model_dir, **overrides)
        shard = split_rollout_data(data, world_size, args.global_batch_size)[rank]
        if uneven:  # rank 0 holds 5 samples, rank 1 holds 3: rank 1 runs empty micro-batches
            cut = 5 if rank == 0 else 3
            shard = {k: (v[:5] if rank == 0 else v[5:]) if isinstance(v, list) else v for k, v in data.items()}
            assert len(shard["tokens"]) == cut
        trainer = FSDPTrainer(args)
        assert trainer.init() == 0
        initial_log_probs = trainer.compute_log_probs(shard)
        initial = {n: t.clone() for bucket in trainer.export_weights(1 << 20) for n, t in bucket}
        metrics = trainer.train(0, shard)
        sharded = _every_layer_sharded(trainer.model)  # before export: it gathers the full weights itself
        exported = [[(n, t.clone()) for n, t in bucket] for bucket in trainer.export_weights(4096)]
        full = {hf_name(k): v for k, v in full_state_dict(trainer.model).items()}
        results.append(dict(metrics=metrics, exported=exported, sharded_after_train=sharded, initial=initial, full=full, sample_indices=shard["sample_indices"],
                            initial_log_probs=initial_log_probs, weight_version=trainer.weight_version,
                            ref_log_probs=None if trainer.ref_shards is None else trainer.compute_ref_log_probs(shard)))
    return results


def _every_layer_sharded(model) -> bool:
    """FSDP2 state of every sharded module: its parameters are back to their shards (no gathered copy held)."""
    from torch.distributed.fsdp import FSDPModule

    groups = [m._get_fsdp_state()._fsdp_param_group for m in model.modules() if isinstance(m, FSDPModule)]
    return all(group.is_sharded for group in groups if group is not None)


def _flat(exported):
    return {n: t for bucket in exported for n, t in bucket}


def _assert_close_metrics(a: list[dict], b: list[dict], rtol=1e-5, atol=1e-6):
    assert len(a) == len(b)
    for step_a, step_b in zip(a, b):
        assert step_a.keys() == step_b.keys()
        for key in step_a:
            assert abs(step_a[key] - step_b[key]) <= atol + rtol * abs(step_b[key]), (key, step_a[key], step_b[key])


def test_two_ranks_equal_one_process_and_dynamic_batching_equals_fixed(tmp_path, tiny_model_dir):
    dynamic = dict(BASE, use_dynamic_batch_size=True, max_tokens_per_gpu=20, micro_batch_size=1)
    one_step = dict(BASE, global_batch_size=8, micro_batch_size=1)
    uneven = dict(one_step, uneven_shards=True)
    per_token = dict(BASE, calculate_per_token_loss=True)
    # gradients reduced once per optimizer step, layers kept gathered from forward to backward
    reduce_once = dict(dynamic, fsdp_reduce_grads_per_step=True, fsdp_reshard_after_forward="false")
    single, single_one_step, single_per_token = run_ranks(_train_configs, 1, tmp_path, model_dir=str(tiny_model_dir),
                                                          configs=[BASE, one_step, per_token])[0]
    two = run_ranks(_train_configs, 2, tmp_path, model_dir=str(tiny_model_dir),
                    configs=[BASE, dynamic, uneven, per_token, reduce_once])

    # both optimizer steps: same loss terms, grad norm and lr as the single-process reference
    steps_single = single["metrics"]["steps"]
    assert len(steps_single) == 2 and single["weight_version"] == 2
    assert {"loss", "pg_loss", "kl_loss", "entropy_loss", "grad_norm", "lr"} <= steps_single[0].keys()
    assert steps_single[0]["grad_norm"] > 0
    for rank_result in two:
        _assert_close_metrics(rank_result[0]["metrics"]["steps"], steps_single)
        _assert_close_metrics(rank_result[1]["metrics"]["steps"], steps_single)
    assert abs(two[0][0]["metrics"]["train/train_rollout_logprob_abs_diff"]
               - single["metrics"]["train/train_rollout_logprob_abs_diff"]) < 1e-5

    # updated weights: 2 ranks == 1 process, dynamic == fixed micro-batches, and the step moved them
    reference = _flat(single["exported"])
    initial = single["initial"]
    moved = max(float((reference[n] - initial[n]).abs().max()) for n in reference)
    assert moved > 1e-4
    for rank_result in two:
        for config_result, expected in zip(rank_result, [single, single, single_one_step, single_per_token, single],
                                           strict=True):
            got, want = _flat(config_result["exported"]), _flat(expected["exported"])
            assert got.keys() == want.keys()
            for name in want:
                torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)
        # uneven shards (empty micro-batches on rank 1) still give the one-process update
        _assert_close_metrics(rank_result[2]["metrics"]["steps"], single_one_step["metrics"]["steps"])
        # --calculate-per-token-loss: divided by the loss tokens of the whole step over all ranks
        _assert_close_metrics(rank_result[3]["metrics"]["steps"], single_per_token["metrics"]["steps"])
        _assert_close_metrics(rank_result[4]["metrics"]["steps"], steps_single)
        # reduce-once keeps the layers gathered between micro-batches, but a step ends sharded like the others
        assert all(config_result["sharded_after_train"] for config_result in rank_result)
    assert single_per_token["metrics"]["steps"][0]["loss"] != single["metrics"]["steps"][0]["loss"]

    # exported buckets == the model's full state dict (tied lm_head exported once, as embed_tokens)
    full = two[0][0]["full"]
    exported = _flat(two[0][0]["exported"])
    assert set(full) - set(exported) == {"lm_head.weight"}
    for name, tensor in exported.items():
        assert torch.equal(tensor, full[name]), name
    assert all(sum(t.numel() * t.element_size() for _, t in b[:-1]) < 4096 for b in two[0][0]["exported"])

    # trainer log-probs (packed rows) == plain HF forward per sample, before training
    hf = hf_response_log_probs(tiny_model_dir, make_rollout_data(NUM_SAMPLES, seed=1))
    for rank_result in two:
        res = rank_result[0]
        for idx, lp in zip(res["sample_indices"], res["initial_log_probs"]):
            torch.testing.assert_close(lp, hf[idx], rtol=1e-5, atol=1e-5)
            # reference model = the initial weights, still after training
        for idx, lp in zip(res["sample_indices"], res["ref_log_probs"]):
            torch.testing.assert_close(lp, hf[idx], rtol=1e-5, atol=1e-5)


def test_one_step_per_rollout_skips_the_old_log_prob_pass_with_the_same_update(tmp_path, tiny_model_dir):
    one_step = dict(BASE, global_batch_size=8, micro_batch_size=2, use_kl_loss=False, kl_loss_coef=0.0)
    skipped, recomputed, two_steps = run_ranks(
        _train_configs, 1, tmp_path, model_dir=str(tiny_model_dir),
        configs=[one_step, dict(one_step, recompute_old_log_probs=True), BASE])[0]
    assert skipped["metrics"]["train/log_probs_time_s"] == 0.0
    assert recomputed["metrics"]["train/log_probs_time_s"] > 0.0
    assert two_steps["metrics"]["train/log_probs_time_s"] > 0.0  # two optimizer steps: the second needs old log-probs
    # the update is the same (Adam's first step is linear in the gradient here: see BASE)
    got, want = _flat(skipped["exported"]), _flat(recomputed["exported"])
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)
    (step_skipped,), (step_recomputed,) = skipped["metrics"]["steps"], recomputed["metrics"]["steps"]
    for key in ("loss", "pg_loss", "entropy_loss", "grad_norm"):
        assert abs(step_skipped[key] - step_recomputed[key]) <= 1e-6 + 1e-5 * abs(step_recomputed[key]), key
    assert step_skipped["ppo_kl"] == 0.0 and step_skipped["pg_clipfrac"] == 0.0
    # the train/rollout mismatch is still reported, now measured in the training forward
    assert abs(skipped["metrics"]["train/train_rollout_logprob_abs_diff"]
               - recomputed["metrics"]["train/train_rollout_logprob_abs_diff"]) < 1e-5
    assert skipped["metrics"]["train/train_rollout_logprob_abs_diff"] > 0.0
