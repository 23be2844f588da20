"""KL estimators and per-sample reductions on hand-computed cases.

    python -m pytest -q tests/test_algo_kl_reduce.py
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slime.algo.kl import compute_approx_kl
from slime.algo.reduce import get_sum_of_sample_mean, sum_of_sample_mean

LOG_PROBS = torch.tensor([-1.0, -0.5, -2.0], dtype=torch.float64)
REF_LOG_PROBS = torch.tensor([-1.5, -0.5, -1.0], dtype=torch.float64)
# r = log_probs - ref = [0.5, 0.0, -1.0]


@pytest.mark.parametrize(
    "kl_type, expected",
    [
        ("k1", [0.5, 0.0, -1.0]),
        ("k2", [0.5**2 / 2, 0.0, 1.0 / 2]),
        # k3 = exp(-r) - 1 + r
        ("k3", [math.exp(-0.5) - 1 + 0.5, 0.0, math.exp(1.0) - 1 - 1.0]),
        ("low_var_kl", [math.exp(-0.5) - 1 + 0.5, 0.0, math.exp(1.0) - 1 - 1.0]),
    ],
)
def test_kl_estimators_hand_computed(kl_type: str, expected: list[float]) -> None:
    kl = compute_approx_kl(LOG_PROBS, REF_LOG_PROBS, kl_type)
    torch.testing.assert_close(kl, torch.tensor(expected, dtype=torch.float64))


def test_low_var_kl_is_clamped_to_ten_but_k3_is_not() -> None:
    log_probs = torch.tensor([-25.0, -1.0])
    ref = torch.tensor([-1.0, -1.0])  # r = -24 -> k3 = exp(24) - 25, huge
    assert compute_approx_kl(log_probs, ref, "k3")[0] > 1e9
    torch.testing.assert_close(compute_approx_kl(log_probs, ref, "low_var_kl"), torch.tensor([10.0, 0.0]))


def test_importance_ratio_multiplies_before_the_clamp() -> None:
    ratio = torch.tensor([2.0, 3.0, 0.5], dtype=torch.float64)
    k3 = compute_approx_kl(LOG_PROBS, REF_LOG_PROBS, "k3")
    torch.testing.assert_close(compute_approx_kl(LOG_PROBS, REF_LOG_PROBS, "k3", importance_ratio=ratio), ratio * k3)
    big = torch.tensor([1e6, 1.0, 1.0], dtype=torch.float64)
    weighted = compute_approx_kl(LOG_PROBS, REF_LOG_PROBS, "low_var_kl", importance_ratio=big)
    assert weighted[0].item() == 10.0


def test_kl_is_float32_for_half_inputs_and_zero_for_equal_inputs() -> None:
    lp = torch.tensor([-1.0, -2.0], dtype=torch.bfloat16)
    for kl_type in ("k1", "k2", "k3", "low_var_kl"):
        kl = compute_approx_kl(lp, lp.clone(), kl_type)
        assert kl.dtype == torch.float32
        assert torch.equal(kl, torch.zeros(2))


def test_kl_gradcheck() -> None:
    ref = REF_LOG_PROBS.clone()
    for kl_type in ("k1", "k2", "k3", "low_var_kl"):
        lp = LOG_PROBS.clone().requires_grad_()
        assert torch.autograd.gradcheck(lambda x, t=kl_type: compute_approx_kl(x, ref, t), (lp,))


def test_kl_bad_type_and_shape() -> None:
    with pytest.raises(ValueError, match="--kl-loss-type"):
        compute_approx_kl(LOG_PROBS, REF_LOG_PROBS, "k4")
    with pytest.raises(ValueError, match="shape"):
        compute_approx_kl(LOG_PROBS, REF_LOG_PROBS[:2], "k1")


X = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)
LENGTHS = [2, 3]
MASKS = [torch.tensor([1.0, 1.0]), torch.tensor([1.0, 0.0, 1.0])]


def test_sum_of_sample_mean_hand_computed() -> None:
    # sample 0: (1 + 2) / 2 = 1.5 ; sample 1: (3 + 5) / 2 = 4.0 (token 4 masked)
    assert sum_of_sample_mean(X, LENGTHS, MASKS).item() == pytest.approx(1.5 + 4.0)
    # per-token: 1 + 2 + 3 + 5
    assert sum_of_sample_mean(X, LENGTHS, MASKS, per_token=True).item() == pytest.approx(11.0)


def test_masked_tokens_holding_inf_or_nan_do_not_change_the_sum() -> None:
    x = X.clone()
    x[3] = float("nan")
    assert sum_of_sample_mean(x, LENGTHS, MASKS).item() == pytest.approx(5.5)
    x[3] = float("inf")
    assert sum_of_sample_mean(x, LENGTHS, MASKS, per_token=True).item() == pytest.approx(11.0)


def test_fully_masked_sample_contributes_zero_and_normalizer_masks_set_denominators() -> None:
    masks = [torch.zeros(2), torch.ones(3)]
    # sample 0 masked out: 0 / clamp(0, 1) = 0 ; sample 1: (3 + 4 + 5) / 3 = 4
    assert sum_of_sample_mean(X, LENGTHS, masks).item() == pytest.approx(4.0)
    # numerator mask keeps only token 3 of sample 1, denominator stays 3: 3 / 3 = 1
    rejected = [torch.zeros(2), torch.tensor([1.0, 0.0, 0.0])]
    assert sum_of_sample_mean(X, LENGTHS, rejected, normalizer_masks=masks).item() == pytest.approx(1.0)


def test_get_sum_of_sample_mean_factory_matches_and_has_gradient() -> None:
    reduce = get_sum_of_sample_mean([5, 7], LENGTHS, MASKS)
    reduce_tok = get_sum_of_sample_mean([5, 7], LENGTHS, MASKS, True)
    x = X.clone().requires_grad_()
    assert reduce(x).item() == pytest.approx(5.5)
    assert reduce_tok(x).item() == pytest.approx(11.0)
    reduce(x).backward()
    # d/dx: 1/2 for sample 0 tokens, 1/2 for unmasked tokens of sample 1, 0 for the masked one
    torch.testing.assert_close(x.grad, torch.tensor([0.5, 0.5, 0.5, 0.0, 0.5], dtype=torch.float64))
    assert torch.autograd.gradcheck(reduce, (X.clone().requires_grad_(),))


def test_reduction_errors_name_the_mismatch() -> None:
    with pytest.raises(ValueError, match="response_lengths sum"):
        sum_of_sample_mean(X, [2, 2], [torch.ones(2), torch.ones(2)])
    with pytest.raises(ValueError, match=r"loss_masks\[1\]"):
        sum_of_sample_mean(X, LENGTHS, [torch.ones(2), torch.ones(2)])
    with pytest.raises(ValueError, match="total_lengths"):
        get_sum_of_sample_mean([5], LENGTHS, MASKS)


def _loop_sum_of_sample_mean(x, lengths, masks, norms, per_token):
    """The definition, one sample at a time."""
    total = x.new_zeros(())
    for x_i, m_i, n_i in zip(x.split(lengths), masks, norms):
        part = torch.where(m_i != 0, x_i * m_i, 0.0).sum()
        total = total + (part if per_token else part / n_i.sum().clamp_min(1))
    return total


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(0, 6), min_size=0, max_size=9), seed=st.integers(0, 2**16),
       per_token=st.booleans(), narrowed=st.booleans())
def test_sum_of_sample_mean_equals_the_per_sample_definition_with_its_gradient(lengths, seed, per_token, narrowed):
    gen = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    x = torch.randn(n, dtype=torch.float64, generator=gen)
    norms = [(torch.rand(k, generator=gen) > 0.3).double() for k in lengths]  # empty and fully masked samples too
    masks = [m * (torch.rand(len(m), generator=gen) > 0.5).double() for m in norms] if narrowed else norms
    x_loop, x_vec = x.clone().requires_grad_(), x.clone().requires_grad_()
    expected = _loop_sum_of_sample_mean(x_loop, lengths, masks, norms, per_token)
    got = sum_of_sample_mean(x_vec, lengths, masks, per_token=per_token, normalizer_masks=norms)
    torch.testing.assert_close(got, expected)
    if n:
        expected.backward()
        got.backward()
        torch.testing.assert_close(x_vec.grad, x_loop.grad)
