"""Advantage estimators, reward group normalisation and advantage whitening (hand-computed + gloo).

    python -m pytest -q tests/test_algo_advantages.py
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st

from slime.algo.advantages import (
    compute_advantages_and_returns,
    group_normalize_rewards_for,
    kl_penalty,
    normalize_advantages,
    normalize_group_rewards,
)

F64 = torch.float64


def t(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def test_normalize_group_rewards_hand_computed() -> None:
    rewards = t([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    # group 1: mean 1/3 -> [2/3, -1/3, -1/3]; unbiased var = (4/9 + 1/9 + 1/9) / 2 = 1/3
    std = math.sqrt(1 / 3)
    expected = [2 / 3 / (std + 1e-6), -1 / 3 / (std + 1e-6), -1 / 3 / (std + 1e-6), 0.0, 0.0, 0.0]
    torch.testing.assert_close(normalize_group_rewards(rewards, 3, std_normalize=True), t(expected))
    torch.testing.assert_close(
        normalize_group_rewards(rewards, 3, std_normalize=False), t([2 / 3, -1 / 3, -1 / 3, 0.0, 0.0, 0.0])
    )


def test_group_of_one_and_bad_group_size() -> None:
    torch.testing.assert_close(normalize_group_rewards(t([3.0, -2.0]), 1, std_normalize=True), t([0.0, 0.0]))
    with pytest.raises(ValueError, match="--n-samples-per-prompt"):
        normalize_group_rewards(t([1.0, 2.0, 3.0]), 2, std_normalize=True)


def test_group_normalize_rewards_for_each_estimator() -> None:
    rewards = t([1.0, 3.0])  # mean 2, unbiased std sqrt(2)
    centered = t([-1.0, 1.0])
    whitened = centered / (math.sqrt(2) + 1e-6)
    for estimator in ("grpo", "gspo", "cispo"):
        torch.testing.assert_close(group_normalize_rewards_for(estimator, rewards, 2), whitened)
        torch.testing.assert_close(
            group_normalize_rewards_for(estimator, rewards, 2, grpo_std_normalization=False), centered
        )
    torch.testing.assert_close(group_normalize_rewards_for("reinforce_plus_plus_baseline", rewards, 2), centered)
    for estimator in ("reinforce_plus_plus", "ppo"):
        torch.testing.assert_close(group_normalize_rewards_for(estimator, rewards, 2), rewards)
    torch.testing.assert_close(group_normalize_rewards_for("grpo", rewards, 2, rewards_normalization=False), rewards)
    with pytest.raises(ValueError, match="--advantage-estimator"):
        group_normalize_rewards_for("dpo", rewards, 2)


@pytest.mark.parametrize("estimator", ["grpo", "gspo", "cispo"])
def test_grpo_family_broadcasts_the_reward(estimator: str) -> None:
    masks = [torch.ones(2), torch.tensor([1.0, 0.0, 1.0])]
    adv, ret = compute_advantages_and_returns(estimator, rewards=t([0.5, -2.0]), loss_masks=masks)
    torch.testing.assert_close(adv, [t([0.5, 0.5]), t([-2.0, -2.0, -2.0])])
    torch.testing.assert_close(ret, adv)


KL_LOG_PROBS = [t([-1.0, -1.0, -1.0])]
KL_REF = [t([-1.5, -1.0, -2.0])]  # k1 = [0.5, 0.0, 1.0]; token 2 is masked -> [0.5, 0, 0]
KL_MASK = [torch.tensor([1.0, 1.0, 0.0])]


def test_kl_penalty_is_masked() -> None:
    torch.testing.assert_close(kl_penalty(KL_LOG_PROBS, KL_REF, KL_MASK, kl_type="k1"), [t([0.5, 0.0, 0.0])])


def test_reinforce_plus_plus_hand_computed() -> None:
    adv, ret = compute_advantages_and_returns(
        "reinforce_plus_plus", rewards=t([1.0]), loss_masks=KL_MASK,
        log_probs=KL_LOG_PROBS, ref_log_probs=KL_REF, kl_coef=0.1, kl_type="k1", gamma=0.5,
    )
    # token rewards: -0.1 * [0.5, 0, 0] + reward on the last unmasked token (1) = [-0.05, 1.0, 0.0]
    # G2 = 0 ; G1 = 1 + 0.5 * 0 = 1 ; G0 = -0.05 + 0.5 * 1 = 0.45
    torch.testing.assert_close(adv, [t([0.45, 1.0, 0.0])])
    torch.testing.assert_close(ret, adv)


def test_reinforce_plus_plus_baseline_hand_computed() -> None:
    adv, ret = compute_advantages_and_returns(
        "reinforce_plus_plus_baseline", rewards=t([0.5]), loss_masks=KL_MASK,
        log_probs=KL_LOG_PROBS, ref_log_probs=KL_REF, kl_coef=0.1, kl_type="k1",
    )
    # 0.5 - 0.1 * [0.5, 0, 0]
    torch.testing.assert_close(adv, [t([0.45, 0.5, 0.5])])
    torch.testing.assert_close(ret, adv)


def test_ppo_gae_hand_computed() -> None:
    adv, ret = compute_advantages_and_returns(
        "ppo", rewards=t([1.0]), loss_masks=[torch.ones(3)], values=[t([0.1, 0.2, 0.3])], gamma=0.9, lambd=0.8
    )
    # token rewards [0, 0, 1]; gamma*lambd = 0.72
    a2 = 1.0 + 0.9 * 0.0 - 0.3  # 0.7
    a1 = (0.0 + 0.9 * 0.3 - 0.2) + 0.72 * a2  # 0.07 + 0.504
    a0 = (0.0 + 0.9 * 0.2 - 0.1) + 0.72 * a1  # 0.08 + 0.41328
    torch.testing.assert_close(adv, [t([a0, a1, a2])])
    torch.testing.assert_close(ret, [t([a0 + 0.1, a1 + 0.2, a2 + 0.3])])


def test_ppo_gae_with_kl_shaping() -> None:
    adv, _ = compute_advantages_and_returns(
        "ppo", rewards=t([1.0]), loss_masks=[torch.ones(3)], values=[t([0.0, 0.0, 0.0])],
        log_probs=KL_LOG_PROBS, ref_log_probs=KL_REF, kl_coef=0.1, gamma=1.0, lambd=1.0,
    )
    # k1 = [0.5, 0, 1] (nothing masked) -> token rewards [-0.05, 0, -0.1 + 1]; gamma = lambd = 1, V = 0:
    torch.testing.assert_close(adv, [t([-0.05 + 0.9, 0.9, 0.9])])


def test_ppo_gae_skips_masked_tokens() -> None:
    adv, ret = compute_advantages_and_returns(
        "ppo", rewards=t([1.0]), loss_masks=[torch.tensor([1.0, 0.0, 1.0])], values=[t([0.1, 99.0, 0.3])],
        gamma=0.9, lambd=0.8,
    )
    a2 = 1.0 - 0.3
    a0 = (0.9 * 0.3 - 0.1) + 0.72 * a2  # the masked token (value 99) is skipped
    torch.testing.assert_close(adv, [t([a0, 0.0, a2])])
    torch.testing.assert_close(ret, [t([a0 + 0.1, 99.0, a2 + 0.3])])


def test_fully_masked_sample_gets_zero_advantages() -> None:
    for estimator in ("reinforce_plus_plus", "ppo"):
        adv, _ = compute_advantages_and_returns(
            estimator, rewards=t([1.0]), loss_masks=[torch.zeros(2)], values=[t([0.5, 0.5])]
        )
        torch.testing.assert_close(adv, [t([0.0, 0.0])])


def test_estimator_errors() -> None:
    with pytest.raises(ValueError, match="--advantage-estimator"):
        compute_advantages_and_returns("a2c", rewards=t([1.0]), loss_masks=[torch.ones(1)])
    with pytest.raises(ValueError, match="critic values"):
        compute_advantages_and_returns("ppo", rewards=t([1.0]), loss_masks=[torch.ones(1)])
    with pytest.raises(ValueError, match="--kl-coef"):
        compute_advantages_and_returns("reinforce_plus_plus", rewards=t([1.0]), loss_masks=[torch.ones(1)], kl_coef=0.1)
    with pytest.raises(ValueError, match="2 samples"):
        compute_advantages_and_returns("grpo", rewards=t([1.0]), loss_masks=[torch.ones(1), torch.ones(1)])
    with pytest.raises(ValueError, match=r"values\[0\]"):
        compute_advantages_and_returns("ppo", rewards=t([1.0]), loss_masks=[torch.ones(2)], values=[t([1.0])])


def test_normalize_advantages_hand_computed() -> None:
    adv = [t([1.0, 2.0]), t([3.0, 4.0, 1000.0])]
    masks = [torch.ones(2), torch.tensor([1.0, 1.0, 0.0])]
    # valid tokens 1, 2, 3, 4: mean 2.5, unbiased var = (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3
    s = math.sqrt(5 / 3 + 1e-8)
    out = normalize_advantages(adv, masks)
    torch.testing.assert_close(out, [t([-1.5 / s, -0.5 / s]), t([0.5 / s, 1.5 / s, 0.0])])
    with pytest.raises(ValueError, match="--normalize-advantages"):
        normalize_advantages([t([1.0])], [torch.zeros(1)])


@settings(max_examples=25, deadline=None)
@given(
    reward=st.floats(-5, 5, allow_nan=False),
    group_size=st.integers(1, 5),
    estimator=st.sampled_from(["grpo", "gspo", "cispo", "reinforce_plus_plus_baseline"]),
    std=st.booleans(),
)
def test_group_with_equal_rewards_gets_zero_advantages(reward: float, group_size: int, estimator: str, std: bool) -> None:
    rewards = group_normalize_rewards_for(estimator, t([reward] * group_size), group_size, grpo_std_normalization=std)
    masks = [torch.ones(3) for _ in range(group_size)]
    adv, _ = compute_advantages_and_returns(estimator, rewards=rewards, loss_masks=masks)
    for a in adv:
        assert torch.all(a.abs() < 1e-9)


@settings(max_examples=20, deadline=None)
@given(
    estimator=st.sampled_from(["grpo", "reinforce_plus_plus", "reinforce_plus_plus_baseline", "ppo"]),
    mask_bits=st.lists(st.booleans(), min_size=4, max_size=4).filter(any),
    noise=st.lists(st.floats(-50, 50, allow_nan=False), min_size=4, max_size=4),
)
def test_masked_tokens_never_change_advantages(estimator: str, mask_bits: list[bool], noise: list[float]) -> None:
    mask = torch.tensor([1.0 if b else 0.0 for b in mask_bits])
    base = dict(log_probs=[t([-1.0, -0.5, -2.0, -0.1])], ref_log_probs=[t([-1.2, -0.4, -1.0, -0.3])],
                values=[t([0.2, -0.1, 0.4, 0.3])])
    perturbed = {k: [v[0] + torch.where(mask == 0, t(noise), t([0.0] * 4))] for k, v in base.items()}
    kwargs = dict(rewards=t([1.0]), loss_masks=[mask], kl_coef=0.05, gamma=0.9, lambd=0.95)
    adv_a, ret_a = compute_advantages_and_returns(estimator, **kwargs, **base)
    adv_b, ret_b = compute_advantages_and_returns(estimator, **kwargs, **perturbed)
    valid = mask != 0
    torch.testing.assert_close(adv_a[0][valid], adv_b[0][valid])
    if estimator != "ppo":  # ppo returns = advantages + own value, which is an input there
        torch.testing.assert_close(ret_a[0][valid], ret_b[0][valid])


def _whiten_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        shards = {
            0: ([t([1.0, 2.0, 7.0]), t([-3.0])], [torch.ones(3), torch.ones(1)]),
            1: ([t([0.5, 9.0, 4.0, 4.0])], [torch.tensor([1.0, 0.0, 1.0, 1.0])]),
        }
        out = normalize_advantages(*shards[rank])
        empty = normalize_advantages([], []) if rank == 1 else normalize_advantages(*shards[0])
        torch.save({"out": out, "empty_case": empty}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_normalize_advantages_across_two_gloo_ranks_equals_whole_batch(tmp_path: Path) -> None:
    mp.spawn(_whiten_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{i}.pt") for i in (0, 1))
    whole = normalize_advantages(
        [t([1.0, 2.0, 7.0]), t([-3.0]), t([0.5, 9.0, 4.0, 4.0])],
        [torch.ones(3), torch.ones(1), torch.tensor([1.0, 0.0, 1.0, 1.0])],
    )
    torch.testing.assert_close(r0["out"] + r1["out"], whole)
    # a rank with no samples still joins the collective; rank 0 then whitens over its own tokens only
    alone = normalize_advantages([t([1.0, 2.0, 7.0]), t([-3.0])], [torch.ones(3), torch.ones(1)])
    torch.testing.assert_close(r0["empty_case"], alone)
    assert r1["empty_case"] == []
