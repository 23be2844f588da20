"""Per-step rollout statistics: reward mean/std, response length, truncation rate, tokens/s.

    from slime.logging.rollout_metrics import rollout_metrics
    rollout_metrics(args, samples, seconds=3.2)   # {"rollout/reward_mean": ..., ...}
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from slime.utils.types import Sample, Status


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    if not values:
        return 0.0, 0.0
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / len(values)
    return mean, math.sqrt(var)


def _scalar_reward(args: Any, sample: Sample) -> float | None:
    if sample.reward is None:
        return None
    if isinstance(sample.reward, dict):
        key = getattr(args, "reward_key", None)
        if not key or key not in sample.reward:
            return None
        return float(sample.reward[key])
    return float(sample.reward)


def rollout_metrics(args: Any, samples: Sequence[Sample], seconds: float | None = None, prefix: str = "rollout") -> dict[str, float]:
    """Summary of one rollout's flattened samples; `seconds` (generation wall time) adds tokens/s."""
    rewards = [r for r in (_scalar_reward(args, s) for s in samples) if r is not None]
    lengths = [s.response_length for s in samples]
    reward_mean, reward_std = _mean_std(rewards)
    length_mean, _ = _mean_std(lengths)
    truncated = sum(1 for s in samples if s.status == Status.TRUNCATED)
    metrics = {
        f"{prefix}/num_samples": float(len(samples)),
        f"{prefix}/reward_mean": reward_mean,
        f"{prefix}/reward_std": reward_std,
        f"{prefix}/response_len_mean": length_mean,
        f"{prefix}/response_len_max": float(max(lengths, default=0)),
        f"{prefix}/truncated_ratio": truncated / len(samples) if samples else 0.0,
    }
    if seconds is not None and seconds > 0:
        metrics[f"{prefix}/tokens_per_s"] = sum(lengths) / seconds
    return metrics


def train_data_tokens(rollout_data: dict[str, list]) -> int:
    """Total tokens (prompt + response) that the trainer processes for one rollout."""
    return sum(len(t) for t in rollout_data.get("tokens", []))
