"""Per-token policy, value, SFT and entropy terms, plus the default truncated-importance-sampling hook.

    python -c "import torch; from slime.algo.losses import ppo_policy_loss as f; print(f(torch.zeros(2), torch.zeros(2), torch.tensor([1.0, -1.0]), eps_clip=0.2, eps_clip_high=0.2))"

Every function takes flat 1-D tensors over the concatenated response tokens of a micro-batch and
returns per-token tensors; reduce them with `slime.algo.reduce.sum_of_sample_mean`.
Conventions follow the original slime: ppo_kl = old_log_probs - log_probs, ratio = exp(-ppo_kl).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from slime.algo.reduce import SampleSegments, flat_mask, masked


def _check_same_shape(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"per-token tensors differ in shape: {shapes}")


def _clipped_surrogate(
    ppo_kl: Tensor, advantages: Tensor, eps_clip: float, eps_clip_high: float, eps_clip_c: float | None
) -> tuple[Tensor, Tensor]:
    if eps_clip_c is not None and eps_clip_c <= 1.0:
        raise ValueError(f"--eps-clip-c (dual-clip lower bound) must be > 1.0, got {eps_clip_c}")
    ratio = torch.exp(-ppo_kl)
    unclipped = -ratio * advantages
    clipped = -ratio.clamp(1.0 - eps_clip, 1.0 + eps_clip_high) * advantages
    pg_loss = torch.maximum(unclipped, clipped)
    clipfrac = (clipped > unclipped).to(ratio.dtype)
    if eps_clip_c is not None:
        dual_bound = -eps_clip_c * advantages
        pg_loss = torch.where(advantages < 0, torch.minimum(dual_bound, pg_loss), pg_loss)
    return pg_loss, clipfrac


def ppo_policy_loss(
    log_probs: Tensor,
    old_log_probs: Tensor,
    advantages: Tensor,
    *,
    eps_clip: float,
    eps_clip_high: float,
    eps_clip_c: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """PPO clipped surrogate per token: (pg_loss, clipfrac, ppo_kl).

    pg_loss = max(-r A, -clip(r, 1 - eps_clip, 1 + eps_clip_high) A); with dual clip (`--eps-clip-c` c > 1)
    tokens with A < 0 use min(that, -c A). clipfrac marks tokens where the clipped branch won.
    """
    _check_same_shape(log_probs=log_probs, old_log_probs=old_log_probs, advantages=advantages)
    ppo_kl = old_log_probs - log_probs
    pg_loss, clipfrac = _clipped_surrogate(ppo_kl, advantages, eps_clip, eps_clip_high, eps_clip_c)
    return pg_loss, clipfrac, ppo_kl


def sequence_mean_log_ratio(
    log_probs: Tensor, old_log_probs: Tensor, response_lengths: Sequence[int], loss_masks: Sequence[Tensor]
) -> Tensor:
    """GSPO's per-sample masked mean of (old - new) log-probs, broadcast back over each sample's tokens."""
    _check_same_shape(log_probs=log_probs, old_log_probs=old_log_probs)
    if sum(response_lengths) != log_probs.numel() or len(loss_masks) != len(response_lengths):
        raise ValueError(
            f"response_lengths {list(response_lengths)} / {len(loss_masks)} loss_masks"
            f" do not match {log_probs.numel()} tokens"
        )
    segments = SampleSegments(response_lengths, log_probs.device)
    mask = flat_mask(loss_masks, log_probs)
    seq_kl = segments.sums(masked(old_log_probs - log_probs, mask)) / segments.sums(mask).clamp_min(1)
    return segments.broadcast(seq_kl)


def gspo_policy_loss(
    log_probs: Tensor,
    old_log_probs: Tensor,
    advantages: Tensor,
    *,
    response_lengths: Sequence[int],
    loss_masks: Sequence[Tensor],
    eps_clip: float,
    eps_clip_high: float,
    eps_clip_c: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """GSPO: the PPO surrogate with one sequence-level ratio s_i = exp(mean_t(log pi - log pi_old)) per sample.

    Returns per-token (pg_loss, clipfrac, ppo_kl), each constant within a sample, so the per-sample
    mean reduction gives exactly the sequence-level objective.
    """
    _check_same_shape(log_probs=log_probs, advantages=advantages)
    ppo_kl = sequence_mean_log_ratio(log_probs, old_log_probs, response_lengths, loss_masks)
    pg_loss, clipfrac = _clipped_surrogate(ppo_kl, advantages, eps_clip, eps_clip_high, eps_clip_c)
    return pg_loss, clipfrac, ppo_kl


def cispo_policy_loss(
    log_probs: Tensor,
    old_log_probs: Tensor,
    advantages: Tensor,
    *,
    eps_clip: float,
    eps_clip_high: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """CISPO (MiniMax-M1): -sg(clip(r, 1 - eps_clip, 1 + eps_clip_high)) * A * log pi, per token.

    The clipped ratio carries no gradient, so clipped tokens still push through log pi.
    Returns (pg_loss, clipfrac, ppo_kl); clipfrac marks tokens whose ratio was clipped.
    """
    _check_same_shape(log_probs=log_probs, old_log_probs=old_log_probs, advantages=advantages)
    ppo_kl = old_log_probs - log_probs
    ratio = torch.exp(-ppo_kl)
    truncated = ratio.clamp(1.0 - eps_clip, 1.0 + eps_clip_high)
    pg_loss = -truncated.detach() * advantages * log_probs
    clipfrac = (truncated != ratio).to(ratio.dtype)
    return pg_loss, clipfrac, ppo_kl


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, *, value_clip: float) -> tuple[Tensor, Tensor]:
    """Clipped value loss per token: max((V - R)^2, (V_old + clip(V - V_old, +-value_clip) - R)^2); (loss, clipfrac).

    As in the original there is no 1/2 factor; clipfrac marks |V - V_old| > value_clip.
    """
    _check_same_shape(values=values, old_values=old_values, returns=returns)
    delta = values - old_values
    clipped_values = old_values + delta.clamp(-value_clip, value_clip)
    loss = torch.maximum((values - returns).square(), (clipped_values - returns).square())
    clipfrac = (delta.abs() > value_clip).to(values.dtype)
    return loss, clipfrac


def sft_loss(log_probs: Tensor) -> Tensor:
    """Negative log-likelihood per token."""
    return -log_probs


def entropy_from_logits(logits: Tensor, *, chunk_size: int | None = None) -> Tensor:
    """Entropy of softmax(logits) over the last dim, per row: logsumexp(z) - sum(softmax(z) z).

    `chunk_size` rows at a time bounds the temporary [rows, vocab] buffers (useful under no_grad).
    """
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits need a non-empty vocabulary dimension, got shape {tuple(logits.shape)}")
    if chunk_size is not None and logits.dim() >= 2 and logits.shape[0] > chunk_size:
        return torch.cat([entropy_from_logits(chunk) for chunk in logits.split(chunk_size)])
    log_z = torch.logsumexp(logits, dim=-1)
    probs = torch.softmax(logits, dim=-1)
    return log_z - (probs * logits).sum(dim=-1)


def vanilla_tis(
    args: Any,
    *,
    pg_loss: Tensor,
    train_log_probs: list[Tensor],
    rollout_log_probs: list[Tensor],
    loss_masks: list[Tensor],
    **kwargs: Any,
) -> tuple[Tensor, list[Tensor], dict[str, Tensor]]:
    """Default `--custom-tis-function-path` hook: weight pg_loss by clip(pi_old / pi_rollout, tis_clip_low, tis_clip).

    Same call shape as the original hook (keyword arguments plus `total_lengths`, `response_lengths`);
    returns (weighted pg_loss, loss masks for the pg reducer, per-token metrics): `tis` (raw ratio),
    `tis_weight` (clipped), `tis_clipfrac`, `tis_abs` (|ratio - 1|).
    """
    old = torch.cat(list(train_log_probs)).detach().to(device=pg_loss.device, dtype=pg_loss.dtype)
    rollout = torch.cat(list(rollout_log_probs)).detach().to(device=pg_loss.device, dtype=pg_loss.dtype)
    if old.shape != pg_loss.shape or rollout.shape != pg_loss.shape:
        raise ValueError(
            f"--use-tis: pg_loss has {pg_loss.numel()} tokens but log_probs has {old.numel()}"
            f" and rollout_log_probs {rollout.numel()}"
        )
    ratio = torch.exp(old - rollout)
    weights = ratio.clamp(min=float(getattr(args, "tis_clip_low", 0.0)), max=float(getattr(args, "tis_clip", 2.0)))
    metrics = {
        "tis": ratio,
        "tis_weight": weights,
        "tis_clipfrac": (weights != ratio).to(ratio.dtype),
        "tis_abs": (ratio - 1).abs(),
    }
    return pg_loss * weights, list(loss_masks), metrics


def policy_loss(
    estimator: str,
    log_probs: Tensor,
    old_log_probs: Tensor,
    advantages: Tensor,
    *,
    response_lengths: Sequence[int],
    loss_masks: Sequence[Tensor],
    eps_clip: float,
    eps_clip_high: float,
    eps_clip_c: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The policy loss of `--advantage-estimator`: gspo → GSPO, cispo → CISPO, every other → PPO clip."""
    if estimator == "gspo":
        return gspo_policy_loss(
            log_probs,
            old_log_probs,
            advantages,
            response_lengths=response_lengths,
            loss_masks=loss_masks,
            eps_clip=eps_clip,
            eps_clip_high=eps_clip_high,
            eps_clip_c=eps_clip_c,
        )
    if estimator == "cispo":
        return cispo_policy_loss(log_probs, old_log_probs, advantages, eps_clip=eps_clip, eps_clip_high=eps_clip_high)
    if estimator in ("grpo", "ppo", "reinforce_plus_plus", "reinforce_plus_plus_baseline"):
        return ppo_policy_loss(
            log_probs, old_log_probs, advantages, eps_clip=eps_clip, eps_clip_high=eps_clip_high, eps_clip_c=eps_clip_c
        )
    raise ValueError(f"--advantage-estimator {estimator!r} has no policy loss")
