"""Helpers shared by the Ray tests: one Ray session per module, tiny runs, engine-vs-trainer log-prob gaps.

    from tests.ray_helpers import ray_session, tiny_task, train_argv, logprob_gap
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import httpx

os.environ.setdefault("SLIME_PROGRESS", "0")


async def alternating_reward(args: Any, sample: Any, **kwargs: Any) -> float:
    """Reward plugin for tests (`--custom-rm-path tests.ray_helpers.alternating_reward`): group members differ,
    so every group has a non-zero advantage and every rollout changes the weights."""
    return float(sample.index % 2)


def record_rollout_log(rollout_id: int, args: Any, samples: list, extra_metrics: Any, rollout_time: float) -> bool:
    """--custom-rollout-log-function-path plugin (original signature): one line per rollout in --metrics-dir;
    returns True ("logged it myself") at rollout 2 only, so the default rollout metrics are dropped there."""
    with open(Path(args.metrics_dir) / "custom_rollout_log.jsonl", "a") as f:
        f.write(json.dumps({"rollout_id": rollout_id, "num_samples": len(samples), "seconds": rollout_time}) + "\n")
    return rollout_id == 1


def record_eval_log(rollout_id: int, args: Any, data: dict, extra_metrics: Any) -> bool:
    """--custom-eval-rollout-log-function-path plugin (original signature); keeps the default eval metrics."""
    with open(Path(args.metrics_dir) / "custom_eval_log.jsonl", "a") as f:
        f.write(json.dumps({"rollout_id": rollout_id, "datasets": sorted(data)}) + "\n")
    return False


def ray_session(num_cpus: int = 8):
    """Start a local Ray once for a test module; the caller shuts it down."""
    import ray

    from slime.ray.placement import start_local_ray

    if not ray.is_initialized():
        start_local_ray(num_cpus, log_to_driver=False)
    return ray


def tiny_task(root: Path) -> dict[str, Path]:
    from slime.data.synthetic import make_arithmetic_dataset

    return make_arithmetic_dataset(root / "data", n_train=40, n_test=8, max_operand=9, ops="+", seed=0)


def train_argv(model: Path, data: dict[str, Path], *extra: str, rollouts: int = 2) -> list[str]:
    return [
        "--hf-checkpoint", str(model), "--prompt-data", str(data["train"]), "--input-key", "messages",
        "--label-key", "label", "--apply-chat-template", "--custom-rm-path", "tests.ray_helpers.alternating_reward",
        "--rollout-batch-size", "2", "--n-samples-per-prompt", "2", "--rollout-max-response-len", "3",
        "--num-rollout", str(rollouts), "--actor-num-nodes", "1", "--actor-num-gpus-per-node", "1",
        "--lr", "1e-2", "--use-dynamic-batch-size", "--max-tokens-per-gpu", "512", "--seed", "1",
        *extra,
    ]


def logprob_gap(loop: Any, prompts: list[list[int]], max_new_tokens: int = 4) -> float:
    """Largest |engine log-prob - trainer log-prob| over tokens the engine samples now for `prompts`."""
    url = loop.engines[0]["url"]
    tokens, lengths, engine_lps = [], [], []
    for ids in prompts:
        r = httpx.post(f"{url}/generate", json={"input_ids": ids, "return_logprob": True, "sampling_params": {
            "max_new_tokens": max_new_tokens, "temperature": 1.0, "ignore_eos": True}}, timeout=120)
        r.raise_for_status()
        body = r.json()
        out = body["output_ids"]
        tokens.append(ids + out)
        lengths.append(len(out))
        engine_lps.append([float(x[0]) for x in body["meta_info"]["output_token_logprobs"]])
    data = {"tokens": tokens, "response_lengths": lengths, "loss_masks": [[1] * n for n in lengths],
            "rewards": [0.0] * len(tokens)}
    trainer_lps = loop.trainer.compute_log_probs(data)
    return max(abs(a - b) for e, t in zip(engine_lps, trainer_lps) for a, b in zip(e, t))


async def starts_with_one_reward(args: Any, sample: Any, **kwargs: Any) -> float:
    """An easily learnt reward (`--custom-rm-path tests.ray_helpers.starts_with_one_reward`): the answer starts with 1."""
    return 1.0 if sample.response.strip().startswith("1") else 0.0
