"""`--rollout-sample-hook-path` (repeatable): `hook(args, sample, *, rollout_id=None, evaluation=False) -> Sample | None`.

    sample = await apply_rollout_sample_hooks(args, sample, rollout_id=3, evaluation=False)

Hooks run in the given order after generation and before the reward; sync or async; returning None keeps
the sample, returning a Sample replaces it. Keyword arguments a hook does not declare are not passed.
Lists (a generate function that fans out) get the hooks applied to every sample.
"""

from __future__ import annotations

import inspect
from typing import Any

from slime.utils.plugins import call_maybe_async, load_function
from slime.utils.types import Sample


def _accepted(fn, kwargs: dict[str, Any]) -> dict[str, Any]:
    params = inspect.signature(fn).parameters.values()
    if any(p.kind == p.VAR_KEYWORD for p in params):
        return kwargs
    names = {p.name for p in params}
    return {k: v for k, v in kwargs.items() if k in names}


def hook_paths(args) -> list[str]:
    paths = getattr(args, "rollout_sample_hook_path", None) or []
    return [paths] if isinstance(paths, str) else list(paths)


async def apply_rollout_sample_hooks(args, value: Sample | list, **kwargs: Any) -> Sample | list:
    paths = hook_paths(args)
    if not paths:
        return value
    if isinstance(value, list):
        return [await apply_rollout_sample_hooks(args, item, **kwargs) for item in value]
    if not isinstance(value, Sample):
        raise ValueError(f"--rollout-sample-hook-path hooks expect a Sample, got {type(value).__name__}")
    sample = value
    for path in paths:
        hook = load_function(path, flag="--rollout-sample-hook-path")
        result = await call_maybe_async(hook, args, sample, **_accepted(hook, kwargs))
        if result is None:
            continue
        if not isinstance(result, Sample):
            raise ValueError(f"--rollout-sample-hook-path {path} returned {type(result).__name__}; expected Sample or None")
        sample = result
    return sample
