"""Weight-sync flags: `python train.py --update-weight-transport disk --update-weight-disk-dir /shared/w ...`."""

from __future__ import annotations

import argparse

from slime.utils.arguments.value_types import byte_size


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("weight sync")
    group.add_argument("--update-weight-transport", choices=["nccl", "disk"], default="nccl",
                       help="How new weights reach the engines: tensors (IPC when colocated, broadcast over "
                            "NCCL/gloo otherwise) or an HF checkpoint written to --update-weight-disk-dir.")
    group.add_argument("--update-weight-disk-dir", type=str, default=None,
                       help="Directory shared by trainer and engines for --update-weight-transport disk.")
    group.add_argument("--update-weight-buffer-size", type=byte_size, default=512 * 1024**2,
                       help="Bytes per weight-update bucket (default 512 MiB).")
    group.add_argument("--update-weights-interval", type=int, default=1,
                       help="Push weights to the engines every N rollouts.")
    group.add_argument("--keep-old-actor", action="store_true", default=False,
                       help="Keep a CPU copy of the weights last pushed to the engines and compute the old log-probs "
                            "with it (with --update-weights-interval > 1 the rollouts come from those weights, not "
                            "the current ones); train.py only.")
    group.add_argument("--check-weight-update-equal", action="store_true", default=False,
                       help="At start-up, check that a weight sync writes every engine tensor exactly: the "
                            "engines snapshot their weights, overwrite them with noise, receive the trainer's and "
                            "must equal the snapshot (the run stops naming the tensors that differ).")
