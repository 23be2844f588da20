"""The rollout data source: prompt groups from the global dataset, leftovers buffered, resumable.

    python -m slime.data.data_source --prompt-data train.jsonl --rollout-batch-size 4 --rollout-shuffle \
        --actor-num-gpus-per-node 1 --preview-steps 3      # print the prompts each step would get

In code (the rollout manager does this):

    data_source = create_data_source(args)          # honours --data-source-path
    data_source.load(rollout_id)                    # no-op when --load has no saved state for it
    groups = data_source.get_samples(args.rollout_batch_size)   # list of --n-samples-per-prompt groups
    data_source.add_samples(unfinished_groups)     # e.g. partial rollout leftovers
    data_source.save(rollout_id)                    # {--save}/rollout/global_dataset_state_dict_{id}.pt

Order of service: the buffer first (through `--buffer-filter-path`, default `pop_first`), then the
dataset. The dataset is walked epoch by epoch; with `--rollout-shuffle` each epoch is a permutation
seeded by `--rollout-seed + epoch`. Every sample handed out from the dataset is a fresh deep copy
with a global, increasing `index` and `group_index`. The saved state holds the epoch, the offset
in it, both counters, `metadata` and the buffer, so a reloaded source continues exactly where the
saved one stood.
"""

from __future__ import annotations

import argparse
import copy
import glob
import json
import logging
import os
import re
import sys
from typing import Any, Callable

import torch

from slime.data.dataset import PromptDataset, dataset_from_args
from slime.utils.plugins import load_function
from slime.utils.types import Sample

logger = logging.getLogger(__name__)

STATE_FORMAT_VERSION = 1
# the original's default class path and ours both mean the built-in class
BUILTIN_DATA_SOURCE_PATHS = (
    "slime.ray.rollout_data_source.RolloutDataSourceWithBuffer",
    "slime.data.data_source.RolloutDataSourceWithBuffer",
)
BufferFilter = Callable[[argparse.Namespace, "int | None", list[list[Sample]], int], list[list[Sample]]]


def pop_first(args: argparse.Namespace, rollout_id: int | None, buffer: list[list[Sample]],
              num_samples: int) -> list[list[Sample]]:
    """Default buffer filter: take the oldest `num_samples` groups (fewer if the buffer is shorter)."""
    taken = buffer[:num_samples]
    del buffer[:num_samples]
    return taken


def state_path(root: str, rollout_id: int) -> str:
    return os.path.join(root, "rollout", f"global_dataset_state_dict_{rollout_id}.pt")


def latest_saved_rollout_id(root: str) -> int | None:
    """Highest rollout id with a saved data-source state under `root`, or None."""
    ids = []
    for path in glob.glob(os.path.join(root, "rollout", "global_dataset_state_dict_*.pt")):
        match = re.search(r"global_dataset_state_dict_(\d+)\.pt$", path)
        if match:
            ids.append(int(match.group(1)))
    return max(ids) if ids else None


def _is_sample_or_samples(entry: Any) -> bool:
    return isinstance(entry, Sample) or (isinstance(entry, list) and all(isinstance(s, Sample) for s in entry))


def _sample_to_state(entry: Sample | list[Sample]) -> dict[str, Any] | list[dict[str, Any]]:
    return entry.to_dict() if isinstance(entry, Sample) else [s.to_dict() for s in entry]


def _sample_from_state(entry: dict[str, Any] | list[dict[str, Any]]) -> Sample | list[Sample]:
    return Sample.from_dict(entry) if isinstance(entry, dict) else [Sample.from_dict(d) for d in entry]


def uses_global_dataset(args: argparse.Namespace) -> bool:
    """False under --disable-rollout-global-dataset (dest `rollout_global_dataset`, as in the original)."""
    return bool(getattr(args, "rollout_global_dataset", True)) and not getattr(args, "disable_rollout_global_dataset", False)


