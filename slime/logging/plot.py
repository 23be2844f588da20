"""Reward-curve PNG from metrics.jsonl.

    python -m slime.logging.plot outputs/quickstart/metrics.jsonl outputs/quickstart/reward_curve.png
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def read_metrics(path: str | os.PathLike) -> list[dict]:
    records = []
    for line_no, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{line_no}: not a JSON line ({e.msg})") from e
    return records


def plot_reward_curve(
    metrics_path: str | os.PathLike,
    png_path: str | os.PathLike,
    keys: tuple[str, ...] = ("rollout/reward_mean", "eval/accuracy"),
    title: str = "reward",
) -> Path:
    """Plot each key present in the file against step; raises ValueError when none is present."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    plotted = 0
    for key in keys:
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", markersize=3, label=key)
            plotted += 1
    if plotted == 0:
        plt.close(fig)
        raise ValueError(f"{metrics_path}: no values for any of {list(keys)} to plot")
    ax.set_xlabel("rollout step")
    ax.set_ylabel("value")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return png_path


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        raise SystemExit("usage: python -m slime.logging.plot METRICS_JSONL OUTPUT_PNG")
    print(plot_reward_curve(argv[0], argv[1]))


if __name__ == "__main__":
    main()
