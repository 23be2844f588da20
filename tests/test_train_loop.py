"""End-to-end CPU runs through Ray: colocated, disaggregated with resume, async with disk sync, debug dumps.

    python -m pytest -q tests/test_train_loop.py

Each run starts real engine servers, a router, train actors (gloo) and a rollout manager on one
shared local Ray session. Weight syncs are checked by comparing the engine's log-probs of freshly
sampled tokens with the trainer's log-probs of the same tokens.
"""

from __future__ import annotations

import json

import pytest
import torch

from ray_helpers import logprob_gap, ray_session, tiny_task, train_argv
from slime.train_loop import parse_train_args, run, run_async

PROMPTS = [[1, 10, 20, 30], [1, 40, 50]]


@pytest.fixture(scope="module")
def ray_module():
    ray = ray_session()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return tiny_task(tmp_path_factory.mktemp("task"))


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_colocated_tensor_sync_respects_interval(ray_module, tiny_model_dir, task, tmp_path):
    gaps: dict[int, float] = {}

    def on_step(loop, rollout_id, rollout_data, metrics):
        gaps[rollout_id] = logprob_gap(loop, PROMPTS)

    args = parse_train_args(train_argv(tiny_model_dir, task, "--colocate", "--update-weights-interval", "2",
                                       "--check-weight-update-equal", "--keep-old-actor",
                                       "--eval-prompt-data", "heldout", str(task["test"]), "--eval-interval", "2",
                                       "--eval-top-k", "1", "--metrics-dir", str(tmp_path),
                                       "--custom-rollout-log-function-path", "tests.ray_helpers.record_rollout_log",
                                       "--custom-eval-rollout-log-function-path", "tests.ray_helpers.record_eval_log"))
    summary = run(args, on_step=on_step)
    assert gaps[0] > 1e-3, "no sync at step 0 (interval 2): the engine must still hold the old weights"
    assert gaps[1] < 1e-4, f"after the sync the engine's log-probs must equal the trainer's (gap {gaps[1]})"
    assert summary.weight_version == 2 and sorted(summary.evals) == [0, 2]
    records = _records(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2]
    assert "eval/heldout" in records[0] and "eval/heldout" in records[2]
    for key in ("rollout/reward_mean", "rollout/truncated_ratio"):
        assert key in records[0], key
    # the engine's own share of the rollout, from its /get_server_info counters
    assert records[0]["rollout/engine_steps"] >= 1 and 0 < records[0]["time/engine_busy"] < records[0]["time/rollout"]
    for key in ("train/grad_norm", "time/train", "train/tokens_per_s"):
        assert key in records[1], key
    assert "time/update_weights" in records[1] and "time/update_weights" not in records[0]
    custom = _records(tmp_path / "custom_rollout_log.jsonl")
    assert [r["rollout_id"] for r in custom] == [0, 1] and all(r["num_samples"] > 0 for r in custom)
    assert "rollout/reward_mean" not in records[1] and "time/rollout" in records[1]  # the plugin returned True
    assert _records(tmp_path / "custom_eval_log.jsonl") == [{"rollout_id": 0, "datasets": ["heldout"]},
                                                            {"rollout_id": 2, "datasets": ["heldout"]}]


