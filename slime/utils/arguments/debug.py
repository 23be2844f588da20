"""Debug flags: `python train.py --save-debug-rollout-data dump/{rollout_id}.pt ...` then
`python train.py --load-debug-rollout-data dump/{rollout_id}.pt ...` (trains on the dump, no engines).
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("debug")
    group.add_argument("--debug-rollout-only", action="store_true", default=False, help="Run rollouts only; no training.")
    group.add_argument("--debug-train-only", action="store_true", default=False, help="Run training only; no engines.")
    group.add_argument("--save-debug-rollout-data", type=str, default=None,
                       help="Save each rollout's samples to this path; '{rollout_id}' is replaced.")
    group.add_argument("--load-debug-rollout-data", type=str, default=None,
                       help="Train on saved rollouts instead of generating ('{rollout_id}' is replaced); "
                            "implies --debug-train-only.")
    group.add_argument("--load-debug-rollout-data-subsample", type=float, default=None,
                       help="Use this fraction of the loaded rollout data (not supported yet).")
    group.add_argument("--save-debug-train-data", type=str, default=None,
                       help="Save what each train rank receives (not supported yet).")
    group.add_argument("--dump-details", type=str, default=None,
                       help="Dump rollout and train data for post-hoc analysis (not supported yet).")
    group.add_argument("--profile-target", type=str, nargs="+", choices=["train_overall", "train_actor", "train_log_probs"],
                       default=None, help="Parts of training to profile (not supported yet).")
    group.add_argument("--record-memory-history", action="store_true", default=False,
                       help="Record CUDA memory history (not supported yet).")
    group.add_argument("--memory-snapshot-dir", type=str, default=".",
                       help="Where memory snapshots go (not supported yet).")
