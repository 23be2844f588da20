"""Logging flags: `python train.py --use-tensorboard --tb-project-name runs/x --use-wandb --wandb-mode offline ...`."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("logging")
    group.add_argument("--use-wandb", action="store_true", default=False, help="Log to Weights & Biases.")
    group.add_argument("--wandb-mode", choices=["online", "offline", "disabled"], default=None,
                       help="W&B mode (overrides WANDB_MODE).")
    group.add_argument("--wandb-dir", type=str, default=None, help="W&B run directory (default ./wandb).")
    group.add_argument("--wandb-project", type=str, default=None, help="W&B project.")
    group.add_argument("--wandb-group", type=str, default=None, help="W&B group (run name prefix).")
    group.add_argument("--wandb-team", type=str, default=None, help="W&B entity.")
    group.add_argument("--wandb-key", type=str, default=None, help="W&B API key.")
    group.add_argument("--wandb-host", type=str, default=None, help="W&B server URL.")
    group.add_argument("--wandb-run-id", type=str, default=None, help="Resume this W&B run.")
    group.add_argument("--disable-wandb-random-suffix", action="store_false", dest="wandb_random_suffix",
                       help="Do not append a random suffix to the W&B run name.")
    group.add_argument("--use-tensorboard", action="store_true", default=False, help="Log to TensorBoard.")
    group.add_argument("--tb-project-name", type=str, default=None,
                       help="TensorBoard log directory (default: $TENSORBOARD_DIR).")
    group.add_argument("--tb-experiment-name", type=str, default=None, help="TensorBoard run name.")
    group.add_argument("--log-multi-turn", action="store_true", default=False,
                       help="Log multi-turn statistics (turns, tool calls) of rollouts.")
    group.add_argument("--log-passrate", action="store_true", default=False, help="Log pass@k over each prompt's samples.")
    group.add_argument("--log-reward-category", type=str, default=None,
                       help="Key of the reward dict whose values are counted per category.")
    group.add_argument("--log-correct-samples", action="store_true", default=False,
                       help="Log statistics of correct samples separately.")
