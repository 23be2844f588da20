"""Advantage estimators, group reward normalisation and batch-wide advantage whitening.

    python -c "import torch; from slime.algo.advantages import compute_advantages_and_returns as f; print(f('grpo', rewards=torch.tensor([1.0, -1.0]), loss_masks=[torch.ones(2), torch.ones(3)]))"

Who normalises what (the same split as the original slime):
1. Rollout side, once per rollout, over *all* samples (group members adjacent):
   `group_normalize_rewards_for(estimator, ...)` subtracts the group mean for grpo, gspo, cispo
   and reinforce_plus_plus_baseline, and divides by the group std (unbiased, + eps) for grpo,
   gspo and cispo unless `--disable-grpo-std-normalization`; `--disable-rewards-normalization`
   turns both off. reinforce_plus_plus and ppo receive raw rewards.
   The trainer's `batch["rewards"]` holds the result.
2. Trainer side, per rank: `compute_advantages_and_returns` turns the per-sample rewards into
   per-token advantages/returns (optionally with the `--kl-coef` penalty), then
   `normalize_advantages` (`--normalize-advantages`) whitens them over every loss-masked token of
   the rollout, across data-parallel ranks.

Estimators (per sample i with reward R_i, per-token KL k_t = kl_coef * KL_t on loss-masked tokens):
- grpo / gspo / cispo: A_t = R_i on every token; returns = advantages. The KL
  penalty is not applied (as in the original; use `--use-kl-loss` instead).
- reinforce_plus_plus: token rewards r_t = -k_t, plus R_i on the last loss-masked token;
  A_t = G_t = sum_{s>=t} gamma^(s-t) r_s over all positions of the response (a sample with an
  all-zero loss mask gets zeros: it contributes nothing to the loss anyway).
- reinforce_plus_plus_baseline: A_t = R_i - k_t (R_i already has its group mean removed);
  returns = advantages.
- ppo: token rewards as reinforce_plus_plus; GAE over the loss-masked tokens with the critic's
  values: delta_t = r_t + gamma V_next - V_t, A_t = delta_t + gamma lambd A_next, returns = A + V.
  Decision: loss-masked-out tokens (tool output) are skipped by the recursion (the next valid
  token follows directly) and get advantage 0 and return = value, so masked positions never change
  the result. With an all-ones mask this is exactly the original's GAE.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from slime.algo.kl import compute_approx_kl

ADVANTAGE_ESTIMATORS = ("grpo", "gspo", "cispo", "reinforce_plus_plus", "reinforce_plus_plus_baseline", "ppo")
MEAN_NORMALIZED_ESTIMATORS = ("grpo", "gspo", "cispo", "reinforce_plus_plus_baseline")
STD_NORMALIZED_ESTIMATORS = ("grpo", "gspo", "cispo")
WHITEN_EPS = 1e-8


def normalize_group_rewards(rewards: Tensor, group_size: int, *, std_normalize: bool, eps: float = 1e-6) -> Tensor:
    """Subtract each group's mean (groups = consecutive `group_size` entries); optionally divide by std + eps.

    The std is the unbiased one (as torch.std); a group of one sample has std 0.
    """
    rewards = torch.as_tensor(rewards)
    if not rewards.is_floating_point():
        rewards = rewards.to(torch.float32)
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D, got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(
            f"{rewards.numel()} rewards cannot be split into groups of --n-samples-per-prompt {group_size}"
        )
    groups = rewards.reshape(-1, group_size)
    centered = groups - groups.mean(dim=1, keepdim=True)
    if std_normalize:
        std = groups.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(groups[:, :1])
        centered = centered / (std + eps)
    return centered.reshape(-1)


def group_normalize_rewards_for(
    estimator: str,
    rewards: Tensor,
    group_size: int,
    *,
    rewards_normalization: bool = True,
    grpo_std_normalization: bool = True,
    eps: float = 1e-6,
) -> Tensor:
    """Rollout-side reward post-processing for `--advantage-estimator` (see the module docstring)."""
    _check_estimator(estimator)
    rewards = torch.as_tensor(rewards, dtype=torch.float32) if not torch.is_tensor(rewards) else rewards
    if not rewards_normalization or estimator not in MEAN_NORMALIZED_ESTIMATORS:
        return rewards.clone()
    std_normalize = grpo_std_normalization and estimator in STD_NORMALIZED_ESTIMATORS
    return normalize_group_rewards(rewards, group_size, std_normalize=std_normalize, eps=eps)


def _check_estimator(estimator: str) -> None:
    if estimator not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"--advantage-estimator must be one of {', '.join(ADVANTAGE_ESTIMATORS)}, got {estimator!r}")


def _check_per_sample(name: str, tensors: Sequence[Tensor] | None, loss_masks: Sequence[Tensor]) -> None:
    if tensors is None:
        return
    if len(tensors) != len(loss_masks):
        raise ValueError(f"{name} has {len(tensors)} samples but loss_masks has {len(loss_masks)}")
    for i, (t, m) in enumerate(zip(tensors, loss_masks)):
        if t.shape != m.shape:
            raise ValueError(f"{name}[{i}] has shape {tuple(t.shape)} but loss_masks[{i}] has {tuple(m.shape)}")


def kl_penalty(
    log_probs: Sequence[Tensor],
    ref_log_probs: Sequence[Tensor],
    loss_masks: Sequence[Tensor],
    *,
    kl_type: str = "k1",
) -> list[Tensor]:
    """Per-sample, per-token KL estimate (no gradient) used for `--kl-coef` reward shaping; 0 on masked tokens."""
    _check_per_sample("log_probs", log_probs, loss_masks)
    _check_per_sample("ref_log_probs", ref_log_probs, loss_masks)
    kls = []
    for lp, ref, m in zip(log_probs, ref_log_probs, loss_masks):
        kl = compute_approx_kl(lp.detach(), ref.detach().to(lp.device), kl_type)
        kls.append(torch.where(m.to(kl.device) != 0, kl, torch.zeros((), dtype=kl.dtype, device=kl.device)))
    return kls


def _masked_kl(
    log_probs: Sequence[Tensor] | None,
    ref_log_probs: Sequence[Tensor] | None,
    loss_masks: Sequence[Tensor],
    kl_coef: float,
    kl_type: str,
    dtype: torch.dtype,
) -> list[Tensor]:
    if kl_coef == 0:
        return [torch.zeros(m.shape, dtype=dtype, device=m.device) for m in loss_masks]
    if log_probs is None or ref_log_probs is None:
        raise ValueError("--kl-coef != 0 needs log_probs and ref_log_probs (set --ref-load or use --kl-coef 0)")
    return [kl.to(dtype) for kl in kl_penalty(log_probs, ref_log_probs, loss_masks, kl_type=kl_type)]


def _last_valid_index(mask: Tensor) -> int | None:
    valid = torch.nonzero(mask != 0).flatten()
    return int(valid[-1]) if valid.numel() else None


def _discounted_returns(token_rewards: Tensor, gamma: float) -> Tensor:
    rewards = token_rewards.tolist()
    returns = [0.0] * len(rewards)
    running = 0.0
    for t in range(len(rewards) - 1, -1, -1):
        running = rewards[t] + gamma * running
        returns[t] = running
    return torch.tensor(returns, dtype=token_rewards.dtype, device=token_rewards.device)


def _gae(token_rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lambd: float) -> tuple[Tensor, Tensor]:
    valid = torch.nonzero(mask != 0).flatten().tolist()
    rewards, vals = token_rewards.tolist(), values.tolist()
    advantages = [0.0] * len(vals)
    last_gae, next_value = 0.0, 0.0
    for t in reversed(valid):
        delta = rewards[t] + gamma * next_value - vals[t]
        last_gae = delta + gamma * lambd * last_gae
        advantages[t] = last_gae
        next_value = vals[t]
    adv = torch.tensor(advantages, dtype=values.dtype, device=values.device)
    return adv, adv + values


def compute_advantages_and_returns(
    estimator: str,
    *,
    rewards: Tensor,
    loss_masks: list[Tensor],
    log_probs: list[Tensor] | None = None,
    ref_log_probs: list[Tensor] | None = None,
    values: list[Tensor] | None = None,
    kl_coef: float = 0.0,
    kl_type: str = "k1",
    gamma: float = 1.0,
    lambd: float = 1.0,
) -> tuple[list[Tensor], list[Tensor]]:
    """Per-sample (advantages, returns), 1-D over each sample's response tokens; no gradient flows.

    `rewards` [B] are the trainer-side rewards (group-normalised upstream where the estimator
    wants it). `log_probs`/`ref_log_probs` are needed only when `kl_coef != 0`; `values` only for ppo.
    """
    _check_estimator(estimator)
    rewards = torch.as_tensor(rewards) if not torch.is_tensor(rewards) else rewards
    if rewards.dim() != 1 or rewards.numel() != len(loss_masks):
        raise ValueError(f"rewards has shape {tuple(rewards.shape)} but there are {len(loss_masks)} samples")
    _check_per_sample("log_probs", log_probs, loss_masks)
    _check_per_sample("ref_log_probs", ref_log_probs, loss_masks)
    _check_per_sample("values", values, loss_masks)
    dtype = torch.promote_types(rewards.dtype if rewards.is_floating_point() else torch.float32, torch.float32)
    if values is not None and values:
        dtype = torch.promote_types(dtype, values[0].dtype)
    with torch.no_grad():
        kls = _masked_kl(log_probs, ref_log_probs, loss_masks, kl_coef, kl_type, dtype)
        advantages: list[Tensor] = []
        returns: list[Tensor] = []
        for i, (mask, kl) in enumerate(zip(loss_masks, kls)):
            reward = rewards[i].to(device=kl.device, dtype=dtype)
            if estimator in ("grpo", "gspo", "cispo"):
                adv = torch.full(mask.shape, float(reward), dtype=dtype, device=kl.device)
                ret = adv
            elif estimator == "reinforce_plus_plus_baseline":
                adv = reward - kl_coef * kl
                ret = adv
            else:
                token_rewards = -kl_coef * kl
                last = _last_valid_index(mask)
                if last is not None:
                    token_rewards[last] += reward
                if estimator == "reinforce_plus_plus":
                    adv = _discounted_returns(token_rewards, gamma)
                    ret = adv
                else:
                    if values is None:
                        raise ValueError("--advantage-estimator ppo needs critic values (batch['values'])")
                    adv, ret = _gae(token_rewards, values[i].detach().to(dtype), mask, gamma, lambd)
            advantages.append(adv)
            returns.append(ret)
    return advantages, returns


def normalize_advantages(
    advantages: list[Tensor],
    loss_masks: list[Tensor],
    group: "dist.ProcessGroup | None" = None,
    *,
    eps: float = WHITEN_EPS,
) -> list[Tensor]:
    """Masked whitening over every loss-masked token of the batch: (A - mean) / sqrt(var + eps).

    The variance is unbiased (Bessel) as in the original. When torch.distributed is initialised the
    statistics are summed over `group` (default: the world group), so every data-parallel rank
    uses the same mean and variance; every rank must call this, even with no tokens. Masked
    positions come back as 0.
    """
    _check_per_sample("advantages", advantages, loss_masks)
    distributed = dist.is_available() and dist.is_initialized()
    if not advantages and not distributed:
        return []
    dtype = advantages[0].dtype if advantages else torch.float32
    stat_dtype = torch.float64
    if advantages:
        flat = torch.cat([a.reshape(-1) for a in advantages]).to(stat_dtype)
        mask = torch.cat([m.reshape(-1) for m in loss_masks]).to(flat.device) != 0
    else:
        flat, mask = torch.zeros(0, dtype=stat_dtype), torch.zeros(0, dtype=torch.bool)
    valid = flat[mask]

    stats = torch.stack([valid.sum(), torch.tensor(float(valid.numel()), dtype=stat_dtype, device=valid.device)])
    if distributed:
        stats = _all_reduce_sum(stats, group)
    total, count = float(stats[0]), float(stats[1])
    if count == 0:
        raise ValueError("--normalize-advantages: every loss mask in the batch is zero, nothing to whiten")
    mean = total / count
    squared = (valid - mean).square().sum().reshape(1)
    if distributed:
        squared = _all_reduce_sum(squared, group)
    var = float(squared[0]) / count
    if count >= 2:
        var = var * count / (count - 1)
    whitened = torch.where(mask, (flat - mean) / (var + eps) ** 0.5, 0.0)
    return [w.to(dtype).reshape(a.shape) for w, a in zip(whitened.split([a.numel() for a in advantages]), advantages)]


def _all_reduce_sum(t: Tensor, group: "dist.ProcessGroup | None") -> Tensor:
    backend = dist.get_backend(group)
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    buffer = t.detach().to(device).clone()
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)
    return buffer.to(t.device)
