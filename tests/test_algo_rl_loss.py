"""Flag-driven advantage and loss dispatch (`slime.algo.rl_loss`): hand-computed micro-batches and plugin hooks.

    python -m pytest -q tests/test_algo_rl_loss.py
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slime.algo.rl_loss import compute_advantages_from_args, compute_rl_loss, normalize_rewards_from_args

F64 = torch.float64
E02, EM05 = math.exp(0.2), math.exp(-0.5)


def t(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def make_args(**overrides) -> SimpleNamespace:
    """Defaults of slime/utils/arguments/algorithm.py (eps_clip_high already derived)."""
    base = dict(
        advantage_estimator="grpo", loss_type="policy_loss", eps_clip=0.2, eps_clip_high=0.2, eps_clip_c=None,
        value_clip=0.2, kl_coef=0.0, use_kl_loss=False, kl_loss_coef=0.0, kl_loss_type="k1", use_unbiased_kl=False,
        entropy_coef=0.0, gamma=1.0, lambd=1.0, normalize_advantages=False, grpo_std_normalization=True,
        rewards_normalization=True, compute_advantages_and_returns=True, custom_advantage_function_path=None,
        use_rollout_logprobs=False, get_mismatch_metrics=False, use_tis=False, tis_clip=2.0, tis_clip_low=0.0,
        custom_tis_function_path=None, custom_pg_loss_reducer_function_path=None, calculate_per_token_loss=False,
        n_samples_per_prompt=2,
    )
    base.update(overrides)
    return SimpleNamespace(**base)


def make_batch() -> dict:
    return {
        "response_lengths": [2, 3],
        "total_lengths": [5, 7],
        "loss_masks": [torch.ones(2), torch.tensor([1.0, 0.0, 1.0])],
        "rewards": t([1.0, -1.0]),
        "advantages": [t([1.0, 1.0]), t([-1.0, -1.0, -1.0])],
        "log_probs": [t([-1.0, -2.0]), t([-1.0, -1.0, -1.0])],
        "ref_log_probs": [t([-1.1, -2.0]), t([-1.0, -1.5, -1.0])],
        "rollout_log_probs": [t([-1.2, -2.0]), t([-1.0, -1.0, -0.5])],
    }


ENTROPY = [t([0.5, 1.5]), t([1.0, 9.0, 2.0])]


def current(batch: dict) -> list[torch.Tensor]:
    return [lp.clone().requires_grad_() for lp in batch["log_probs"]]


def test_policy_loss_with_tis_kl_and_entropy_hand_computed() -> None:
    args = make_args(use_tis=True, use_kl_loss=True, kl_loss_coef=0.1, entropy_coef=0.01)
    batch = make_batch()
    log_probs = current(batch)  # equal to old -> ratio 1, pg per token = -A
    loss, m = compute_rl_loss(args, batch, log_probs=log_probs, entropy=ENTROPY)
    # TIS weights exp(old - rollout) = [e^0.2, 1], [1, 1, e^-0.5] (none clipped by [0, 2])
    pg = (-E02 - 1) / 2 + (1 + EM05) / 2  # middle token of sample 1 is masked
    entropy = (0.5 + 1.5) / 2 + (1.0 + 2.0) / 2
    kl = (0.1 + 0.0) / 2 + (0.0 + 0.0) / 2  # k1 = new - ref = [0.1, 0], [0, 0.5 (masked), 0]
    assert loss.item() == pytest.approx(pg - 0.01 * entropy + 0.1 * kl)
    assert m["pg_loss"].item() == pytest.approx(pg)
    assert m["entropy_loss"].item() == pytest.approx(entropy)
    assert m["kl_loss"].item() == pytest.approx(kl)
    assert m["pg_clipfrac"].item() == 0 and m["ppo_kl"].item() == 0
    assert m["tis"].item() == pytest.approx((E02 + 1) / 2 + (1 + EM05) / 2)
    assert m["tis_abs"].item() == pytest.approx((E02 - 1) / 2 + (1 - EM05) / 2)
    assert m["tis_clipfrac"].item() == 0
    assert m["tis_min"].item() == pytest.approx(EM05) and m["tis_max"].item() == pytest.approx(E02)
    assert m["loss"].item() == pytest.approx(loss.item())
    loss.backward()
    # d pg / d log_prob = -A * w / n_valid ; d kl / d log_prob = 0.1 / n_valid on valid tokens
    torch.testing.assert_close(log_probs[0].grad, t([-E02 / 2 + 0.05, -0.5 + 0.05]))
    torch.testing.assert_close(log_probs[1].grad, t([0.5 + 0.05, 0.0, EM05 / 2 + 0.05]))


def test_per_token_loss_sums_tokens() -> None:
    args = make_args(use_tis=True, calculate_per_token_loss=True)
    batch = make_batch()
    loss, m = compute_rl_loss(args, batch, log_probs=current(batch), entropy=ENTROPY)
    assert loss.item() == pytest.approx(-E02 - 1 + 1 + EM05)
    assert m["entropy_loss"].item() == pytest.approx(0.5 + 1.5 + 1.0 + 2.0)


def test_tis_clipping_and_ppo_clip_through_args() -> None:
    args = make_args(use_tis=True, tis_clip=1.1, tis_clip_low=0.9, eps_clip=0.1, eps_clip_high=0.1)
    batch = make_batch()
    new = [t([-1.0 + math.log(1.5), -2.0]), t([-1.0, -1.0, -1.0 + math.log(0.5)])]  # ratios 1.5, 1 | 1, 1, 0.5
    loss, m = compute_rl_loss(args, batch, log_probs=[x.requires_grad_() for x in new], entropy=None)
    # TIS weights clipped to [0.9, 1.1]: [1.1, 1], [1, 1, 0.9]
    # pg: tok(1.5, A=1) -> max(-1.5, -1.1) = -1.1 clipped ; tok(1, A=1) = -1 ; tok(1, A=-1) = 1 ; tok(0.5, A=-1) -> max(0.5, 0.9) = 0.9 clipped
    pg = (-1.1 * 1.1 - 1.0) / 2 + (1.0 + 0.9 * 0.9) / 2
    assert m["pg_loss"].item() == pytest.approx(pg)
    assert m["pg_clipfrac"].item() == pytest.approx(1 / 2 + 1 / 2)
    assert m["ppo_kl"].item() == pytest.approx(-math.log(1.5) / 2 - math.log(0.5) / 2)
    assert m["tis_clipfrac"].item() == pytest.approx(1 / 2 + 1 / 2)
    assert m["ois"].item() == pytest.approx((1.5 + 1) / 2 + (1 + 0.5) / 2)
    assert "entropy_loss" not in m


def test_unbiased_kl_weights_by_current_over_old() -> None:
    args = make_args(use_kl_loss=True, kl_loss_coef=1.0, use_unbiased_kl=True)
    batch = {"response_lengths": [2], "loss_masks": [torch.ones(2)], "advantages": [t([0.0, 0.0])],
             "log_probs": [t([-1.0, -1.0])], "ref_log_probs": [t([-1.0, -1.5])]}
    loss, m = compute_rl_loss(args, batch, log_probs=[t([-0.5, -1.0]).requires_grad_()], entropy=None)
    # k1 = new - ref = [0.5, 0.5]; ratio exp(new - old) = [e^0.5, 1]
    assert m["kl_loss"].item() == pytest.approx((0.5 * math.exp(0.5) + 0.5) / 2)
    assert loss.item() == pytest.approx(m["kl_loss"].item())  # zero advantages -> zero pg loss


def test_kl_loss_with_zero_coef_is_reported_but_not_added() -> None:
    args = make_args(use_kl_loss=True, kl_loss_coef=0.0)
    batch = make_batch()
    loss, m = compute_rl_loss(args, batch, log_probs=current(batch), entropy=None)
    assert m["kl_loss"].item() == pytest.approx(0.05)
    assert loss.item() == pytest.approx(m["pg_loss"].item())


@pytest.mark.parametrize("estimator", ["gspo", "cispo"])
def test_other_policy_losses_through_args(estimator: str) -> None:
    args = make_args(advantage_estimator=estimator, eps_clip=1.0 if estimator == "cispo" else 0.2)
    batch = make_batch()
    new = [t([-1.0 + math.log(1.5), -2.0]), t([-1.0, -1.0, -1.0])]
    loss, m = compute_rl_loss(args, batch, log_probs=[x.requires_grad_() for x in new], entropy=None)
    if estimator == "gspo":
        # sample 0: s = exp(log(1.5) / 2) = 1.2247 > 1.2 -> -1.2 ; sample 1: s = 1, A = -1 -> 1
        assert loss.item() == pytest.approx(-1.2 + 1.0)
    else:
        # weights clip(r, 0, 1.2) = [1.2, 1], [1, 1, 1]; loss per token = -w A log_pi
        s0 = (-1.2 * 1.0 * (-1.0 + math.log(1.5)) + -1.0 * 1.0 * -2.0) / 2
        s1 = (-1.0 * -1.0 * -1.0 + -1.0 * -1.0 * -1.0) / 2
        assert loss.item() == pytest.approx(s0 + s1)
        assert m["pg_clipfrac"].item() == pytest.approx(1 / 2)


def test_sft_and_value_losses() -> None:
    batch = make_batch()
    loss, m = compute_rl_loss(make_args(loss_type="sft_loss"), batch, log_probs=current(batch), entropy=None)
    assert loss.item() == pytest.approx((1.0 + 2.0) / 2 + (1.0 + 1.0) / 2)
    critic_batch = {"response_lengths": [3], "loss_masks": [torch.ones(3)], "values": [t([0.5, 1.0, 0.0])],
                    "returns": [t([2.0, 0.0, 1.0])]}
    values = [t([1.0, 2.0, 0.0]).requires_grad_()]
    loss, m = compute_rl_loss(make_args(advantage_estimator="ppo"), critic_batch, log_probs=None, entropy=None, values=values)
    # per token max(unclipped, clipped)^2 = [1.69, 4, 1] (see test_algo_losses); mean over 3 tokens
    assert loss.item() == pytest.approx((1.69 + 4.0 + 1.0) / 3)
    assert m["value_loss"].item() == pytest.approx(loss.item())
    assert m["value_clipfrac"].item() == pytest.approx(2 / 3)
    loss.backward()
    # only tok2 is unclipped-dominant with gradient 2 (V - R) / 3; tok0 picks the clipped branch (no grad); tok1 2*(2-0)/3
    torch.testing.assert_close(values[0].grad, t([0.0, 4.0 / 3, 2 * (0.0 - 1.0) / 3]))


def test_actor_and_critic_losses_add_up() -> None:
    batch = make_batch()
    batch["values"] = [t([0.0, 0.0]), t([0.0, 0.0, 0.0])]
    batch["returns"] = [t([1.0, 1.0]), t([0.0, 0.0, 0.0])]
    values = [t([0.0, 0.0]), t([0.0, 5.0, 0.0])]  # masked middle token is ignored
    loss, m = compute_rl_loss(make_args(advantage_estimator="ppo"), batch, log_probs=current(batch), entropy=None, values=values)
    assert m["value_loss"].item() == pytest.approx(1.0)
    assert loss.item() == pytest.approx(m["pg_loss"].item() + 1.0)


def test_loss_errors_name_the_flag() -> None:
    batch = make_batch()
    del batch["rollout_log_probs"]
    with pytest.raises(ValueError, match="--use-tis"):
        compute_rl_loss(make_args(use_tis=True), batch, log_probs=current(batch), entropy=None)
    with pytest.raises(ValueError, match="custom_loss"):
        compute_rl_loss(make_args(loss_type="custom_loss"), batch, log_probs=current(batch), entropy=None)
    with pytest.raises(ValueError, match="--entropy-coef"):
        compute_rl_loss(make_args(entropy_coef=0.1), batch, log_probs=current(batch), entropy=None)
    with pytest.raises(ValueError, match="--use-rollout-logprobs"):
        compute_rl_loss(make_args(use_rollout_logprobs=True), batch, log_probs=current(batch), entropy=None)
    del batch["ref_log_probs"]
    with pytest.raises(ValueError, match="--use-kl-loss"):
        compute_rl_loss(make_args(use_kl_loss=True), batch, log_probs=current(batch), entropy=None)
    with pytest.raises(ValueError, match="--custom-tis-function-path"):
        compute_rl_loss(make_args(get_mismatch_metrics=True, custom_tis_function_path="no_such_mod.fn"),
                        make_batch(), log_probs=current(batch), entropy=None)


PLUGIN = '''
import torch
calls = []

def advantages(args, rollout_data):
    calls.append(("adv", sorted(rollout_data)))
    rollout_data["advantages"] = [torch.full_like(m, 2.0) for m in rollout_data["loss_masks"]]
    rollout_data["returns"] = [torch.zeros_like(m) for m in rollout_data["loss_masks"]]

def forgetful(args, rollout_data):
    pass

def reject_tis(args, *, pg_loss, train_log_probs, rollout_log_probs, loss_masks, total_lengths, response_lengths):
    calls.append(("tis", list(total_lengths), list(response_lengths)))
    masks = [m * (r <= -0.9).to(m.dtype) for m, r in zip(loss_masks, rollout_log_probs)]
    keep = torch.cat(masks).to(pg_loss.dtype)
    return pg_loss * keep, masks, {"rejected": 1 - keep}

def times_ten_token_sum(total_lengths, response_lengths, loss_masks, calculate_per_token_loss):
    calls.append(("reducer", calculate_per_token_loss))
    def reduce(x):
        return 10 * sum((x_i * m).sum() for x_i, m in zip(x.split(list(response_lengths)), loss_masks))
    return reduce
'''


@pytest.fixture()
def plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "algo_test_plugin.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("algo_test_plugin", None)
    import algo_test_plugin

    yield algo_test_plugin
    sys.modules.pop("algo_test_plugin", None)


def test_custom_tis_and_reducer_hooks(plugin) -> None:
    batch = make_batch()
    args = make_args(use_tis=True, custom_tis_function_path="algo_test_plugin.reject_tis")
    loss, m = compute_rl_loss(args, batch, log_probs=current(batch), entropy=None)
    # rollout log-prob -0.5 > -0.9: the last token of sample 1 is rejected; denominators stay the original 2 and 2
    assert loss.item() == pytest.approx((-1 - 1) / 2 + (1 + 0) / 2)
    assert m["rejected"].item() == pytest.approx(0 / 2 + (0 + 1) / 2)
    assert ("tis", [5, 7], [2, 3]) in plugin.calls
    args.custom_pg_loss_reducer_function_path = "algo_test_plugin.times_ten_token_sum"
    loss, _ = compute_rl_loss(args, batch, log_probs=current(batch), entropy=None)
    assert loss.item() == pytest.approx(10 * (-1 - 1 + 1))  # reducer sees the modified masks
    assert ("reducer", False) in plugin.calls


def test_custom_advantage_function(plugin) -> None:
    batch = make_batch()
    compute_advantages_from_args(make_args(custom_advantage_function_path="algo_test_plugin.advantages"), batch)
    torch.testing.assert_close(batch["advantages"], [torch.full((2,), 2.0), torch.full((3,), 2.0)])
    assert "kl" in plugin.calls[-1][1] and "rewards" in plugin.calls[-1][1]
    with pytest.raises(ValueError, match="--custom-advantage-function-path"):
        compute_advantages_from_args(make_args(custom_advantage_function_path="algo_test_plugin.forgetful"), make_batch())


def test_compute_advantages_from_args_grpo_with_whitening() -> None:
    batch = make_batch()
    del batch["advantages"]
    compute_advantages_from_args(make_args(normalize_advantages=True), batch)
    # advantages [1, 1], [-1, -1 (masked), -1]: valid tokens 1, 1, -1, -1 -> mean 0, unbiased var 4/3
    s = math.sqrt(4 / 3 + 1e-8)
    torch.testing.assert_close(batch["advantages"], [t([1 / s, 1 / s]), t([-1 / s, 0.0, -1 / s])])
    torch.testing.assert_close(batch["returns"], [t([1.0, 1.0]), t([-1.0, -1.0, -1.0])])


def test_compute_advantages_from_args_kl_shaping_uses_rollout_log_probs_when_asked() -> None:
    batch = make_batch()
    args = make_args(advantage_estimator="reinforce_plus_plus_baseline", kl_coef=0.5, use_rollout_logprobs=True)
    compute_advantages_from_args(args, batch)
    # k1 = rollout - ref = [-0.1, 0], [0, 0.5 (masked -> 0), 0.5]; A = R - 0.5 * kl
    torch.testing.assert_close(batch["advantages"], [t([1.05, 1.0]), t([-1.0, -1.0, -1.25])])
    torch.testing.assert_close(batch["kl"], [t([-0.1, 0.0]), t([0.0, 0.0, 0.5])])


def test_compute_advantages_from_args_disabled_and_errors() -> None:
    batch = make_batch()
    del batch["advantages"]
    compute_advantages_from_args(make_args(compute_advantages_and_returns=False), batch)
    assert "advantages" not in batch
    del batch["ref_log_probs"]
    with pytest.raises(ValueError, match="--kl-coef"):
        compute_advantages_from_args(make_args(kl_coef=0.1), batch)


def test_normalize_rewards_from_args() -> None:
    assert normalize_rewards_from_args(make_args(grpo_std_normalization=False), [1.0, 3.0, 0.0, 0.0]) == [-1.0, 1.0, 0.0, 0.0]
    assert normalize_rewards_from_args(make_args(advantage_estimator="ppo"), [1.0, 3.0]) == [1.0, 3.0]
    out = normalize_rewards_from_args(make_args(), [1.0, 3.0])
    assert out == pytest.approx([-1 / math.sqrt(2), 1 / math.sqrt(2)], rel=1e-5)


def test_compute_rl_loss_gradcheck() -> None:
    args = make_args(advantage_estimator="ppo", use_tis=True, use_kl_loss=True, kl_loss_coef=0.3, kl_loss_type="k3",
                     eps_clip_c=3.0, entropy_coef=0.0)
    batch = make_batch()
    batch["advantages"] = [t([0.7, -1.2]), t([0.4, 2.0, -0.3])]
    start = t([-0.95, -2.1, -1.05, -0.8, -0.98])  # ratios inside the clip range

    def fn(flat: torch.Tensor) -> torch.Tensor:
        return compute_rl_loss(args, batch, log_probs=list(flat.split([2, 3])), entropy=None)[0]

    assert torch.autograd.gradcheck(fn, (start.requires_grad_(),))


@settings(max_examples=15, deadline=None)
@given(
    estimator=st.sampled_from(["grpo", "gspo", "cispo", "ppo"]),
    noise=st.lists(
        st.one_of(st.floats(-3, 3, allow_nan=False), st.sampled_from([math.inf, -math.inf, math.nan])),
        min_size=6, max_size=6,
    ),
    per_token=st.booleans(),
)
def test_masked_tokens_never_change_loss_metrics_or_gradients(estimator: str, noise: list[float], per_token: bool) -> None:
    args = make_args(advantage_estimator=estimator, use_tis=True, use_kl_loss=True, kl_loss_coef=0.2,
                     kl_loss_type="low_var_kl", entropy_coef=0.05, calculate_per_token_loss=per_token)
    batch = make_batch()  # only sample 1, token 1 is masked; its inputs may even be inf or NaN
    perturbed = make_batch()
    for i, key in enumerate(["advantages", "log_probs", "ref_log_probs", "rollout_log_probs"]):
        perturbed[key][1] = perturbed[key][1] + t([0.0, noise[i], 0.0])
    ent_b = [ENTROPY[0], ENTROPY[1] + t([0.0, noise[4], 0.0])]
    lp_a = current(make_batch())
    lp_b = [lp_a[0].detach().clone().requires_grad_(), (lp_a[1].detach() + t([0.0, noise[5], 0.0])).requires_grad_()]
    loss_a, m_a = compute_rl_loss(args, batch, log_probs=lp_a, entropy=ENTROPY)
    loss_b, m_b = compute_rl_loss(args, perturbed, log_probs=lp_b, entropy=ent_b)
    assert loss_a.item() == pytest.approx(loss_b.item(), abs=1e-12)
    assert m_a.keys() == m_b.keys()
    for key in m_a:
        assert m_a[key].item() == pytest.approx(m_b[key].item(), abs=1e-12), key
    loss_a.backward()
    loss_b.backward()
    torch.testing.assert_close(lp_a[0].grad, lp_b[0].grad)
    torch.testing.assert_close(lp_a[1].grad[[0, 2]], lp_b[1].grad[[0, 2]])
    assert lp_a[1].grad[1] == 0 and lp_b[1].grad[1] == 0


def test_mismatch_metrics_alone_report_tis_without_weighting_the_loss() -> None:
    batch = make_batch()
    plain, _ = compute_rl_loss(make_args(), batch, log_probs=current(batch), entropy=None)
    loss, m = compute_rl_loss(make_args(get_mismatch_metrics=True), batch, log_probs=current(batch), entropy=None)
    assert loss.item() == pytest.approx(plain.item()) == pytest.approx((-1 - 1) / 2 + (1 + 1) / 2)
    assert m["tis"].item() == pytest.approx((E02 + 1) / 2 + (1 + EM05) / 2)
    assert m["ois"].item() == pytest.approx(2.0)  # ratio 1 in both samples


def _kernels_of_loss_step(num_samples: int) -> int:
    args = make_args(use_tis=True, use_kl_loss=True, kl_loss_coef=0.1, entropy_coef=0.01)
    lengths = [3 + i % 5 for i in range(num_samples)]
    gen = torch.Generator().manual_seed(num_samples)
    batch = {"response_lengths": lengths, "total_lengths": [n + 4 for n in lengths],
             "loss_masks": [(torch.rand(n, generator=gen) > 0.2).double() for n in lengths]}
    for key in ("advantages", "log_probs", "ref_log_probs", "rollout_log_probs"):
        batch[key] = [-torch.rand(n, generator=gen, dtype=F64) for n in lengths]
    log_probs = [lp.clone().requires_grad_() for lp in batch["log_probs"]]
    entropy = [torch.rand(n, dtype=F64, generator=gen) for n in lengths]
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from loss_overhead import CountOps  # views excluded: on a GPU each counted op is a kernel launch

    with CountOps() as counter:
        loss, _ = compute_rl_loss(args, batch, log_probs=log_probs, entropy=entropy)
        loss.backward()
    return counter.count


def test_the_loss_launches_as_many_kernels_for_256_samples_as_for_4() -> None:
    """Per-sample Python loops made a micro-batch of short GRPO answers cost thousands of tiny kernels."""
    assert _kernels_of_loss_step(256) == _kernels_of_loss_step(4) < 300
