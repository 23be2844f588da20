"""Per-step metrics: one compact stdout line plus metrics.jsonl, TensorBoard and wandb when enabled.

    from slime.logging.metrics import MetricsLogger
    logger = MetricsLogger.from_args(args)        # output dir: --metrics-dir, else --save, else none
    logger.log(rollout_id, {"rollout/reward_mean": 0.5, "train/grad_norm": 1.2, "time/train": 3.0})
    logger.close()
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from slime.logging.sinks import JsonlSink, MetricsSink, TensorBoardSink, WandbSink

logger = logging.getLogger(__name__)

# (label on the stdout line, metric-name suffixes that feed it, format)
_LINE_FIELDS: list[tuple[str, tuple[str, ...], str]] = [
    ("reward", ("rollout/reward_mean",), "{:.3f}"),
    ("±", ("rollout/reward_std",), "{:.3f}"),
    ("len", ("rollout/response_len_mean",), "{:.1f}"),
    ("trunc", ("rollout/truncated_ratio",), "{:.2f}"),
    ("loss", ("train/loss", "train/pg_loss", "train/sft_loss"), "{:.4f}"),
    ("kl", ("train/kl_loss", "train/kl", "train/ppo_kl"), "{:.4f}"),
    ("ent", ("train/entropy_loss", "train/entropy"), "{:.3f}"),
    ("clip", ("train/pg_clipfrac", "train/clipfrac", "train/clip_fraction"), "{:.3f}"),
    ("gnorm", ("train/grad_norm",), "{:.3f}"),
    ("eval", ("eval/accuracy", "eval/reward_mean"), "{:.3f}"),
]


def format_metrics_line(step: int, metrics: dict[str, float]) -> str:
    """`step 3 | reward 0.412±0.201 len 4.1 ... | rollout 2.1s train 1.3s | gen 310 tok/s train 900 tok/s`."""
    parts = [f"step {step}"]
    stats: list[str] = []
    for label, keys, fmt in _LINE_FIELDS:
        key = next((k for k in keys if k in metrics), None)
        if key is None:
            continue
        text = fmt.format(metrics[key])
        if label == "±" and stats:
            stats[-1] += f"±{text}"
        elif label != "±":
            stats.append(f"{label} {text}")
    if stats:
        parts.append(" ".join(stats))
    times = [f"{k[len('time/'):]} {v:.1f}s" for k, v in metrics.items() if k.startswith("time/")]
    if times:
        parts.append(" ".join(times))
    speeds = []
    if "rollout/tokens_per_s" in metrics:
        speeds.append(f"gen {metrics['rollout/tokens_per_s']:.0f} tok/s")
    if "train/tokens_per_s" in metrics:
        speeds.append(f"train {metrics['train/tokens_per_s']:.0f} tok/s")
    if speeds:
        parts.append(" ".join(speeds))
    return " | ".join(parts)


class MetricsLogger:
    """Fan one dict of floats per step out to stdout and the enabled sinks."""

    def __init__(self, output_dir: str | os.PathLike | None, sinks: list[MetricsSink] | None = None, print_line: bool = True) -> None:
        self.output_dir = Path(output_dir) if output_dir else None
        self.sinks: list[MetricsSink] = list(sinks or [])
        if self.output_dir is not None:
            self.sinks.insert(0, JsonlSink(self.output_dir / "metrics.jsonl"))
        self.print_line = print_line

    @classmethod
    def from_args(cls, args: Any) -> "MetricsLogger":
        output_dir = getattr(args, "metrics_dir", None) or getattr(args, "save", None)
        base = Path(output_dir) if output_dir else Path("outputs")
        sinks: list[MetricsSink] = []
        if getattr(args, "use_tensorboard", False):
            tb_dir = os.environ.get("TENSORBOARD_DIR") or base / "tensorboard" / (
                getattr(args, "tb_experiment_name", None) or getattr(args, "tb_project_name", None) or "slime"
            )
            sinks.append(TensorBoardSink(tb_dir))
        if getattr(args, "use_wandb", False):
            sinks.append(WandbSink(args, base / "wandb"))
        return cls(output_dir, sinks)

    def log(self, step: int, metrics: dict[str, Any]) -> dict[str, float]:
        numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.print_line:
            print(format_metrics_line(step, numeric), flush=True)
        for sink in self.sinks:
            sink.write(step, numeric)
        return numeric

    def close(self) -> None:
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as e:  # one broken sink must not hide the others' data
                logger.warning("closing metrics sink %s failed: %s", type(sink).__name__, e)
        self.sinks = []
