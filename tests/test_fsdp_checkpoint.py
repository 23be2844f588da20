"""FSDP checkpoints on 2 gloo ranks: save -> load is bit-exact and the next step equals an uninterrupted run;
--no-save-optim; --save-hf loads with from_pretrained; the tracker/atomic-rename layout.

    python -m pytest -q tests/test_fsdp_checkpoint.py
"""

from __future__ import annotations

import pytest
import torch

from test_fsdp_harness import make_args, make_rollout_data, run_ranks

COMMON = dict(global_batch_size=4, micro_batch_size=2, lr=1e-2, lr_decay_style="cosine", lr_warmup_iters=1,
              num_rollout=3, use_kl_loss=True, kl_loss_coef=0.05, weight_decay=0.1)


def _local_params(trainer) -> dict[str, torch.Tensor]:
    from slime.backends.fsdp.ref_model import snapshot_shards

    return snapshot_shards(trainer.model)


def _local_optim(trainer) -> list[dict[str, torch.Tensor]]:
    from torch.distributed.tensor import DTensor

    out = []
    for group in trainer.optimizer.param_groups:
        for p in group["params"]:
            state = trainer.optimizer.state.get(p, {})
            out.append({k: (v.to_local() if isinstance(v, DTensor) else v).clone() for k, v in state.items()})
    return out


def _checkpoint_scenario(rank: int, world_size: int, model_dir: str, save_dir: str, save_dir_no_optim: str,
                         hf_pattern: str) -> dict:
    from slime.ray.data_split import split_rollout_data
    from slime.backends.fsdp.trainer import FSDPTrainer

    shards = [split_rollout_data(make_rollout_data(8, seed=s), world_size, 4)[rank] for s in (2, 3)]
    first = FSDPTrainer(make_args(model_dir, save=save_dir, save_hf=hf_pattern, **COMMON))
    assert first.init() == 0
    first.train(0, shards[0])
    first.save(0)
    saved_params, saved_optim = _local_params(first), _local_optim(first)
    exported_at_save = {n: t.clone() for b in first.export_weights(1 << 20) for n, t in b}
    uninterrupted = first.train(1, shards[1])
    final_params = _local_params(first)

    resumed = FSDPTrainer(make_args(model_dir, load=save_dir, **COMMON))
    start = resumed.init()
    loaded_params, loaded_optim = _local_params(resumed), _local_optim(resumed)
    state = dict(weight_version=resumed.weight_version, lr_steps=resumed.scheduler.num_steps)
    # --ref-load of a --save directory: the reference is that checkpoint's policy
    ref_from_ckpt = FSDPTrainer(make_args(model_dir, ref_load=save_dir, **COMMON))
    ref_from_ckpt.init()
    ref_pairs = (ref_from_ckpt.compute_ref_log_probs(shards[1]), resumed.compute_log_probs(shards[1]),
                 ref_from_ckpt.compute_log_probs(shards[1]))
    continued = resumed.train(1, shards[1])
    continued_params = _local_params(resumed)

    no_optim = FSDPTrainer(make_args(model_dir, save=save_dir_no_optim, no_save_optim=True, **COMMON))
    no_optim.init()
    no_optim.train(0, shards[0])
    no_optim.save(0)
    reloaded = FSDPTrainer(make_args(model_dir, load=save_dir_no_optim, **COMMON))
    no_optim_start = reloaded.init()
    return dict(ref_pairs=ref_pairs, start=start, saved_params=saved_params, saved_optim=saved_optim, loaded_params=loaded_params,
                loaded_optim=loaded_optim, uninterrupted=uninterrupted["steps"], continued=continued["steps"],
                final_params=final_params, continued_params=continued_params, state=state,
                exported_at_save=exported_at_save, no_optim_start=no_optim_start,
                no_optim_params_equal=all(torch.equal(a, b) for a, b in zip(_local_params(no_optim).values(),
                                                                            _local_params(reloaded).values())),
                no_optim_state=len(reloaded.optimizer.state))


