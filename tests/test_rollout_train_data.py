"""samples_to_train_data (reward normalisation, custom hooks, checks) and the dynamic sampling filter.

    python -m pytest -q tests/test_rollout_train_data.py
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from slime.rollout.filter_hub.dynamic_sampling_filters import check_reward_nonzero_std as original_path_filter
from slime.rollout.filters import DynamicFilterOutput, call_dynamic_filter, check_reward_nonzero_std
from slime.rollout.train_data import samples_to_train_data
from slime.utils.types import Sample


def args_(**kw):
    base = dict(advantage_estimator="grpo", n_samples_per_prompt=2, disable_rewards_normalization=False,
                disable_grpo_std_normalization=False, reward_key=None, custom_reward_post_process_path=None,
                custom_convert_samples_to_train_data_path=None)
    base.update(kw)
    return SimpleNamespace(**base)


def sample(index, reward, response_len=2, status=Sample.Status.COMPLETED, log_probs=True):
    return Sample(index=index, group_index=index // 2, tokens=[5, 6, 7] + list(range(10, 10 + response_len)),
                  response_length=response_len, loss_mask=[1] * response_len, reward=reward, status=status,
                  rollout_log_probs=[-0.5] * response_len if log_probs else None)


def test_train_data_layout_and_grpo_normalisation():
    samples = [sample(0, 1.0), sample(1, 0.0, 3, Sample.Status.TRUNCATED), sample(2, 1.0), sample(3, 1.0)]
    data = samples_to_train_data(args_(), samples)
    assert data["tokens"][1] == [5, 6, 7, 10, 11, 12]
    assert data["response_lengths"] == [2, 3, 2, 2]
    assert data["loss_masks"][1] == [1, 1, 1]
    assert data["raw_reward"] == [1.0, 0.0, 1.0, 1.0]
    expected = (torch.tensor([1.0, 0.0]) - 0.5) / (torch.tensor([1.0, 0.0]).std() + 1e-6)
    assert data["rewards"][:2] == pytest.approx(expected.tolist(), rel=1e-5)
    assert data["rewards"][2:] == [0.0, 0.0]
    assert data["truncated"] == [0, 1, 0, 0]
    assert data["sample_indices"] == [0, 1, 2, 3]
    assert data["rollout_log_probs"][0] == [-0.5, -0.5]


def test_normalisation_switches():
    samples = [sample(0, 1.0), sample(1, 0.0)]
    assert samples_to_train_data(args_(disable_rewards_normalization=True), samples)["rewards"] == [1.0, 0.0]
    assert samples_to_train_data(args_(advantage_estimator="reinforce_plus_plus"), samples)["rewards"] == [1.0, 0.0]
    assert samples_to_train_data(args_(disable_grpo_std_normalization=True), samples)["rewards"] == [0.5, -0.5]


def test_dict_rewards_use_reward_key_and_log_probs_are_optional():
    samples = [sample(0, {"score": 1.0, "acc": True}), sample(1, {"score": -1.0, "acc": False}, log_probs=False)]
    data = samples_to_train_data(args_(reward_key="score", disable_rewards_normalization=True), samples)
    assert data["raw_reward"] == [1.0, -1.0]
    assert "rollout_log_probs" not in data


def test_inconsistent_samples_are_clear_errors():
    bad = sample(0, 1.0)
    bad.loss_mask = [1]
    with pytest.raises(ValueError, match="loss_mask has 1 entries for 2 response tokens"):
        samples_to_train_data(args_(n_samples_per_prompt=1), [bad])
    failed = sample(0, None, status=Sample.Status.FAILED)
    failed.metadata["failure_reason"] = "reward timed out"
    with pytest.raises(ValueError, match="reward timed out"):
        samples_to_train_data(args_(n_samples_per_prompt=1), [failed])
    with pytest.raises(ValueError, match="--n-samples-per-prompt"):
        samples_to_train_data(args_(n_samples_per_prompt=3), [sample(i, 1.0) for i in range(4)])


def test_dynamic_filter_keeps_groups_with_different_rewards():
    args = args_()
    assert check_reward_nonzero_std(args, [sample(0, 1.0), sample(1, 0.0)]).keep
    out = check_reward_nonzero_std(args, [sample(0, 1.0), sample(1, 1.0)])
    assert not out.keep and out.reason == "zero_std_1.0"
    assert original_path_filter is check_reward_nonzero_std
    dict_args = args_(reward_key="score")
    assert check_reward_nonzero_std(dict_args, [sample(0, {"score": 1.0}), sample(1, {"score": -1.0})]).keep


def test_call_dynamic_filter_accepts_bools_and_rejects_junk():
    group = [sample(0, 1.0)]
    assert call_dynamic_filter(None, None, group).keep
    assert call_dynamic_filter(lambda a, g: False, None, group) == DynamicFilterOutput(keep=False)
    with pytest.raises(ValueError, match="--dynamic-sampling-filter-path"):
        call_dynamic_filter(lambda a, g: "yes", None, group)