class RolloutDataSourceWithBuffer:
    """`get_samples(n)` / `add_samples(groups)` / `save(id)` / `load(id)` over the global dataset + a buffer."""

    def __init__(self, args: argparse.Namespace, dataset: PromptDataset | None = None):
        self.args = args
        n_per_prompt = getattr(args, "n_samples_per_prompt", None)
        self.n_samples_per_prompt: int = 1 if n_per_prompt is None else int(n_per_prompt)
        if self.n_samples_per_prompt < 1:
            raise ValueError(f"--n-samples-per-prompt must be >= 1, got {self.n_samples_per_prompt}")
        self.shuffle = bool(getattr(args, "rollout_shuffle", False))
        self.epoch_id = 0
        self.sample_offset = 0  # position inside the current epoch's order
        self.sample_group_index = 0
        self.sample_index = 0
        self.metadata: dict[str, Any] = {}  # free-form state that plugins may keep; saved and restored
        self.buffer: list[list[Sample]] = []
        if not uses_global_dataset(args):
            self.dataset = None
        else:
            self.dataset = dataset if dataset is not None else dataset_from_args(args)
        filter_path = getattr(args, "buffer_filter_path", None)
        self.buffer_filter: BufferFilter = (
            load_function(filter_path, flag="--buffer-filter-path") if filter_path else pop_first)

    @property
    def dataset_size(self) -> int:
        return len(self.dataset) if self.dataset is not None else 0

    # ---- serving -------------------------------------------------------------------------------

    def get_samples(self, num_samples: int) -> list[list[Sample]]:
        """`num_samples` groups of `--n-samples-per-prompt` samples: buffered groups first, then new prompts."""
        if num_samples < 0:
            raise ValueError(f"get_samples: num_samples must be >= 0, got {num_samples}")
        groups = self._take_from_buffer(num_samples)
        remaining = num_samples - len(groups)
        if remaining:
            groups += [self._make_group(prompt) for prompt in self._next_prompts(remaining)]
        return groups

    def add_samples(self, groups: list[list[Sample]]) -> None:
        """Put whole groups back (e.g. aborted partial rollouts); they are served before new prompts."""
        if not isinstance(groups, list):
            raise ValueError(f"add_samples expects a list of groups (lists of Sample), got {type(groups).__name__}")
        for i, group in enumerate(groups):
            if not isinstance(group, list) or not all(_is_sample_or_samples(s) for s in group):
                raise ValueError(f"add_samples: group {i} must be a list of Sample (or of lists of Sample, from a "
                                 f"generate function that returns several), got {group!r:.80}")
            if len(group) != self.n_samples_per_prompt:
                raise ValueError(f"add_samples: group {i} has {len(group)} samples, "
                                 f"--n-samples-per-prompt is {self.n_samples_per_prompt}")
        self.buffer.extend(groups)

    def get_buffer_length(self) -> int:
        return len(self.buffer)

    def _take_from_buffer(self, num_samples: int) -> list[list[Sample]]:
        if not self.buffer or num_samples == 0:
            return []
        # the interface carries no rollout id here; the original passes None as well
        groups = self.buffer_filter(self.args, None, self.buffer, num_samples)
        if not isinstance(groups, list) or len(groups) > num_samples:
            raise ValueError(f"--buffer-filter-path returned {type(groups).__name__} of "
                             f"{len(groups) if isinstance(groups, list) else '?'} groups; "
                             f"expected a list of at most {num_samples} groups")
        return list(groups)

    def _next_prompts(self, count: int) -> list[Sample]:
        if self.dataset is None:
            return [Sample() for _ in range(count)]
        prompts: list[Sample] = []
        size = len(self.dataset)
        while len(prompts) < count:
            if self.sample_offset >= size:
                self.epoch_id += 1
                self.sample_offset = 0
            take = min(count - len(prompts), size - self.sample_offset)
            order = self._epoch_order()
            prompts += [self.dataset.samples[i] for i in order[self.sample_offset:self.sample_offset + take]]
            self.sample_offset += take
        return prompts

    def _epoch_order(self) -> list[int] | range:
        assert self.dataset is not None
        return self.dataset.permutation(self.epoch_id) if self.shuffle else range(len(self.dataset))

    def _make_group(self, prompt: Sample) -> list[Sample]:
        group = []
        for _ in range(self.n_samples_per_prompt):
            sample = copy.deepcopy(prompt)
            sample.group_index = self.sample_group_index
            sample.index = self.sample_index
            self.sample_index += 1
            group.append(sample)
        self.sample_group_index += 1
        return group

    # ---- checkpointing -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "format_version": STATE_FORMAT_VERSION,
            "epoch_id": self.epoch_id,
            "sample_offset": self.sample_offset,
            "sample_group_index": self.sample_group_index,
            "sample_index": self.sample_index,
            "metadata": copy.deepcopy(self.metadata),
            "buffer": [[_sample_to_state(entry) for entry in group] for group in self.buffer],
            "dataset_size": self.dataset_size,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict[str, Any], *, source: str = "state") -> None:
        if state.get("format_version") != STATE_FORMAT_VERSION:
            raise ValueError(f"{source}: unknown data-source state format {state.get('format_version')!r}")
        if state["dataset_size"] != self.dataset_size:
            logger.warning("%s: saved with %d prompts but --prompt-data now has %d; the order will differ",
                           source, state["dataset_size"], self.dataset_size)
        if state["shuffle"] != self.shuffle:
            logger.warning("%s: saved with --rollout-shuffle=%s, now %s; the order will differ",
                           source, state["shuffle"], self.shuffle)
        self.epoch_id = int(state["epoch_id"])
        self.sample_offset = int(state["sample_offset"])
        self.sample_group_index = int(state["sample_group_index"])
        self.sample_index = int(state["sample_index"])
        self.metadata = dict(state["metadata"])
        self.buffer = [[_sample_from_state(entry) for entry in group] for group in state["buffer"]]

    def save(self, rollout_id: int) -> str:
        """Write the state atomically to `{--save}/rollout/global_dataset_state_dict_{rollout_id}.pt`."""
        root = getattr(self.args, "save", None)
        if not root:
            raise ValueError("data source save: --save is not set")
        path = state_path(root, rollout_id)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp_path = f"{path}.tmp.{os.getpid()}"
        torch.save(self.state_dict(), tmp_path)
        os.replace(tmp_path, path)
        return path

    def load(self, rollout_id: int | None = None) -> bool:
        """Restore the state saved at `rollout_id` under `--load` (the latest one when None).

        Returns False, changing nothing, when `--load` is unset or holds no state for that id.
        """
        root = getattr(self.args, "load", None)
        if not root:
            return False
        if rollout_id is None:
            rollout_id = latest_saved_rollout_id(root)
            if rollout_id is None:
                logger.info("--load %s: no saved data-source state; starting from the beginning", root)
                return False
        path = state_path(root, rollout_id)
        if not os.path.exists(path):
            logger.info("--load %s: no data-source state for rollout %d (%s); starting from the beginning",
                        root, rollout_id, path)
            return False
        try:
            # our own file: plain dicts/lists, but sample metadata may hold arbitrary picklable values
            state = torch.load(path, weights_only=False)
        except Exception as e:
            raise ValueError(f"--load: cannot read data-source state {path} ({e})") from e
        self.load_state_dict(state, source=path)
        logger.info("data source resumed from %s: epoch %d, offset %d, %d buffered groups",
                    path, self.epoch_id, self.sample_offset, len(self.buffer))
        return True


