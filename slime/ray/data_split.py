"""Split one rollout's train-data dict across data-parallel ranks.

    from slime.ray.data_split import split_rollout_data
    shards = split_rollout_data(rollout_data, dp_size=2, global_batch_size=8, balance=False)

Each global batch (consecutive `global_batch_size` samples) is cut into `dp_size` equal parts; rank r
gets part r of every global batch, in order, so every rank steps the optimizer on the same schedule.
With `balance`, samples of a global batch are dealt to ranks so their token counts are even.
"""

from __future__ import annotations

from typing import Any


def _per_sample_keys(rollout_data: dict[str, Any], n: int) -> list[str]:
    keys = []
    for key, value in rollout_data.items():
        if isinstance(value, list) and len(value) == n:
            keys.append(key)
        elif isinstance(value, list):
            raise ValueError(f"rollout data entry {key!r} has {len(value)} items but 'tokens' has {n}")
    return keys


def _balanced_parts(lengths: list[int], dp_size: int) -> list[list[int]]:
    """Deal indices (longest first) to the rank with fewest tokens that still has room; each rank gets len/dp."""
    per_rank = len(lengths) // dp_size
    parts: list[list[int]] = [[] for _ in range(dp_size)]
    totals = [0] * dp_size
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        rank = min((r for r in range(dp_size) if len(parts[r]) < per_rank), key=lambda r: totals[r])
        parts[rank].append(i)
        totals[rank] += lengths[i]
    return [sorted(p) for p in parts]


def split_indices(lengths: list[int], dp_size: int, global_batch_size: int | None, balance: bool = False) -> list[list[int]]:
    n = len(lengths)
    if dp_size <= 0:
        raise ValueError(f"data-parallel size must be positive, got {dp_size}")
    if n % dp_size:
        raise ValueError(
            f"{n} samples cannot be split evenly over {dp_size} train ranks; make --rollout-batch-size x "
            f"--n-samples-per-prompt a multiple of --actor-num-nodes x --actor-num-gpus-per-node"
        )
    gbs = global_batch_size or n
    if gbs % dp_size:
        raise ValueError(f"--global-batch-size {gbs} is not a multiple of the {dp_size} train ranks")
    shards: list[list[int]] = [[] for _ in range(dp_size)]
    for start in range(0, n, gbs):
        batch = list(range(start, min(start + gbs, n)))
        if len(batch) % dp_size:
            raise ValueError(
                f"the last global batch has {len(batch)} samples, not a multiple of {dp_size} train ranks; "
                f"make the samples per rollout ({n}) a multiple of --global-batch-size ({gbs})"
            )
        if balance:
            parts = _balanced_parts([lengths[i] for i in batch], dp_size)
            parts = [[batch[i] for i in part] for part in parts]
        else:
            size = len(batch) // dp_size
            parts = [batch[r * size:(r + 1) * size] for r in range(dp_size)]
        for rank, part in enumerate(parts):
            shards[rank].extend(part)
    return shards


def split_rollout_data(rollout_data: dict[str, Any], dp_size: int, global_batch_size: int | None,
                       balance: bool = False) -> list[dict[str, Any]]:
    if "tokens" not in rollout_data:
        raise ValueError("rollout data has no 'tokens' entry (see docs/internals.md)")
    n = len(rollout_data["tokens"])
    keys = _per_sample_keys(rollout_data, n)
    shards = split_indices([len(t) for t in rollout_data["tokens"]], dp_size, global_batch_size, balance)
    result = []
    for indices in shards:
        shard = {k: v for k, v in rollout_data.items() if k not in keys}
        shard.update({k: [rollout_data[k][i] for i in indices] for k in keys})
        result.append(shard)
    return result
