"""Debug flags: `python train.py --save-debug-rollout-data dump/{rollout_id}.pt ...` then
`python train.py --load-debug-rollout-data dump/{rollout_id}.pt ...` (trains on the dump, no engines);
`--dump-details DIR` saves the rollouts and what each train rank received (`slime/ray/debug_dumps.py`);
`--use-pytorch-profiler --profile-target train_actor` traces training phases (`slime/logging/profiler.py`).
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
                       help="Train on the first fraction (0, 1] of each loaded rollout's prompt groups (whole groups, "
                            "rounded up until the train ranks divide the samples).")
    group.add_argument("--save-debug-train-data", type=str, default=None,
                       help="Save the rollout data each train rank receives; fields '{rollout_id}' and '{rank}'.")
    group.add_argument("--dump-details", type=str, default=None,
                       help="Directory for both dumps: rollout_data/{rollout_id}.pt and "
                            "train_data/{rollout_id}_{rank}.pt (unless --save-debug-rollout-data / "
                            "--save-debug-train-data name their own paths).")
    group.add_argument("--use-pytorch-profiler", action="store_true", default=False,
                       help="Write torch.profiler traces of --profile-target for rollouts in [--profile-step-start, "
                            "--profile-step-end) (slime/logging/profiler.py).")
    group.add_argument("--profile-step-start", type=int, default=10, help="First profiled rollout id.")
    group.add_argument("--profile-step-end", type=int, default=12, help="Profiled rollouts end before this id.")
    group.add_argument("--profile-target", type=str, nargs="+", choices=["train_overall", "train_actor", "train_log_probs"],
                       default=["train_overall"], help="Training phases to trace (one file per phase, rollout and "
                                                       "rank).")
    group.add_argument("--profile-dir", type=str, default="profiles", help="Where the traces go.")
    group.add_argument("--record-memory-history", action="store_true", default=False,
                       help="Record CUDA memory history (not supported yet).")
    group.add_argument("--memory-snapshot-dir", type=str, default=".",
                       help="Where memory snapshots go (not supported yet).")
