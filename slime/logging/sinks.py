"""Where step metrics go besides stdout: metrics.jsonl, TensorBoard, Weights & Biases.

    from slime.logging.sinks import JsonlSink
    sink = JsonlSink("outputs/run/metrics.jsonl"); sink.write(0, {"rollout/reward_mean": 0.5}); sink.close()
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Protocol


class MetricsSink(Protocol):
    def write(self, step: int, metrics: dict[str, float]) -> None: ...

    def close(self) -> None: ...


def _json_safe(value: float) -> float | None:
    return value if math.isfinite(value) else None


class JsonlSink:
    """One JSON object per line: {"step": N, "<metric>": value, ...}; appends so resumed runs continue the file."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, step: int, metrics: dict[str, float]) -> None:
        record: dict[str, Any] = {"step": step}
        record.update({k: _json_safe(float(v)) for k, v in metrics.items()})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class TensorBoardSink:
    def __init__(self, log_dir: str | os.PathLike) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(log_dir))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self._writer.add_scalar(key, float(value), global_step=step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class WandbSink:
    """`--use-wandb`; `--wandb-mode offline` (or no `--wandb-key` and no WANDB_API_KEY) writes locally, no network."""

    def __init__(self, args: Any, default_dir: str | os.PathLike) -> None:
        try:
            import wandb
        except ImportError as e:
            raise ValueError("--use-wandb needs the wandb package: pip install wandb (or pip install 'slime[wandb]')") from e
        mode = getattr(args, "wandb_mode", None)
        key = getattr(args, "wandb_key", None)
        if mode is None:
            mode = "online" if (key or os.environ.get("WANDB_API_KEY")) else "offline"
        if key and mode == "online":
            wandb.login(key=key, host=getattr(args, "wandb_host", None))
        name = getattr(args, "wandb_group", None) or "slime"
        if not getattr(args, "disable_wandb_random_suffix", False):
            name = f"{name}_{os.urandom(3).hex()}"
        wandb_dir = getattr(args, "wandb_dir", None) or str(default_dir)
        Path(wandb_dir).mkdir(parents=True, exist_ok=True)
        self._run = wandb.init(
            project=getattr(args, "wandb_project", None) or "slime",
            entity=getattr(args, "wandb_team", None),
            group=getattr(args, "wandb_group", None),
            id=getattr(args, "wandb_run_id", None),
            name=name,
            dir=wandb_dir,
            mode=mode,
            resume="allow",
            config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))},
        )

    def write(self, step: int, metrics: dict[str, float]) -> None:
        self._run.log(dict(metrics), step=step)

    def close(self) -> None:
        self._run.finish()
