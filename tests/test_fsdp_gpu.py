"""FSDP trainer on CUDA (skipped without a GPU): bf16 mixed precision with fp32 master weights, NCCL,
offload frees GPU memory and onload restores it, checkpoints, and 2 GPUs == 1 GPU when two are present.

    python -m pytest -q tests/test_fsdp_gpu.py
"""

from __future__ import annotations

import pytest
import torch

from test_fsdp_harness import hf_response_log_probs, make_args, make_rollout_data, run_ranks

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

BASE = dict(device="cuda", global_batch_size=4, micro_batch_size=2, use_kl_loss=True, kl_loss_coef=0.1, lr=1e-2)


def _local_bytes(trainer) -> int:
    total = 0
    for p in trainer.model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        total += local.numel() * local.element_size()
    for state in trainer.optimizer.state.values():
        for key, value in state.items():
            if torch.is_tensor(value) and key != "step":
                local = value.to_local() if hasattr(value, "to_local") else value
                total += local.numel() * local.element_size()
    return total


def _gpu_scenario(rank: int, world_size: int, model_dir: str, save_dir: str) -> dict:
    from slime.backends.fsdp.ref_model import snapshot_shards
    from slime.backends.fsdp.trainer import FSDPTrainer

    data = make_rollout_data(8, seed=11)
    out: dict = {}
    trainer = FSDPTrainer(make_args(model_dir, save=save_dir, **BASE))
    trainer.init()
    out["master_dtypes"] = sorted({str(p.dtype) for p in trainer.model.parameters()})
    out["param_devices"] = sorted({p.device.type for p in trainer.model.parameters()})
    out["log_probs"] = trainer.compute_log_probs(data)
    before = snapshot_shards(trainer.model)
    out["metrics"] = trainer.train(0, data)
    after = snapshot_shards(trainer.model)
    out["moved"] = max(float((after[n] - before[n]).abs().max()) for n in before)

    torch.cuda.synchronize()
    resident = _local_bytes(trainer)
    allocated = torch.cuda.memory_allocated()
    trainer.offload()
    out["freed"], out["resident"] = allocated - torch.cuda.memory_allocated(), resident
    out["offloaded_devices"] = sorted({p.device.type for p in trainer.model.parameters()})
    trainer.onload()
    out["onload_equal"] = all(torch.equal(a, after[n]) for n, a in snapshot_shards(trainer.model).items())
    out["second"] = trainer.train(1, data)["steps"]
    out["export_dtypes"] = sorted({str(t.dtype) for b in trainer.export_weights(1 << 16) for _, t in b})

    critic = FSDPTrainer(make_args(model_dir, **dict(BASE, advantage_estimator="ppo", use_kl_loss=False)),
                         role="critic")
    critic.init()
    values = critic.compute_values(data)
    out["value_losses"] = [critic.train(i, data)["train/value_loss"] for i in range(3)]
    out["value_shapes"] = [len(v) for v in values]

    trainer.save(1)
    resumed = FSDPTrainer(make_args(model_dir, load=save_dir, **BASE))
    out["resume_start"] = resumed.init()
    out["resume_equal"] = all(torch.equal(a, snapshot_shards(trainer.model)[n])
                              for n, a in snapshot_shards(resumed.model).items())
    return out


def test_gpu_mixed_precision_offload_and_checkpoint(tmp_path, tiny_model_factory):
    model_dir = tiny_model_factory("small", 0)
    out = run_ranks(_gpu_scenario, 1, tmp_path, backend="nccl", model_dir=str(model_dir),
                    save_dir=str(tmp_path / "ckpt"))[0]
    assert out["master_dtypes"] == ["torch.float32"] and out["param_devices"] == ["cuda"]
    for got, expected in zip(out["log_probs"], hf_response_log_probs(model_dir, make_rollout_data(8, seed=11))):
        torch.testing.assert_close(got, expected, rtol=0, atol=5e-2)  # bf16 compute vs fp32 reference
    steps = out["metrics"]["steps"]
    assert len(steps) == 2 and all(torch.isfinite(torch.tensor(s["grad_norm"])) and s["grad_norm"] > 0 for s in steps)
    assert out["moved"] > 1e-4
    assert out["offloaded_devices"] == ["cpu"]
    assert out["freed"] >= 0.9 * out["resident"] > 0, (out["freed"], out["resident"])
    assert out["onload_equal"] and len(out["second"]) == 2
    assert out["export_dtypes"] == ["torch.bfloat16"]
    assert out["resume_start"] == 2 and out["resume_equal"]
    assert out["value_shapes"] == make_rollout_data(8, seed=11)["response_lengths"]
    assert out["value_losses"][-1] < out["value_losses"][0], out["value_losses"]


def _two_gpu_scenario(rank: int, world_size: int, model_dir: str, overrides: dict | None = None) -> dict:
    from slime.ray.data_split import split_rollout_data
    from slime.backends.fsdp.trainer import FSDPTrainer

    data = make_rollout_data(8, seed=12)
    trainer = FSDPTrainer(make_args(model_dir, **dict(BASE, **(overrides or {}))))
    trainer.init()
    shard = split_rollout_data(data, world_size, 4)[rank]
    steps = trainer.train(0, shard)["steps"]
    weights = {n: t.float().cpu() for b in trainer.export_weights(1 << 20) for n, t in b}
    return dict(steps=steps, weights=weights)


# the communication options of FSDP: gradients reduced once per step (in bf16), layers kept gathered
ONE_REDUCTION = dict(use_dynamic_batch_size=True, max_tokens_per_gpu=40, fsdp_reduce_grads_per_step=True,
                     fsdp_reshard_after_forward="false", fsdp_grad_reduce_dtype="bfloat16")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("overrides", [{}, ONE_REDUCTION], ids=["default", "reduce-once-bf16"])
def test_two_gpus_match_one(tmp_path, tiny_model_dir, overrides):
    one = run_ranks(_two_gpu_scenario, 1, tmp_path, backend="nccl", model_dir=str(tiny_model_dir))[0]
    two = run_ranks(_two_gpu_scenario, 2, tmp_path, backend="nccl", model_dir=str(tiny_model_dir),
                    overrides=overrides)
    for res in two:
        for a, b in zip(res["steps"], one["steps"]):
            for key in ("loss", "pg_loss", "kl_loss", "grad_norm"):
                assert a[key] == pytest.approx(b[key], rel=2e-2, abs=1e-3), key
        for name, tensor in one["weights"].items():
            torch.testing.assert_close(res["weights"][name], tensor, rtol=0, atol=2e-2)
