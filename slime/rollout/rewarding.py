"""Score samples without losing them: a reward function that raises, hangs or returns junk marks the sample FAILED.

    await score_sample(args, sample)        # sets sample.reward, or status FAILED + metadata["failure_reason"]
    await score_group(args, group)          # --group-rm: one call for the whole group

Timeout per call: `args.rm_timeout` seconds (default 300). Sync plugins run in a worker thread so the
timeout applies to them too; an `async def` that blocks the event loop cannot be interrupted.
"""

from __future__ import annotations

import asyncio
import math
import numbers
from typing import Any

from slime.utils.types import Sample

from .errors import RolloutConfigError
from .rm_hub import async_rm, batched_async_rm

DEFAULT_RM_TIMEOUT_S = 300.0
FAILURE_REASON_KEY = "failure_reason"
FAILURE_STAGE_KEY = "failure_stage"  # "generate", "reward" or "group_reward": the metric's name


def mark_failed(sample: Sample, reason: str, stage: str) -> None:
    sample.status = Sample.Status.FAILED
    sample.reward = None
    sample.metadata[FAILURE_REASON_KEY] = reason
    sample.metadata[FAILURE_STAGE_KEY] = stage


def failure_reason(sample: Sample) -> str | None:
    return sample.metadata.get(FAILURE_REASON_KEY) if isinstance(sample.metadata, dict) else None


def check_reward(args, reward: Any) -> str | None:
    """None when the reward is usable, else what is wrong with it (NaN/inf count as wrong)."""
    if isinstance(reward, (bool, numbers.Real)):
        return None if math.isfinite(float(reward)) else f"reward function returned {reward}"
    if isinstance(reward, dict):
        keys = [k for k in (getattr(args, "reward_key", None), getattr(args, "eval_reward_key", None)) if k]
        if not keys:
            return f"reward is a dict with keys {sorted(reward)}: set --reward-key to pick one"
        present = [k for k in keys if k in reward]
        if not present:
            return f"--reward-key {keys[0]!r} is not in the reward dict (keys: {sorted(reward)})"
        value = reward[present[0]]
        if not isinstance(value, (bool, numbers.Real)) or not math.isfinite(float(value)):
            return f"reward[{present[0]!r}] is {value!r:.40}, not a finite number"
        return None
    return f"reward function returned {type(reward).__name__} ({reward!r:.80}); expected a number or a dict"


def _timeout(args) -> float | None:
    value = getattr(args, "rm_timeout", None)
    return DEFAULT_RM_TIMEOUT_S if value is None else (float(value) if value > 0 else None)


def _describe(error: BaseException) -> str:
    if isinstance(error, asyncio.TimeoutError):
        return "timed out"
    return f"{type(error).__name__}: {error}"


async def score_sample(args, sample: Sample) -> None:
    """Fill `sample.reward` (skipped when a generate function already did)."""
    if sample.reward is not None or sample.status in (Sample.Status.FAILED, Sample.Status.ABORTED):
        return
    timeout = _timeout(args)
    try:
        reward = await asyncio.wait_for(async_rm(args, sample), timeout)
    except RolloutConfigError:
        raise  # unknown --rm-type, bad plugin path: every sample would fail the same way
    except Exception as e:  # noqa: BLE001 - any plugin failure must become a FAILED sample, not a crash
        what = f"after {timeout:g}s" if isinstance(e, asyncio.TimeoutError) else ""
        mark_failed(sample, f"reward {_describe(e)} {what}".strip(), "reward")
        return
    problem = check_reward(args, reward)
    if problem:
        mark_failed(sample, f"reward: {problem}", "reward")
        return
    sample.reward = reward


async def score_group(args, group: list[Sample]) -> None:
    """--group-rm: one reward call for all usable samples of a group; on error every one of them FAILS."""
    todo = [s for s in group if s.status not in (Sample.Status.FAILED, Sample.Status.ABORTED)]
    if not todo:
        return
    timeout = _timeout(args)
    try:
        rewards = await asyncio.wait_for(batched_async_rm(args, todo), timeout)
    except RolloutConfigError:
        raise
    except Exception as e:  # noqa: BLE001
        what = f"after {timeout:g}s" if isinstance(e, asyncio.TimeoutError) else ""
        for sample in todo:
            mark_failed(sample, f"group reward {_describe(e)} {what}".strip(), "group_reward")
        return
    for sample, reward in zip(todo, rewards):
        problem = check_reward(args, reward)
        if problem:
            mark_failed(sample, f"group reward: {problem}", "group_reward")
        else:
            sample.reward = reward
