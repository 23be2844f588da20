"""python -m pytest -q tests/test_debug_dumps.py

The dump files of --dump-details (end to end in test_train_loop.py)."""

from __future__ import annotations

import pytest

from slime.ray.debug_dumps import load_debug_rollout_data, save_debug_rollout_data, subsample_groups
from slime.utils.types import Sample


def _samples(groups: list[int | None]) -> list[Sample]:
    return [Sample(index=i, group_index=g, tokens=[1, 2, i], response_length=1) for i, g in enumerate(groups)]


def test_subsample_keeps_whole_groups_in_order():
    samples = _samples([0, 0, 1, 1, 2, 2, 3, 3])
    assert [s.index for s in subsample_groups(samples, 0.5)] == [0, 1, 2, 3]
    assert [s.index for s in subsample_groups(samples, 0.3)] == [0, 1, 2, 3]  # ceil(1.2) = 2 groups
    assert [s.index for s in subsample_groups(samples, 0.01)] == [0, 1]  # at least one group
    assert subsample_groups(samples, 1.0) == samples


def test_subsample_rounds_up_to_a_sample_count_the_train_ranks_divide():
    samples = _samples([0, 0, 1, 2, 3, 3])  # groups of 2, 1, 1, 2 samples: 2, 3, 4, 6 when kept in order
    assert [s.index for s in subsample_groups(samples, 0.25, multiple_of=2)] == [0, 1]
    assert [s.index for s in subsample_groups(samples, 0.25, multiple_of=4)] == [0, 1, 2, 3]  # 2 -> 3 -> 4
    assert subsample_groups(samples, 0.25, multiple_of=5) == samples  # no prefix divides: all of them


def test_subsample_treats_samples_without_a_group_as_their_own():
    samples = _samples([None, None, None, None])
    assert [s.index for s in subsample_groups(samples, 0.5)] == [0, 1]


def test_rollout_dump_round_trip_and_clear_errors(tmp_path):
    template = str(tmp_path / "r{rollout_id}.pt")
    samples = _samples([0, 0])
    path = save_debug_rollout_data(template, 3, samples)
    assert path.name == "r3.pt" and not list(tmp_path.glob("*.tmp"))
    assert [s.to_dict() for s in load_debug_rollout_data(template, 3)] == [s.to_dict() for s in samples]
    with pytest.raises(ValueError, match="r4.pt does not exist"):
        load_debug_rollout_data(template, 4)
    (tmp_path / "r5.pt").write_bytes(b"not a dump")
    with pytest.raises(ValueError, match="is not a slime rollout dump"):
        load_debug_rollout_data(template, 5)