def create_data_source(args: argparse.Namespace) -> Any:
    """`--data-source-path` class (called with `args`) or `RolloutDataSourceWithBuffer`."""
    path = getattr(args, "data_source_path", None)
    if not path or path in BUILTIN_DATA_SOURCE_PATHS:
        return RolloutDataSourceWithBuffer(args)
    return load_function(path, flag="--data-source-path")(args)


def resolve_num_rollout(args: argparse.Namespace, dataset_size: int) -> int:
    """`--num-rollout`, or `--num-epoch` x (prompts // `--rollout-batch-size`) when only the epoch count is set."""
    num_rollout = getattr(args, "num_rollout", None)
    num_epoch = getattr(args, "num_epoch", None)
    if num_rollout is not None:
        if num_epoch is not None:
            logger.warning("both --num-rollout (%d) and --num-epoch (%d) set; using --num-rollout",
                           num_rollout, num_epoch)
        return int(num_rollout)
    if num_epoch is None:
        raise ValueError("set --num-rollout or --num-epoch")
    if num_epoch <= 0:
        raise ValueError(f"--num-epoch must be positive, got {num_epoch}")
    batch = getattr(args, "rollout_batch_size", None)
    if not batch or batch <= 0:
        raise ValueError("--num-epoch needs a positive --rollout-batch-size")
    if dataset_size <= 0:
        raise ValueError("--num-epoch needs the global dataset (--prompt-data; not --disable-rollout-global-dataset)")
    per_epoch = dataset_size // batch
    if per_epoch == 0:
        raise ValueError(f"--rollout-batch-size {batch} is larger than the {dataset_size} prompts of --prompt-data, "
                         "so one epoch holds no full rollout; use --num-rollout or a smaller batch")
    return per_epoch * int(num_epoch)


def main(argv: list[str] | None = None) -> None:
    from slime.utils.arguments import parse_args

    def add_preview_flags(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--preview-steps", type=int, default=3, help="rollout steps to print")

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    args = parse_args(argv, add_custom_arguments=add_preview_flags)
    try:
        source = create_data_source(args)
        has_count = args.num_epoch is not None or args.num_rollout is not None
        num_rollout = resolve_num_rollout(args, source.dataset_size) if has_count else "?"
        print(f"{getattr(source, 'dataset_size', '?')} prompts; num_rollout = {num_rollout}")
        for step in range(args.preview_steps):
            groups = source.get_samples(args.rollout_batch_size)
            print(f"step {step}: " + json.dumps([group[0].prompt for group in groups], ensure_ascii=False, default=str))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
