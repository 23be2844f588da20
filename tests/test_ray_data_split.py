"""Splitting a rollout's train data over data-parallel ranks.

    python -m pytest -q tests/test_ray_data_split.py
"""

from __future__ import annotations

import pytest

from slime.ray.data_split import split_indices, split_rollout_data


def _data(lengths):
    n = len(lengths)
    return {"tokens": [[i] * l for i, l in enumerate(lengths)], "rewards": [float(i) for i in range(n)],
            "sample_indices": list(range(n)), "note": "kept"}


def test_each_rank_gets_its_slice_of_every_global_batch():
    shards = split_rollout_data(_data([3] * 8), dp_size=2, global_batch_size=4)
    assert [s["sample_indices"] for s in shards] == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert shards[1]["rewards"] == [2.0, 3.0, 6.0, 7.0] and shards[0]["note"] == "kept"
    assert sorted(i for s in shards for i in s["sample_indices"]) == list(range(8))


def test_balance_evens_tokens_within_each_global_batch():
    lengths = [10, 9, 1, 2, 9, 10, 2, 1]
    plain = split_indices(lengths, 2, 4)
    balanced = split_indices(lengths, 2, 4, balance=True)

    def tokens(parts):
        return [sum(lengths[i] for i in p) for p in parts]

    assert tokens(plain) == [38, 6]
    assert tokens(balanced) == [22, 22]
    for rank in range(2):  # still 2 samples of each global batch per rank
        assert sum(i < 4 for i in balanced[rank]) == 2


def test_bad_shapes_fail_clearly():
    with pytest.raises(ValueError, match="split evenly over 3 train ranks"):
        split_indices([1] * 8, 3, 8)
    with pytest.raises(ValueError, match="--global-batch-size 3"):
        split_indices([1] * 6, 2, 3)
    with pytest.raises(ValueError, match="'rewards' has 2 items"):
        split_rollout_data({"tokens": [[1], [2], [3]], "rewards": [1.0, 2.0]}, 1, None)
