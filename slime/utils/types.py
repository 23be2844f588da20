"""Core data types shared by rollout, data buffer and trainer.

    python -c "from slime.utils.types import Sample; print(Sample(prompt='1+1=').to_dict())"

`Sample` keeps the field names of the original slime so that existing plugins
(`sample.tokens`, `sample.loss_mask`, `Sample.Status.COMPLETED`, ...) run unchanged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class Status(Enum):
    PENDING = "pending"
    COMPLETED = "completed"
    TRUNCATED = "truncated"
    ABORTED = "aborted"
    FAILED = "failed"


@dataclass
class Sample:
    """One prompt + one response (or a multi-turn trajectory) as it moves through rollout and training."""

    Status = Status  # plugins written for the original use `Sample.Status.X`

    group_index: int | None = None
    index: int | None = None
    prompt: str | list[dict[str, Any]] = ""
    tokens: list[int] = field(default_factory=list)  # prompt ids followed by response ids
    response: str = ""
    response_length: int = 0
    label: Any = None
    reward: float | dict[str, Any] | None = None
    loss_mask: list[int] | None = None  # one entry per response token; 0 for tool output
    rollout_log_probs: list[float] | None = None  # one entry per response token
    status: Status = Status.PENDING
    metadata: dict[str, Any] = field(default_factory=dict)
    weight_versions: list[str] = field(default_factory=list)
    train_metadata: dict[str, Any] | None = None
    remove_sample: bool = False

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["status"] = self.status.value
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Sample":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"Sample.from_dict: unknown field(s) {sorted(unknown)}")
        values = dict(data)
        if "status" in values and not isinstance(values["status"], Status):
            values["status"] = Status(values["status"])
        return cls(**values)

    @property
    def prompt_length(self) -> int:
        return len(self.tokens) - self.response_length

    @property
    def effective_response_length(self) -> int:
        return sum(self.loss_mask) if self.loss_mask is not None else self.response_length

    def get_reward_value(self, args) -> float:
        """The scalar reward; `--reward-key` picks one entry of a dict reward."""
        key = getattr(args, "reward_key", None)
        if isinstance(self.reward, dict):
            if not key:
                raise ValueError("reward is a dict: set --reward-key to pick the entry to train on")
            return self.reward[key]
        return self.reward
