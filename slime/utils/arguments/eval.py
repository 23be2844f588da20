"""Evaluation flags: `python train.py --eval-prompt-data aime aime.jsonl gsm8k gsm8k.jsonl --eval-interval 5 ...`.

Unset eval sampling flags take the rollout ones after parsing (see validate.py).
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("evaluation")
    group.add_argument("--eval-function-path", type=str, default=None,
                       help="module.attr of the eval rollout function (default: --rollout-function-path).")
    group.add_argument("--eval-interval", type=int, default=None, help="Evaluate every N rollouts.")
    group.add_argument("--eval-prompt-data", type=str, nargs="+", default=None,
                       help="Name/path pairs: --eval-prompt-data aime aime.jsonl gsm8k gsm8k.jsonl.")
    group.add_argument("--eval-config", type=str, default=None,
                       help="YAML of eval datasets with per-dataset sampling, keys and reward "
                            "(slime/utils/arguments/eval_config.py); combines with --eval-prompt-data.")
    group.add_argument("--skip-eval-before-train", action="store_true", default=False,
                       help="Do not evaluate before the first rollout.")
    group.add_argument("--eval-input-key", type=str, default=None, help="Default: --input-key.")
    group.add_argument("--eval-label-key", type=str, default=None, help="Default: --label-key.")
    group.add_argument("--eval-tool-key", type=str, default=None, help="Default: --tool-key.")
    group.add_argument("--n-samples-per-eval-prompt", type=int, default=1, help="Responses per eval prompt.")
    group.add_argument("--eval-temperature", type=float, default=None, help="Default: --rollout-temperature.")
    group.add_argument("--eval-top-p", type=float, default=None, help="Default: --rollout-top-p.")
    group.add_argument("--eval-top-k", type=int, default=None, help="Default: --rollout-top-k.")
    group.add_argument("--eval-max-response-len", type=int, default=None, help="Default: --rollout-max-response-len.")
    group.add_argument("--eval-max-prompt-len", type=int, default=None, help="Default: --rollout-max-prompt-len.")
    group.add_argument("--eval-min-new-tokens", type=int, default=None, help="Least new tokens per eval response.")
    group.add_argument("--eval-max-context-len", type=int, default=None, help="Default: --rollout-max-context-len.")
