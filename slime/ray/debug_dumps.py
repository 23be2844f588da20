"""Debug dumps of what a run generated and trained on; `python train.py --dump-details dump/ ...` writes both.

    python train.py ... --save-debug-rollout-data dump/{rollout_id}.pt --debug-rollout-only
    python train.py ... --load-debug-rollout-data dump/{rollout_id}.pt --load-debug-rollout-data-subsample 0.25

A rollout dump holds the rollout's samples (`Sample.to_dict`); a train dump (--save-debug-train-data, fields
{rollout_id} and {rank}) holds the rollout data one train rank received. Both are written atomically.
"""

from __future__ import annotations

import math
import os
import pickle
from pathlib import Path
from typing import Any

from slime.utils.types import Sample


def debug_rollout_path(template: str, rollout_id: int) -> Path:
    try:
        return Path(template.format(rollout_id=rollout_id))
    except (KeyError, IndexError) as e:
        raise ValueError(f"debug rollout data path {template!r} may only use the {{rollout_id}} field") from e


def save_debug_rollout_data(template: str, rollout_id: int, samples: list[Sample]) -> Path:
    path = debug_rollout_path(template, rollout_id)
    _atomic_save({"rollout_id": rollout_id, "samples": [s.to_dict() for s in samples]}, path)
    return path


def load_debug_rollout_data(template: str, rollout_id: int) -> list[Sample]:
    import torch

    path = debug_rollout_path(template, rollout_id)
    if not path.exists():
        raise ValueError(f"--load-debug-rollout-data: {path} does not exist (rollout {rollout_id})")
    try:
        data = torch.load(path, weights_only=False)
        return [Sample.from_dict(d) for d in data["samples"]]
    except (KeyError, TypeError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise ValueError(f"--load-debug-rollout-data: {path} is not a slime rollout dump ({e})") from e


def subsample_groups(samples: list[Sample], fraction: float, multiple_of: int = 1) -> list[Sample]:
    """The first ceil(fraction * groups) whole groups (samples of one `group_index`; a sample without one is its
    own group), in their order: GRPO's group statistics stay those of complete groups. More groups follow while
    the sample count is not a multiple of `multiple_of` (the train ranks split the samples evenly)."""
    groups: dict[Any, list[Sample]] = {}
    for position, sample in enumerate(samples):
        key = ("group", sample.group_index) if sample.group_index is not None else ("sample", position)
        groups.setdefault(key, []).append(sample)
    ordered = list(groups.values())
    keep = max(1, math.ceil(fraction * len(ordered)))
    while keep < len(ordered) and sum(len(group) for group in ordered[:keep]) % multiple_of:
        keep += 1
    return [sample for group in ordered[:keep] for sample in group]


def save_debug_train_data(template: str, rollout_id: int, rank: int, rollout_data: dict[str, Any]) -> Path:
    """What train rank `rank` received for `rollout_id` (tensors as they arrived, on the CPU)."""
    path = Path(template.format(rollout_id=rollout_id, rank=rank))
    _atomic_save({"rollout_id": rollout_id, "rank": rank, "rollout_data": rollout_data}, path)
    return path


def _atomic_save(obj: Any, path: Path) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