def test_save_load_is_bit_exact_and_resumes_identically(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from slime.backends.fsdp.checkpoint import TRACKER, latest_iteration

    save_dir, no_optim_dir = tmp_path / "ckpt", tmp_path / "ckpt-no-optim"
    hf_pattern = str(tmp_path / "hf" / "iter_{rollout_id}")
    results = run_ranks(_checkpoint_scenario, 2, tmp_path, model_dir=str(tiny_model_dir), save_dir=str(save_dir),
                        save_dir_no_optim=str(no_optim_dir), hf_pattern=hf_pattern)

    assert (save_dir / TRACKER).read_text() == "0"
    assert sorted(p.name for p in save_dir.iterdir()) == ["iter_0000000", TRACKER]
    for res in results:
        assert res["start"] == 1
        assert res["state"] == {"weight_version": 2, "lr_steps": 2}
        for name, tensor in res["saved_params"].items():
            assert torch.equal(res["loaded_params"][name], tensor), name
        assert len(res["saved_optim"]) == len(res["loaded_optim"]) > 0
        for saved, loaded in zip(res["saved_optim"], res["loaded_optim"]):
            assert saved.keys() == loaded.keys() and {"exp_avg", "exp_avg_sq", "step"} <= saved.keys()
            for key in saved:
                assert torch.equal(saved[key], loaded[key]), key
        assert res["continued"] == res["uninterrupted"]
        for name, tensor in res["final_params"].items():
            assert torch.equal(res["continued_params"][name], tensor), name
        ref_log_probs, checkpoint_log_probs, initial_log_probs = res["ref_pairs"]
        for ref, expected, initial in zip(ref_log_probs, checkpoint_log_probs, initial_log_probs):
            assert torch.equal(ref, expected) and not torch.equal(ref, initial)
        # --no-save-optim: weights come back, the optimizer starts fresh
        assert res["no_optim_start"] == 1 and res["no_optim_params_equal"] and res["no_optim_state"] == 0

    # --save-hf: a checkpoint from_pretrained loads, equal to the trained weights
    hf_model = AutoModelForCausalLM.from_pretrained(hf_pattern.format(rollout_id=0), dtype=torch.float32)
    loaded = hf_model.state_dict()
    exported = results[0]["exported_at_save"]
    assert set(exported) <= set(loaded)
    for name, tensor in exported.items():
        assert torch.equal(loaded[name], tensor), name
    assert torch.equal(loaded["lm_head.weight"], exported["model.embed_tokens.weight"])
    assert (tmp_path / "hf" / "iter_0" / "tokenizer.json").exists()

    # an interrupted save (a leftover .tmp directory) is never picked up by --load
    (save_dir / "iter_0000005.tmp").mkdir()
    assert latest_iteration(save_dir) == 0


def test_latest_iteration_errors_name_the_load_flag(tmp_path):
    from slime.backends.fsdp.checkpoint import TRACKER, latest_iteration

    assert latest_iteration(None) is None and latest_iteration(tmp_path) is None
    (tmp_path / TRACKER).write_text("seven")
    with pytest.raises(ValueError, match="--load"):
        latest_iteration(tmp_path)
    (tmp_path / TRACKER).write_text("7")
    with pytest.raises(ValueError, match="iter_0000007"):
        latest_iteration(tmp_path)


def _save_hf_scenario(rank: int, world_size: int, model_dir: str, out: str) -> dict:
    from slime.backends.fsdp.trainer import FSDPTrainer

    trainer = FSDPTrainer(make_args(model_dir, **COMMON))
    trainer.init()
    trainer.save_hf(out)
    return {}


def test_save_hf_keeps_the_source_checkpoint_dtype(tmp_path):
    """A bf16 source gives a bf16 --save-hf checkpoint (weights and config), not the fp32 master copy: engines
    load the saved model in its config's dtype, and fp32 decoding is ~4x slower (4xH200, 2026-11-26)."""
    import json

    from safetensors import safe_open

    from slime.backends.fsdp.checkpoint import source_checkpoint_dtype
    from tools.make_tiny_model import make_model

    source = make_model("tiny", tmp_path / "bf16", seed=0, dtype="bfloat16")
    assert source_checkpoint_dtype(source) == torch.bfloat16 and source_checkpoint_dtype(tmp_path / "none") is None
    run_ranks(_save_hf_scenario, 1, tmp_path, model_dir=str(source), out=str(tmp_path / "hf"))
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}  # noqa: SIM118 (safe_open has no __iter__)


def _async_save_scenario(rank: int, world_size: int, model_dir: str, save_dir: str) -> dict:
    import os

    from slime.backends.fsdp.trainer import FSDPTrainer
    from slime.ray.data_split import split_rollout_data

    shards = [split_rollout_data(make_rollout_data(8, seed=s), world_size, 4)[rank] for s in (2, 3, 4)]
    trainer = FSDPTrainer(make_args(model_dir, save=save_dir, async_save=True, **COMMON))
    trainer.init()
    trainer.train(0, shards[0])
    trainer.save(0)  # returns once the state is staged; the write goes on in the background
    saved = _local_params(trainer)
    trainer.train(1, shards[1])  # the weights move while checkpoint 0 is written
    moved = _local_params(trainer)
    trainer.save(1)  # commits checkpoint 0 first
    out = {"tracker_after_second_save": int(open(os.path.join(save_dir, "latest_checkpointed_iteration.txt")).read())}
    trainer.finish_saving()
    out["tracker_at_end"] = int(open(os.path.join(save_dir, "latest_checkpointed_iteration.txt")).read())
    out["entries"] = sorted(os.listdir(save_dir))

    loaded = {}
    for iteration in (0, 1):
        resumed = FSDPTrainer(make_args(model_dir, load=save_dir, start_rollout_id=None, **COMMON))
        from slime.backends.fsdp import checkpoint as ckpt

        resumed.init()  # the latest checkpoint (1)
        if iteration == 0:
            ckpt.load_checkpoint(save_dir, 0, resumed.model, resumed.optimizer)
        loaded[iteration] = _local_params(resumed)
    out["equal_to_staged"] = all(torch.equal(loaded[0][n], saved[n]) for n in saved)
    out["equal_to_moved"] = all(torch.equal(loaded[1][n], moved[n]) for n in moved)
    out["staged_differs_from_moved"] = any(not torch.equal(saved[n], moved[n]) for n in saved)
    return out


def test_async_save_keeps_the_staged_state_and_commits_in_order(tmp_path, tiny_model_dir):
    """--async-save: checkpoint 0 holds the weights of the moment it was saved although training changed them
    while it was written; each checkpoint is committed before the next save and by finish_saving."""
    outs = run_ranks(_async_save_scenario, 2, tmp_path, model_dir=str(tiny_model_dir), save_dir=str(tmp_path / "ck"))
    for out in outs:
        assert out["staged_differs_from_moved"] and out["equal_to_staged"] and out["equal_to_moved"]
        assert out["tracker_after_second_save"] == 0 and out["tracker_at_end"] == 1
        assert out["entries"] == ["iter_0000000", "iter_0000001", "latest_checkpointed_iteration.txt"]
