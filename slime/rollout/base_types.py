"""Return types of rollout functions (`--rollout-function-path`), named as in the original slime.

    from slime.rollout.base_types import RolloutFnTrainOutput, RolloutFnEvalOutput

A rollout function may return a bare `list[list[Sample]]` (train) or a bare
`{dataset: {"rewards", "truncated", "samples"}}` dict (eval); the named tuples add metrics.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from slime.utils.types import Sample


class RolloutFnTrainOutput(NamedTuple):
    samples: list[list[Sample]]
    metrics: dict[str, Any] | None = None


class RolloutFnEvalOutput(NamedTuple):
    data: dict[str, dict[str, list[Any]]]
    metrics: dict[str, Any] | None = None


def split_train_output(output: Any) -> tuple[list[list[Sample]], dict[str, Any]]:
    """Accept what a train rollout function may return and give `(groups, metrics)`."""
    if isinstance(output, RolloutFnTrainOutput):
        return output.samples, dict(output.metrics or {})
    if isinstance(output, list):
        return output, {}
    raise ValueError(
        "--rollout-function-path returned "
        f"{type(output).__name__}; expected list[list[Sample]] or RolloutFnTrainOutput"
    )


def split_eval_output(output: Any) -> tuple[dict[str, dict[str, list[Any]]], dict[str, Any]]:
    """Accept what an eval rollout function may return and give `(data, metrics)`."""
    if isinstance(output, RolloutFnEvalOutput):
        return output.data, dict(output.metrics or {})
    if isinstance(output, dict):
        return output, {}
    raise ValueError(
        "--eval-function-path returned "
        f"{type(output).__name__}; expected dict or RolloutFnEvalOutput"
    )
