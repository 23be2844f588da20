"""Reward-model flags: `python train.py --rm-type math ...` or `--custom-rm-path my_pkg.rewards.score ...`."""

from __future__ import annotations

import argparse

from slime.utils.arguments.value_types import rm_type


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("reward model")
    group.add_argument("--rm-type", type=rm_type, default=None,
                       help="Built-in reward: math, dapo, deepscaler, f1, gpqa, remote_rm, random; "
                            "a boxed_ prefix extracts \\boxed{} from the response first.")
    group.add_argument("--reward-key", type=str, default=None,
                       help="Key of the reward value when the reward function returns a dict.")
    group.add_argument("--eval-reward-key", type=str, default=None, help="Default: --reward-key.")
    group.add_argument("--group-rm", action="store_true", default=False,
                       help="Score a whole group at once: reward(args, samples) -> list.")
    group.add_argument("--rm-url", type=str, default=None, help="URL of the reward service for --rm-type remote_rm.")
    group.add_argument("--custom-rm-path", type=str, default=None,
                       help="module.attr of async reward(args, sample, **kw) -> float | dict.")
    group.add_argument("--custom-reward-post-process-path", type=str, default=None,
                       help="module.attr of fn(args, samples) -> (raw_rewards, rewards).")
    group.add_argument("--custom-convert-samples-to-train-data-path", type=str, default=None,
                       help="module.attr of fn(args, samples) -> dict replacing the default conversion.")
    group.add_argument("--rm-timeout", type=float, default=300.0,
                       help="Seconds one reward call may take before its sample is marked FAILED (0: no limit).")
