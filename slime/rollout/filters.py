"""Dynamic sampling filters (`--dynamic-sampling-filter-path`) and the helper that calls them.

    --dynamic-sampling-filter-path slime.rollout.filters.check_reward_nonzero_std
    (also importable as slime.rollout.filter_hub.dynamic_sampling_filters.check_reward_nonzero_std)

A filter is `fn(args, group: list[Sample], **kwargs) -> bool | DynamicFilterOutput`; False drops the group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from slime.utils.types import Sample


@dataclass
class DynamicFilterOutput:
    keep: bool
    reason: str | None = None


def _first(item: Sample | list[Sample]) -> Sample:
    return item[0] if isinstance(item, list) else item


def check_reward_nonzero_std(args, samples: list[Sample], **kwargs: Any) -> DynamicFilterOutput:
    """Keep a group only if its rewards are not all equal (all-equal groups carry no GRPO signal)."""
    rewards = [float(_first(s).get_reward_value(args)) for s in samples]
    mean = sum(rewards) / len(rewards)
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / len(rewards))
    keep = len(rewards) > 1 and std > 1e-6
    return DynamicFilterOutput(keep=keep, reason=None if keep else f"zero_std_{round(rewards[0], 1)}")


def call_dynamic_filter(fn: Callable[..., Any] | None, args, group: list[Sample]) -> DynamicFilterOutput:
    if fn is None:
        return DynamicFilterOutput(keep=True)
    output = fn(args, group)
    if isinstance(output, DynamicFilterOutput):
        return output
    if hasattr(output, "keep"):  # a plugin's own dataclass of the same shape
        return DynamicFilterOutput(keep=bool(output.keep), reason=getattr(output, "reason", None))
    if isinstance(output, bool) or output in (0, 1):
        return DynamicFilterOutput(keep=bool(output))
    raise ValueError(
        f"--dynamic-sampling-filter-path returned {type(output).__name__}; expected bool or DynamicFilterOutput"
    )
