"""Rollout plugins for the reliability tests: sampling seeded by the sample's index, so a resumed run
draws exactly the tokens an uninterrupted run draws.

    --custom-generate-function-path reliability_plugins.seeded_generate   (tests/ on PYTHONPATH)
"""

from __future__ import annotations

from typing import Any

from slime.rollout.generate import generate
from slime.utils.types import Sample


async def seeded_generate(args: Any, sample: Sample, sampling_params: dict[str, Any]) -> Sample:
    return await generate(args, sample, dict(sampling_params, sampling_seed=int(sample.index)))


async def token_parity_reward(args: Any, sample: Sample, **kwargs: Any) -> float:
    """A deterministic reward that differs within a group, so GRPO advantages (and weight updates) are non-zero."""
    return float(sum(sample.tokens[-max(sample.response_length, 1):]) % 3)
