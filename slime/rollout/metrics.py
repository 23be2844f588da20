"""Rollout bookkeeping: why groups were dropped, how many samples failed (and at which stage), aborts.

    gatherer = RolloutMetrics(); gatherer.on_drop("zero_std_1.0"); gatherer.collect()

Response lengths, rewards and throughput are computed by the rollout manager (slime.logging.rollout_metrics).
"""

from __future__ import annotations

from collections import Counter
from typing import Any



class RolloutMetrics:
    def __init__(self) -> None:
        self.drop_reasons: Counter[str] = Counter()
        self.failure_stages: Counter[str] = Counter()
        self.aborted_groups = 0
        self.partial_groups_returned = 0

    def on_drop(self, reason: str | None) -> None:
        self.drop_reasons[reason or "filtered"] += 1

    def on_failed_sample(self, stage: str | None) -> None:
        self.failure_stages[stage or "unknown"] += 1

    def collect(self) -> dict[str, Any]:
        metrics: dict[str, Any] = {f"rollout/drop/{reason}": count for reason, count in self.drop_reasons.items()}
        metrics["rollout/dropped_groups"] = sum(self.drop_reasons.values())
        metrics["rollout/failed_samples"] = sum(self.failure_stages.values())
        for reason, count in self.failure_stages.items():
            metrics[f"rollout/failed/{reason}"] = count
        metrics["rollout/aborted_groups"] = self.aborted_groups
        metrics["rollout/partial_groups_to_buffer"] = self.partial_groups_returned
        return metrics
