"""python -m pytest -q tests/test_profiler.py   (--use-pytorch-profiler: traces of training phases, per rank)"""

from __future__ import annotations

import json

from test_fsdp_harness import make_args, make_rollout_data, run_ranks


def _profiled_training(rank: int, world_size: int, model_dir: str, profile_dir: str) -> dict:
    from slime.backends.fsdp.trainer import FSDPTrainer

    data = make_rollout_data(8, seed=3)
    out = {}
    trainer = FSDPTrainer(make_args(model_dir, use_pytorch_profiler=True, profile_step_start=1, profile_step_end=2,
                                    profile_target=["train_actor", "train_log_probs"], recompute_old_log_probs=True,
                                    profile_dir=f"{profile_dir}/phases"))
    trainer.init()
    for rollout_id in range(3):
        trainer.train(rollout_id, data)
    out["phases"] = sorted(p.name for p in trainer.profiler.written)
    trainer = FSDPTrainer(make_args(model_dir, use_pytorch_profiler=True, profile_step_start=0, profile_step_end=1,
                                    profile_target=["train_overall", "train_actor"], recompute_old_log_probs=True,
                                    profile_dir=f"{profile_dir}/overall"))
    trainer.init()
    trainer.train(0, data)
    out["overall"] = sorted(p.name for p in trainer.profiler.written)
    return out


def _event_names(path) -> set[str]:
    return {event.get("name", "") for event in json.loads(path.read_text())["traceEvents"]}


def test_each_rank_traces_the_chosen_phases_of_the_chosen_rollouts(tmp_path, tiny_model_dir):
    outs = run_ranks(_profiled_training, 2, tmp_path, model_dir=str(tiny_model_dir), profile_dir=str(tmp_path))
    for rank, out in enumerate(outs):
        assert out["phases"] == [f"train_actor_rollout1_rank{rank}.json", f"train_log_probs_rollout1_rank{rank}.json"]
        # while train_overall records, train_actor is a range inside its trace, not a file of its own
        assert out["overall"] == [f"train_overall_rollout0_rank{rank}.json"]
    actor = _event_names(tmp_path / "phases" / "train_actor_rollout1_rank0.json")
    log_probs = _event_names(tmp_path / "phases" / "train_log_probs_rollout1_rank0.json")
    assert "train_actor" in actor and any(name.startswith("Optimizer.step") for name in actor)
    assert "train_log_probs" in log_probs and not any(name.startswith("Optimizer.step") for name in log_probs)
    assert any(name.startswith("aten::") for name in log_probs)
    overall = _event_names(tmp_path / "overall" / "train_overall_rollout0_rank1.json")
    assert {"train_overall", "train_actor", "train_log_probs"} <= overall
    assert sorted(p.name for p in (tmp_path / "phases").iterdir()) == sorted(
        f"{phase}_rollout1_rank{rank}.json" for phase in ("train_actor", "train_log_probs") for rank in (0, 1))
