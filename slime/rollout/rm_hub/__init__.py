"""Reward hub: `--rm-type` dispatch and `--custom-rm-path` / `--group-rm` plugins.

    reward = await async_rm(args, sample)             # one sample
    rewards = await batched_async_rm(args, samples)   # a list (one call to a --group-rm plugin)

`--rm-type` (or `sample.metadata["rm_type"]`): math, dapo, deepscaler, f1, gpqa, remote_rm, random;
a `boxed_` prefix (e.g. `boxed_f1`) scores the content of the last `\\boxed{}` only.
Errors propagate; `slime.rollout.rewarding` turns them into FAILED samples with the reason.
"""

from __future__ import annotations

import asyncio
import inspect
import random
from typing import Any, Callable

from slime.utils.types import Sample

from ..errors import RolloutConfigError, load_plugin
from .dapo import compute_dapo_score
from .deepscaler import compute_deepscaler_reward
from .f1 import compute_f1_reward
from .gpqa import compute_gpqa_reward
from .math_utils import compute_math_reward, extract_boxed_answer
from .remote import remote_rm

__all__ = ["async_rm", "batched_async_rm", "rule_based_reward", "RM_TYPES"]

RM_TYPES = ("math", "dapo", "deepscaler", "f1", "gpqa", "remote_rm", "random")


def rule_based_reward(rm_type: str, response: str, label: Any, metadata: dict | None = None) -> Any:
    """A built-in (local, synchronous) reward; `rm_type` may carry the `boxed_` prefix."""
    if rm_type.startswith("boxed_"):
        response = extract_boxed_answer(response) or ""
        rm_type = rm_type[len("boxed_") :]
    if rm_type == "math":
        return compute_math_reward(response, label)
    if rm_type == "dapo":
        return compute_dapo_score(response, label)
    if rm_type == "deepscaler":
        return compute_deepscaler_reward(response, label)
    if rm_type == "f1":
        return compute_f1_reward(response, label)
    if rm_type == "gpqa":
        return compute_gpqa_reward(response, label, metadata=metadata)
    if rm_type == "random":
        return random.randint(0, 1)
    raise RolloutConfigError(f"unknown --rm-type {rm_type!r}; choose one of {', '.join(RM_TYPES)} (optionally with boxed_)")


async def _call_plugin(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Await async plugins; run sync ones in a thread so a slow one cannot stall the event loop."""
    if inspect.iscoroutinefunction(fn):
        return await fn(*args, **kwargs)
    result = await asyncio.to_thread(fn, *args, **kwargs)
    if inspect.isawaitable(result):
        result = await result
    return result


async def async_rm(args, sample: Sample, **kwargs: Any) -> Any:
    custom_path = getattr(sample, "custom_rm_path", None) or getattr(args, "custom_rm_path", None)
    if custom_path:
        fn = load_plugin(custom_path, "--custom-rm-path")
        return await _call_plugin(fn, args, sample, **kwargs)
    metadata = sample.metadata if isinstance(sample.metadata, dict) else {}
    rm_type = str(metadata.get("rm_type") or getattr(args, "rm_type", None) or "").strip()
    if not rm_type:
        raise RolloutConfigError("no reward function: set --rm-type or --custom-rm-path")
    if rm_type == "remote_rm":
        return await remote_rm(args, sample)
    if rm_type == "boxed_remote_rm":
        raise RolloutConfigError("--rm-type boxed_remote_rm is not supported: the remote reward server sees the full response")
    return rule_based_reward(rm_type, sample.response, sample.label, metadata)


async def batched_async_rm(args, samples: list[Sample], **kwargs: Any) -> list[Any]:
    """Rewards for a list of samples: one call to a custom (group) plugin, else one async_rm per sample."""
    custom_path = getattr(args, "custom_rm_path", None)
    if custom_path:
        fn = load_plugin(custom_path, "--custom-rm-path")
        rewards = await _call_plugin(fn, args, samples, **kwargs)
        if not isinstance(rewards, (list, tuple)) or len(rewards) != len(samples):
            raise ValueError(
                f"--custom-rm-path {custom_path} (batched / --group-rm) must return a list of "
                f"{len(samples)} rewards, got {type(rewards).__name__}"
                + (f" of length {len(rewards)}" if isinstance(rewards, (list, tuple)) else "")
            )
        return list(rewards)
    return list(await asyncio.gather(*(async_rm(args, sample, **kwargs) for sample in samples)))
