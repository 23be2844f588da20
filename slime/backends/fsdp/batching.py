"""Split a rank's rollout shard into optimizer steps and micro-batches, and pack each micro-batch into one row.

    from slime.backends.fsdp.batching import validate_rollout_data, split_into_steps, plan_micro_batches, pack_samples

Used by `trainer.py`. Every micro-batch is one packed row: the samples' tokens concatenated with
position ids restarting at 0 per sample, so the attention implementation sees independent
sequences and no compute is spent on padding. `--use-dynamic-batch-size` fills micro-batches up to
`--max-tokens-per-gpu` tokens; otherwise each holds `--micro-batch-size` samples. All ranks must
run the same number of micro-batches (each forward/backward is a collective under FSDP), so the
count is agreed across ranks and short ranks get empty micro-batches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

REQUIRED_KEYS = ("tokens", "response_lengths", "loss_masks", "rewards")
PER_SAMPLE_KEYS = ("tokens", "response_lengths", "loss_masks", "rewards", "raw_reward", "rollout_log_probs",
                   "truncated", "sample_indices")


def validate_rollout_data(rollout_data: dict[str, Any]) -> int:
    """Check the dict of per-sample lists handed to the trainer; returns the number of samples."""
    missing = [k for k in REQUIRED_KEYS if k not in rollout_data]
    if missing:
        raise ValueError(f"rollout data is missing key(s) {missing}; expected the dict of samples_to_train_data")
    n = len(rollout_data["tokens"])
    for key in PER_SAMPLE_KEYS:
        if key in rollout_data and rollout_data[key] is not None and len(rollout_data[key]) != n:
            raise ValueError(f"rollout data key {key!r} has {len(rollout_data[key])} entries, 'tokens' has {n}")
    for i in range(n):
        total, resp = len(rollout_data["tokens"][i]), int(rollout_data["response_lengths"][i])
        if resp < 1 or resp >= total:
            raise ValueError(f"rollout sample {i}: response_length {resp} must be in [1, {total - 1}] "
                             f"(len(tokens)={total}; a prompt token is needed to predict the first response token)")
        if len(rollout_data["loss_masks"][i]) != resp:
            raise ValueError(f"rollout sample {i}: loss_mask has {len(rollout_data['loss_masks'][i])} entries, "
                             f"response_length is {resp}")
        rollout = rollout_data.get("rollout_log_probs")
        if rollout is not None and rollout[i] is not None and len(rollout[i]) != resp:
            raise ValueError(f"rollout sample {i}: rollout_log_probs has {len(rollout[i])} entries, "
                             f"response_length is {resp}")
    return n


def split_into_steps(num_samples: int, num_steps: int) -> list[list[int]]:
    """Contiguous sample indices for each optimizer step of this rollout (sizes differ by at most one)."""
    if num_steps < 1:
        raise ValueError(f"number of optimizer steps per rollout must be >= 1, got {num_steps} "
                         "(check --global-batch-size / --num-steps-per-rollout)")
    base, extra = divmod(num_samples, num_steps)
    steps, start = [], 0
    for s in range(num_steps):
        size = base + (1 if s < extra else 0)
        steps.append(list(range(start, start + size)))
        start += size
    return steps


def balanced_partition(lengths: Sequence[int], k: int) -> list[list[int]]:
    """Longest-first greedy split of items into exactly k bins with near-equal length sums.

    Returns indices per bin, each bin sorted ascending (so packing order follows data order)."""
    assert k >= 1
    bins: list[list[int]] = [[] for _ in range(k)]
    sums = [0] * k
    for idx in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        target = min(range(k), key=lambda b: (sums[b], len(bins[b]), b))
        bins[target].append(idx)
        sums[target] += lengths[idx]
    return [sorted(b) for b in bins]


def min_bins_for_budget(lengths: Sequence[int], max_tokens: int) -> int:
    """First-fit-decreasing bin count for a token budget (a lower bound the caller agrees across ranks)."""
    for i, length in enumerate(lengths):
        if length > max_tokens:
            raise ValueError(f"sample {i} has {length} tokens, more than --max-tokens-per-gpu {max_tokens}; "
                             "raise --max-tokens-per-gpu (or --log-probs-max-tokens-per-gpu)")
    free: list[int] = []
    for length in sorted(lengths, reverse=True):
        for b, room in enumerate(free):
            if room >= length:
                free[b] -= length
                break
        else:
            free.append(max_tokens - length)
    return len(free)


def partition_to_budget(lengths: Sequence[int], max_tokens: int, k: int) -> list[list[int]]:
    """At least k balanced bins, each within the token budget (more bins only if balancing overflows)."""
    k = max(k, 1)
    while True:
        bins = balanced_partition(lengths, k)
        if all(sum(lengths[i] for i in b) <= max_tokens for b in bins):
            return bins
        k += 1


def fixed_micro_batches(num_samples: int, micro_batch_size: int) -> list[list[int]]:
    if micro_batch_size < 1:
        raise ValueError(f"--micro-batch-size must be >= 1, got {micro_batch_size}")
    return [list(range(s, min(s + micro_batch_size, num_samples))) for s in range(0, num_samples, micro_batch_size)]


def plan_micro_batches(lengths: Sequence[int], *, dynamic: bool, max_tokens: int | None, micro_batch_size: int,
                       agree_count=None) -> list[list[int]]:
    """Micro-batches (lists of indices into `lengths`) for one step on this rank.

    `agree_count(n) -> int` returns the maximum of n over ranks; the plan is padded (fixed mode) or
    re-split (dynamic mode) to that many micro-batches, empty ones allowed."""
    if dynamic:
        if not max_tokens or max_tokens < 1:
            raise ValueError("--use-dynamic-batch-size needs --max-tokens-per-gpu > 0")
        agree = agree_count or (lambda n: n)
        k = agree(min_bins_for_budget(lengths, max_tokens) if lengths else 1)
        while True:
            plan = partition_to_budget(lengths, max_tokens, k)
            agreed = agree(len(plan))
            if agreed == k:  # every rank's plan has >= k bins, so the maximum equals k only if all have k
                break
            k = agreed
        return [b for b in plan if b] + [b for b in plan if not b]
    plan = fixed_micro_batches(len(lengths), micro_batch_size)
    if agree_count is not None:
        k = agree_count(len(plan))
        plan += [[] for _ in range(k - len(plan))]
    return plan


@dataclass
class PackedRow:
    """One micro-batch as a single row: model inputs and where each sample's response is predicted."""

    input_ids: torch.Tensor  # [1, T]
    position_ids: torch.Tensor  # [1, T]
    predict_positions: torch.Tensor  # [N] positions whose logits predict a response token
    targets: torch.Tensor  # [N] the response tokens
    response_lengths: list[int]
    seq_lengths: list[int] = field(default_factory=list)  # tokens of each sample, in row order

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[1])


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Host tensor -> device without a host sync on CUDA (pinned staging, non-blocking copy)."""
    if torch.device(device).type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def samples_to_device(tensors: Sequence[torch.Tensor], device: torch.device | str) -> list[torch.Tensor]:
    """Per-sample host tensors -> device views of one flat copy (one transfer, not one per sample)."""
    if not tensors or all(t.device == torch.device(device) for t in tensors):
        return list(tensors)
    flat = to_device(torch.cat([t.reshape(-1) for t in tensors]), device)
    return [piece.view(t.shape) for piece, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def pack_samples(tokens: Sequence[Sequence[int]], response_lengths: Sequence[int], device: torch.device | str,
                 pad_token_id: int = 0) -> PackedRow:
    """Concatenate samples into one row; an empty list gives a 1-token dummy row with no targets."""
    if not tokens:
        zero = torch.zeros(1, 1, dtype=torch.long, device=device)
        empty = torch.zeros(0, dtype=torch.long, device=device)
        zero[0, 0] = pad_token_id
        return PackedRow(zero, torch.zeros(1, 1, dtype=torch.long, device=device), empty, empty, [], [1])
    ids, pos, predict, targets = [], [], [], []
    offset = 0
    for toks, resp in zip(tokens, response_lengths):
        length = len(toks)
        ids.append(torch.as_tensor(toks, dtype=torch.long))
        pos.append(torch.arange(length, dtype=torch.long))
        predict.append(torch.arange(offset + length - resp - 1, offset + length - 1, dtype=torch.long))
        targets.append(ids[-1][length - resp:])
        offset += length
    return PackedRow(
        input_ids=to_device(torch.cat(ids).unsqueeze(0), device),
        position_ids=to_device(torch.cat(pos).unsqueeze(0), device),
        predict_positions=to_device(torch.cat(predict), device),
        targets=to_device(torch.cat(targets), device),
        response_lengths=[int(r) for r in response_lengths],
        seq_lengths=[len(t) for t in tokens],
    )
