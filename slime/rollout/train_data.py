"""Flattened samples -> the dict of lists the trainer consumes (docs/internals.md, "Rollout data handed to the trainer").

    data = samples_to_train_data(args, [s for group in groups for s in group])
    apply_rollout_data_postprocess(args, rollout_id, rollout_data)   # trainer side, after advantages

Rewards: `--custom-reward-post-process-path` `fn(args, samples) -> (raw_rewards, rewards)`, else the
group normalisation of `slime.algo.advantages.group_normalize_rewards_for` for the estimator
(`--disable-rewards-normalization`, `--disable-grpo-std-normalization`).
`--custom-convert-samples-to-train-data-path` `fn(args, samples) -> dict` replaces all of this.
"""

from __future__ import annotations

import inspect
from typing import Any

from slime.utils.plugins import load_function
from slime.utils.types import Sample


def post_process_rewards(args, samples: list[Sample]) -> tuple[list[float], list[float]]:
    path = getattr(args, "custom_reward_post_process_path", None)
    if path:
        fn = load_function(path, flag="--custom-reward-post-process-path")
        result = fn(args, samples)
        if not (isinstance(result, (tuple, list)) and len(result) == 2):
            raise ValueError(f"--custom-reward-post-process-path {path} must return (raw_rewards, rewards)")
        raw, rewards = (list(map(float, r)) for r in result)
        if len(raw) != len(samples) or len(rewards) != len(samples):
            raise ValueError(
                f"--custom-reward-post-process-path {path} returned {len(raw)} raw rewards and {len(rewards)} "
                f"rewards for {len(samples)} samples"
            )
        return raw, rewards
    raw = [float(sample.get_reward_value(args)) for sample in samples]
    from slime.algo.advantages import group_normalize_rewards_for

    estimator = getattr(args, "advantage_estimator", None) or "grpo"
    group_size = getattr(args, "n_samples_per_prompt", 1) or 1
    if len(raw) % group_size != 0:
        raise ValueError(f"{len(raw)} samples cannot be split into groups of --n-samples-per-prompt {group_size} "
                         "for reward normalisation; a fan-out generate needs --custom-reward-post-process-path")
    normalized = group_normalize_rewards_for(
        estimator,
        raw,
        group_size,
        rewards_normalization=not getattr(args, "disable_rewards_normalization", False),
        grpo_std_normalization=not getattr(args, "disable_grpo_std_normalization", False),
    )
    return raw, [float(r) for r in normalized.tolist()]


def _check_sample(sample: Sample, position: int) -> None:
    if sample.reward is None:
        raise ValueError(f"sample {sample.index} (position {position}) has no reward; status {sample.status.value}, "
                         f"reason: {sample.metadata.get('failure_reason', 'unknown')}")
    if sample.response_length > len(sample.tokens):
        raise ValueError(f"sample {sample.index}: response_length {sample.response_length} > {len(sample.tokens)} tokens")
    if sample.loss_mask is not None and len(sample.loss_mask) != sample.response_length:
        raise ValueError(f"sample {sample.index}: loss_mask has {len(sample.loss_mask)} entries for "
                         f"{sample.response_length} response tokens (check the generate function)")
    if sample.rollout_log_probs is not None and len(sample.rollout_log_probs) != sample.response_length:
        raise ValueError(f"sample {sample.index}: rollout_log_probs has {len(sample.rollout_log_probs)} entries for "
                         f"{sample.response_length} response tokens (check the generate function)")


def samples_to_train_data(args, samples: list[Sample]) -> dict[str, Any]:
    path = getattr(args, "custom_convert_samples_to_train_data_path", None)
    if path:
        fn = load_function(path, flag="--custom-convert-samples-to-train-data-path")
        data = fn(args, samples)
        if not isinstance(data, dict) or "tokens" not in data:
            raise ValueError(f"--custom-convert-samples-to-train-data-path {path} must return a dict with 'tokens'")
        return data
    if not samples:
        raise ValueError("no samples to train on")
    for position, sample in enumerate(samples):
        _check_sample(sample, position)
    raw_rewards, rewards = post_process_rewards(args, samples)
    data: dict[str, Any] = {
        "tokens": [list(s.tokens) for s in samples],
        "response_lengths": [s.response_length for s in samples],
        "loss_masks": [list(s.loss_mask) if s.loss_mask is not None else [1] * s.response_length for s in samples],
        "rewards": rewards,
        "raw_reward": raw_rewards,
        "truncated": [1 if s.status == Sample.Status.TRUNCATED else 0 for s in samples],
        "sample_indices": [s.index for s in samples],
    }
    if all(s.rollout_log_probs is not None for s in samples):
        data["rollout_log_probs"] = [list(s.rollout_log_probs) for s in samples]
    return data


def apply_rollout_data_postprocess(args, rollout_id: int, rollout_data: dict[str, Any]) -> None:
    """Call `--rollout-data-postprocess-path` as the original does: `fn(args)` or `fn(args, rollout_id, rollout_data)`."""
    path = getattr(args, "rollout_data_postprocess_path", None)
    if not path:
        return
    fn = load_function(path, flag="--rollout-data-postprocess-path")
    positional = [
        p for p in inspect.signature(fn).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
    ]
    if len(positional) >= 3 or any(p.kind == p.VAR_POSITIONAL for p in positional):
        fn(args, rollout_id, rollout_data)
    else:
        fn(args)