def test_disaggregated_broadcast_sync_and_resume(ray_module, tiny_model_dir, task, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    digests: dict[str, str] = {}
    gaps: list[float] = []

    class Crash(Exception):
        pass

    def record_then_crash(loop, rollout_id, rollout_data, metrics):
        gaps.append(logprob_gap(loop, PROMPTS))
        if rollout_id == 1:
            digests["saved"] = loop.trainer.weights_digest()
        if rollout_id == 2:
            raise Crash  # the run dies after rollout 2; the last checkpoint is rollout 1's

    common = ("--rollout-num-gpus", "1", "--save-interval", "2", "--rollout-shuffle")
    args = parse_train_args(train_argv(tiny_model_dir, task, *common, "--save", str(first),
                                       "--save-debug-rollout-data", str(first / "dump_{rollout_id}.pt"), rollouts=4))
    with pytest.raises(Crash):
        run(args, on_step=record_then_crash)
    assert max(gaps) < 1e-4, f"broadcast (gloo) sync left a log-prob gap: {gaps}"

    def record_start(loop, start):
        digests["resumed"] = loop.trainer.weights_digest()
        digests["start"] = str(start)
        gaps.append(logprob_gap(loop, PROMPTS))  # resumed weights were pushed to the fresh engine

    args = parse_train_args(train_argv(tiny_model_dir, task, *common, "--load", str(first), "--save", str(second),
                                       "--save-debug-rollout-data", str(second / "dump_{rollout_id}.pt"),
                                       "--check-weight-update-equal", rollouts=4))
    summary = run(args, on_start=record_start)
    assert digests["start"] == "2" and summary.start_rollout_id == 2
    assert digests["resumed"] == digests["saved"], "weights after --load differ from the ones saved at rollout 1"
    assert gaps[-1] < 1e-4
    a = torch.load(first / "dump_2.pt", weights_only=False)["samples"]
    b = torch.load(second / "dump_2.pt", weights_only=False)["samples"]
    assert [(s["index"], s["prompt"], s["label"]) for s in a] == [(s["index"], s["prompt"], s["label"]) for s in b]
    assert (second / "dump_3.pt").exists() and not (second / "dump_1.pt").exists()


def test_async_with_disk_sync(ray_module, tiny_model_dir, task, tmp_path):
    gaps: list[float] = []
    versions: list[float] = []

    def on_step(loop, rollout_id, rollout_data, metrics):
        versions.append(metrics["train/weight_version"])
        gaps.append(logprob_gap(loop, PROMPTS))

    args = parse_train_args(train_argv(tiny_model_dir, task, "--rollout-num-gpus", "1", "--update-weight-transport", "disk",
                                       "--update-weight-disk-dir", str(tmp_path / "w"), "--metrics-dir", str(tmp_path),
                                       rollouts=3))
    summary = run_async(args, on_step=on_step)
    assert versions == [1, 2, 3] and summary.weight_version == 3
    assert max(gaps) < 1e-4, gaps
    assert len(_records(tmp_path / "metrics.jsonl")) == 3


def test_async_refuses_colocate(tiny_model_dir, task):
    args = parse_train_args(train_argv(tiny_model_dir, task, "--colocate"))
    with pytest.raises(ValueError, match="does not support --colocate"):
        run_async(args)
    args = parse_train_args(train_argv(tiny_model_dir, task, "--rollout-num-gpus", "1", "--keep-old-actor"))
    with pytest.raises(ValueError, match="does not support --keep-old-actor"):
        run_async(args)


def test_debug_rollout_only_then_train_on_exactly_the_dump(ray_module, tiny_model_dir, task, tmp_path):
    from slime.ray.rollout_manager import load_debug_rollout_data
    from slime.rollout.train_data import samples_to_train_data

    dump = str(tmp_path / "rollout_{rollout_id}.pt")
    args = parse_train_args(train_argv(tiny_model_dir, task, "--debug-rollout-only", "--save-debug-rollout-data", dump))
    summary = run(args)
    assert summary.weight_version is None
    received: dict[int, dict] = {}

    def on_step(loop, rollout_id, rollout_data, metrics):
        shards = loop.trainer.last_rollout_data()
        assert len(shards) == 1
        received[rollout_id] = shards[0]

    train_dump = str(tmp_path / "train_{rollout_id}_{rank}.pt")
    args = parse_train_args(train_argv(tiny_model_dir, task, "--load-debug-rollout-data", dump,
                                       "--save-debug-train-data", train_dump))
    assert args.debug_train_only
    run(args, on_step=on_step)
    for rollout_id in (0, 1):
        saved = load_debug_rollout_data(dump, rollout_id)
        assert len(saved) == 4 and all(s.response_length > 0 for s in saved)
        assert received[rollout_id] == samples_to_train_data(args, saved)
        train_saved = torch.load(train_dump.format(rollout_id=rollout_id, rank=0), weights_only=False)
        assert train_saved["rank"] == 0 and train_saved["rollout_data"] == received[rollout_id]

    # half of each dump's prompt groups (whole groups: the first group's two samples)
    received.clear()
    args = parse_train_args(train_argv(tiny_model_dir, task, "--load-debug-rollout-data", dump,
                                       "--load-debug-rollout-data-subsample", "0.5"))
    run(args, on_step=on_step)
    for rollout_id in (0, 1):
        saved = load_debug_rollout_data(dump, rollout_id)
        first_group = [s for s in saved if s.group_index == saved[0].group_index]
        assert len(first_group) == 2
        assert received[rollout_id] == samples_to_train_data(args, first_group)


def test_sglang_backend_without_sglang_fails_before_starting(tiny_model_dir, task, capsys):
    import importlib.util

    from slime.train_loop import main

    if importlib.util.find_spec("sglang") is not None:
        pytest.skip("SGLang is installed here")
    with pytest.raises(SystemExit) as exit_info:
        main(train_argv(tiny_model_dir, task, "--rollout-num-gpus", "1", "--rollout-backend", "sglang"))
    assert exit_info.value.code == 2
    assert "--rollout-backend sglang needs SGLang installed" in capsys.readouterr().err


def test_ppo_trains_a_critic_beside_the_actor_and_resumes_both(ray_module, tiny_model_dir, task, tmp_path):
    """--advantage-estimator ppo: a critic group on the actor's bundles (colocated with the engine here) computes
    the values the actor's GAE uses, trains on its own returns, checkpoints under <save>/critic and resumes."""
    digests: dict[str, str] = {}
    received: dict[int, dict | None] = {}

    def on_start(loop, start):
        digests["initial"] = loop.trainer.weights_digest()

    def on_step(loop, rollout_id, rollout_data, metrics):
        digests[str(rollout_id)] = loop.trainer.weights_digest()
        received[rollout_id] = loop.trainer.last_rollout_data()[0]

    ckpt = tmp_path / "ckpt"
    ppo = ("--colocate", "--advantage-estimator", "ppo", "--num-critic-only-steps", "1", "--critic-lr", "5e-2",
           "--save-interval", "2", "--kl-coef", "0.05")
    args = parse_train_args(train_argv(tiny_model_dir, task, *ppo, "--save", str(ckpt), "--metrics-dir",
                                       str(tmp_path)))
    run(args, on_start=on_start, on_step=on_step)
    records = _records(tmp_path / "metrics.jsonl")
    # rollout 0 trains only the critic (at its own learning rate); rollout 1 both
    assert "critic/value_loss" in records[0] and records[0]["critic/lr"] == pytest.approx(5e-2)
    assert "train/grad_norm" not in records[0] and received[0] is None and digests["0"] == digests["initial"]
    assert "critic/value_loss" in records[1] and records[1]["train/lr"] == pytest.approx(1e-2)
    assert digests["1"] != digests["0"]
    shard = received[1]
    for key in ("values", "log_probs", "ref_log_probs"):  # --kl-coef: the critic shaped its rewards with these
        assert [len(v) for v in shard[key]] == shard["response_lengths"], key
    assert "time/log_probs" in records[1]
    assert (ckpt / "critic" / "latest_checkpointed_iteration.txt").exists()

    def on_resume(loop, start):
        digests["resumed"] = loop.trainer.weights_digest()
        digests["start"] = str(start)

    args = parse_train_args(train_argv(tiny_model_dir, task, *ppo, "--load", str(ckpt), "--save",
                                       str(tmp_path / "again"), rollouts=3))
    summary = run(args, on_start=on_resume)
    assert digests["start"] == "2" and digests["resumed"] == digests["1"]
    assert summary.last_metrics["critic/value_loss"] >= 0
