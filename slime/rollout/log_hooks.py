"""`--custom-rollout-log-function-path` / `--custom-eval-rollout-log-function-path`, called as in the original.

    if not call_rollout_log_function(args, rollout_id, samples, extra_metrics, rollout_time): log defaults
    if not call_eval_rollout_log_function(args, rollout_id, data, extra_metrics): log defaults

Signatures: `fn(rollout_id, args, samples, rollout_extra_metrics, rollout_time) -> bool` and
`fn(rollout_id, args, data, extra_metrics) -> bool`; a truthy return skips the default logging.
"""

from __future__ import annotations

from typing import Any

from slime.utils.plugins import load_function
from slime.utils.types import Sample


def call_rollout_log_function(args, rollout_id: int, samples: list[Sample], extra_metrics: dict[str, Any] | None,
                              rollout_time: float) -> bool:
    path = getattr(args, "custom_rollout_log_function_path", None)
    if not path:
        return False
    fn = load_function(path, flag="--custom-rollout-log-function-path")
    return bool(fn(rollout_id, args, samples, extra_metrics, rollout_time))


def call_eval_rollout_log_function(args, rollout_id: int, data: dict[str, Any], extra_metrics: dict[str, Any] | None
                                   ) -> bool:
    path = getattr(args, "custom_eval_rollout_log_function_path", None)
    if not path:
        return False
    fn = load_function(path, flag="--custom-eval-rollout-log-function-path")
    return bool(fn(rollout_id, args, data, extra_metrics))
