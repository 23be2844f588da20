"""Checkpoint flags: `python train.py --save ckpt/ --save-interval 10 --load ckpt/ --save-hf hf/{rollout_id} ...`."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("checkpoints")
    group.add_argument("--load", type=str, default=None, help="Training checkpoint folder to resume from.")
    group.add_argument("--save", type=str, default=None, help="Folder for training checkpoints (iter_XXXXXXX/).")
    group.add_argument("--save-interval", type=int, default=None, help="Save every N rollouts (needs --save).")
    group.add_argument("--no-save-optim", action="store_true", default=False,
                       help="Leave optimizer state out of checkpoints (they cannot resume training then).")
    group.add_argument("--save-hf", type=str, default=None,
                       help="Also write an HF checkpoint to this path; '{rollout_id}' is replaced.")
    group.add_argument("--async-save", action="store_true", default=False,
                       help="Write checkpoints in the background: training goes on once the state is copied to CPU "
                            "memory; each checkpoint is committed (renamed, tracker updated) before the next save "
                            "and at the end of the run.")
    group.add_argument("--no-load-optim", action="store_true", default=False, help="Do not restore optimizer state.")
    group.add_argument("--no-load-rng", action="store_true", default=False, help="Do not restore RNG state.")
    group.add_argument("--finetune", action="store_true", default=False,
                       help="Load weights only (no optimizer, RNG or iteration).")
    group.add_argument("--ckpt-step", type=int, default=None, help="Iteration to load from --load (default: latest).")
