"""Flag-driven entry points: rewards → advantages → loss, dispatched from the parsed args.

    from slime.algo.rl_loss import compute_advantages_from_args, compute_rl_loss
    compute_advantages_from_args(args, rollout_data)              # once per rollout, per rank
    loss, metrics = compute_rl_loss(args, micro_batch, log_probs=lp, entropy=ent)

This is the only args-aware module of `slime.algo` (attribute names are the flag names with
underscores, dests as in `slime/utils/arguments/algorithm.py`). `batch` holds per-sample lists of
1-D tensors over response tokens: `log_probs` (old policy), `ref_log_probs`, `rollout_log_probs`,
`values`, `returns`, `advantages`, `loss_masks` (float), plus `rewards` ([B] or list),
`response_lengths`, `total_lengths`.

Loss contract: `compute_rl_loss` returns the *sum over this micro-batch's samples of each sample's
masked token mean* (with `--calculate-per-token-loss`: the masked *token sum*). The backend divides
by the global number of samples in the optimizer step (or the global number of loss-masked tokens)
before backward, so gradient accumulation over micro-batches and ranks gives a plain mean.
Every metric in the returned dict is reduced the same way (divide it by the same count), except the
keys listed in `EXTREMUM_METRICS`, which are a plain min / max over this micro-batch's loss-masked
tokens and must be combined with min / max.

Who normalises rewards: the rollout side calls `normalize_rewards_from_args` (group mean/std, see
`slime.algo.advantages`); `compute_advantages_from_args` only turns those rewards into per-token
advantages and (`--normalize-advantages`) whitens them over all data-parallel ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable

import torch
from torch import Tensor

from slime.algo.advantages import (
    compute_advantages_and_returns,
    group_normalize_rewards_for,
    kl_penalty,
    normalize_advantages,
)
from slime.algo.kl import compute_approx_kl
from slime.algo.losses import policy_loss, sft_loss, value_loss, vanilla_tis
from slime.algo.reduce import SampleSegments, concat_samples, flat_mask, reduce_by_sample
from slime.utils.plugins import load_function

EXTREMUM_METRICS = {"tis_min": "min", "tis_max": "max"}


def _flag(args: Any, name: str, default: Any) -> Any:
    value = getattr(args, name, default)
    return default if value is None and default is not None else value


def normalize_rewards_from_args(args: Any, rewards: list[float] | Tensor) -> list[float]:
    """Rollout-side group normalisation for `--advantage-estimator` (groups of `--n-samples-per-prompt`)."""
    normalized = group_normalize_rewards_for(
        _flag(args, "advantage_estimator", "grpo"),
        torch.as_tensor(rewards, dtype=torch.float32),
        int(_flag(args, "n_samples_per_prompt", 1)),
        rewards_normalization=bool(_flag(args, "rewards_normalization", True)),
        grpo_std_normalization=bool(_flag(args, "grpo_std_normalization", True)),
    )
    return normalized.tolist()


def _as_float_masks(masks: list[Any]) -> list[Tensor]:
    return [torch.as_tensor(m, dtype=torch.float32) if not torch.is_tensor(m) else m for m in masks]


def compute_advantages_from_args(args: Any, batch: dict, *, group: Any = None) -> None:
    """Fill `batch["advantages"]` and `batch["returns"]` (and `batch["kl"]`) for this rank's samples.

    Honours `--advantage-estimator`, `--kl-coef` / `--kl-loss-type` (reward shaping),
    `--gamma`, `--lambd`, `--use-rollout-logprobs`, `--custom-advantage-function-path`
    (original signature `fn(args, rollout_data)`, which must set both keys),
    `--normalize-advantages` (whitened over `group`, default the world group when distributed;
    every rank must call) and `--disable-compute-advantages-and-returns` (does nothing).
    `batch["loss_masks"]` given as lists of ints are replaced by float tensors.
    """
    if not _flag(args, "compute_advantages_and_returns", True):
        return
    if "loss_masks" not in batch or "rewards" not in batch:
        raise ValueError("compute_advantages_from_args needs batch['loss_masks'] and batch['rewards']")
    loss_masks = batch["loss_masks"] = _as_float_masks(batch["loss_masks"])
    use_rollout = bool(_flag(args, "use_rollout_logprobs", False))
    log_probs = batch.get("rollout_log_probs") if use_rollout else batch.get("log_probs")
    if use_rollout and log_probs is None:
        raise ValueError("--use-rollout-logprobs needs rollout log-probs (batch['rollout_log_probs'])")
    kl_coef = float(_flag(args, "kl_coef", 0.0))
    kl_type = _flag(args, "kl_loss_type", "k1")
    ref_log_probs = batch.get("ref_log_probs")
    if kl_coef != 0 and (log_probs is None or ref_log_probs is None):
        raise ValueError(
            "--kl-coef != 0 needs old and reference log-probs (batch['log_probs'], batch['ref_log_probs'])"
        )
    if kl_coef != 0:
        batch["kl"] = kl_penalty(log_probs, ref_log_probs, loss_masks, kl_type=kl_type)
    else:
        batch["kl"] = [torch.zeros_like(m) for m in loss_masks]

    custom_path = _flag(args, "custom_advantage_function_path", None)
    if custom_path:
        fn = load_function(custom_path, flag="--custom-advantage-function-path")
        fn(args, batch)
        if "advantages" not in batch or "returns" not in batch:
            raise ValueError(
                f"--custom-advantage-function-path {custom_path} must set rollout_data['advantages'] and ['returns']"
            )
        advantages, returns = list(batch["advantages"]), list(batch["returns"])
    else:
        rewards = batch["rewards"]
        rewards = rewards if torch.is_tensor(rewards) else torch.as_tensor(rewards, dtype=torch.float32)
        advantages, returns = compute_advantages_and_returns(
            _flag(args, "advantage_estimator", "grpo"),
            rewards=rewards,
            loss_masks=loss_masks,
            log_probs=log_probs,
            ref_log_probs=ref_log_probs,
            values=batch.get("values"),
            kl_coef=kl_coef,
            kl_type=kl_type,
            gamma=float(_flag(args, "gamma", 1.0)),
            lambd=float(_flag(args, "lambd", 1.0)),
        )
    if _flag(args, "normalize_advantages", False):
        advantages = normalize_advantages(advantages, loss_masks, group)
    batch["advantages"] = advantages
    batch["returns"] = returns


@dataclass
class _MicroBatch:
    """Shapes and masks of one micro-batch; `flat` concatenates per-sample tensors with masked positions zeroed.

    The flat mask, the token-to-sample map and the per-sample denominators are built once per micro-batch
    and shared by every reduction (loss and metrics).
    """

    response_lengths: list[int]
    total_lengths: list[int]
    loss_masks: list[Tensor]
    per_token: bool
    device: torch.device

    @cached_property
    def segments(self) -> SampleSegments:
        return SampleSegments(self.response_lengths, self.device)

    @cached_property
    def mask(self) -> Tensor:
        return flat_mask(self.loss_masks, torch.zeros(0, device=self.device))

    @cached_property
    def valid(self) -> Tensor:
        return self.mask != 0

    @cached_property
    def denominators(self) -> Tensor:
        return self.segments.sums(self.mask).clamp_min(1)

    def flat(self, tensors: list[Tensor], name: str, dtype: torch.dtype | None = None) -> Tensor:
        if len(tensors) != len(self.response_lengths):
            raise ValueError(f"{name} has {len(tensors)} samples but the micro-batch has {len(self.response_lengths)}")
        for i, (x, n) in enumerate(zip(tensors, self.response_lengths)):
            if torch.as_tensor(x).numel() != n:
                raise ValueError(f"{name}[{i}] has {torch.as_tensor(x).numel()} tokens but response_lengths[{i}] = {n}")
        if not tensors:
            return torch.zeros(0, device=self.device, dtype=dtype or torch.float32)
        out = concat_samples(tensors, self.device)
        out = out if dtype is None else out.to(dtype)
        return torch.where(self.valid, out, 0.0)

    def split(self, flat: Tensor) -> list[Tensor]:
        return list(flat.split(self.response_lengths))

    def reduce(self, x: Tensor, masks: list[Tensor] | None = None) -> Tensor:
        """Sum of per-sample masked means (per token: masked sum); `masks` narrows the numerator only."""
        mask = self.mask if masks is None or masks is self.loss_masks else flat_mask(masks, self.mask)
        if mask.numel() != x.numel():
            raise ValueError(f"{x.numel()} per-token values but the masks cover {mask.numel()} tokens")
        return reduce_by_sample(x, mask, self.segments, per_token=self.per_token,
                                denominators=self.denominators.to(x.dtype))


def _required(batch: dict, key: str, flag: str) -> list[Tensor]:
    value = batch.get(key)
    if value is None:
        raise ValueError(f"{flag} needs batch[{key!r}], which this micro-batch lacks")
    return value


def _load_hook(args: Any, name: str, flag: str, default: Callable[..., Any] | None) -> Callable[..., Any] | None:
    path = _flag(args, name, None)
    return load_function(path, flag=flag) if path else default


def _keep_graph(loss: Tensor, x: Tensor) -> Tensor:
    """An empty micro-batch still returns a loss connected to the model's outputs."""
    return loss + 0.0 * x.sum() if x.numel() == 0 else loss


def compute_rl_loss(
    args: Any,
    batch: dict,
    *,
    log_probs: list[Tensor] | None,
    entropy: list[Tensor] | None,
    values: list[Tensor] | None = None,
    group: Any = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Loss of one micro-batch (see the module docstring for its scale) and detached scalar metrics.

    `log_probs` / `entropy` / `values` are the current model's per-sample outputs (with grad).
    `--loss-type sft_loss` → NLL; `policy_loss` → the policy loss of `--advantage-estimator`
    (ppo-clip for grpo/ppo/reinforce*, gspo, cispo) with TIS, entropy bonus and KL loss. With
    `values` the clipped value loss is added (critic: pass `log_probs=None` for the value loss alone).
    `custom_loss` takes logits, so the backend calls that plugin itself. `group` is reserved for
    context-parallel reductions and unused with plain data parallelism.
    Every per-token input is zeroed at loss-masked positions before any arithmetic, so those
    positions may hold anything (inf and NaN included) without changing the loss or its gradient.
    """
    loss_type = _flag(args, "loss_type", "policy_loss")
    if loss_type == "custom_loss":
        raise ValueError("--loss-type custom_loss is run by the backend (the plugin takes logits), not compute_rl_loss")
    if loss_type not in ("policy_loss", "sft_loss", "value_loss"):
        raise ValueError(f"--loss-type must be policy_loss, sft_loss or custom_loss, got {loss_type!r}")
    if log_probs is None and values is None:
        raise ValueError("compute_rl_loss needs log_probs (actor) or values (critic)")
    outputs = log_probs if log_probs is not None else values
    response_lengths = [int(n) for n in batch["response_lengths"]]
    mb = _MicroBatch(
        response_lengths=response_lengths,
        total_lengths=[int(n) for n in batch.get("total_lengths", response_lengths)],
        loss_masks=_as_float_masks(batch["loss_masks"]),
        per_token=bool(_flag(args, "calculate_per_token_loss", False)),
        device=outputs[0].device if outputs else torch.device("cpu"),
    )
    if len(mb.loss_masks) != len(response_lengths):
        raise ValueError(f"{len(mb.loss_masks)} loss_masks but {len(response_lengths)} response_lengths")

    metrics: dict[str, Tensor] = {}
    loss: Tensor | None = None
    if log_probs is not None and loss_type == "sft_loss":
        flat = mb.flat(log_probs, "log_probs")
        loss = _keep_graph(mb.reduce(sft_loss(flat)), flat)
    elif log_probs is not None and loss_type != "value_loss":
        loss = _policy_loss(args, batch, mb, log_probs, entropy, metrics)
    if values is not None:
        v_loss = _value_loss(args, batch, mb, values, metrics)
        loss = v_loss if loss is None else loss + v_loss
    elif loss_type == "value_loss":
        raise ValueError("--loss-type value_loss needs the critic's values")
    assert loss is not None
    metrics["loss"] = loss.detach().clone()
    return loss, metrics


def _value_loss(args: Any, batch: dict, mb: _MicroBatch, values: list[Tensor], metrics: dict) -> Tensor:
    new = mb.flat(values, "values")
    old = mb.flat(_required(batch, "values", "the value loss"), "batch['values']", new.dtype).detach()
    returns = mb.flat(_required(batch, "returns", "the value loss"), "batch['returns']", new.dtype).detach()
    per_token, clipfrac = value_loss(new, old, returns, value_clip=float(_flag(args, "value_clip", 0.2)))
    loss = _keep_graph(mb.reduce(per_token), new)
    metrics["value_loss"] = loss.detach().clone()
    metrics["value_clipfrac"] = mb.reduce(clipfrac).detach()
    return loss


def _policy_loss(
    args: Any,
    batch: dict,
    mb: _MicroBatch,
    log_probs: list[Tensor],
    entropy: list[Tensor] | None,
    metrics: dict[str, Tensor],
) -> Tensor:
    new = mb.flat(log_probs, "log_probs")
    dtype = new.dtype
    if _flag(args, "use_rollout_logprobs", False):
        old = mb.flat(_required(batch, "rollout_log_probs", "--use-rollout-logprobs"), "rollout_log_probs", dtype)
    elif batch.get("log_probs"):
        old = mb.flat(batch["log_probs"], "batch['log_probs']", dtype)
    else:
        old = new
    old = old.detach()
    advantages = mb.flat(_required(batch, "advantages", "the policy loss"), "advantages", dtype).detach()

    eps_clip = float(_flag(args, "eps_clip", 0.2))
    pg_loss, clipfrac, ppo_kl = policy_loss(
        _flag(args, "advantage_estimator", "grpo"),
        new,
        old,
        advantages,
        response_lengths=mb.response_lengths,
        loss_masks=mb.loss_masks,
        eps_clip=eps_clip,
        eps_clip_high=float(_flag(args, "eps_clip_high", eps_clip)),
        eps_clip_c=_flag(args, "eps_clip_c", None),
    )

    pg_masks = mb.loss_masks
    use_tis = bool(_flag(args, "use_tis", False))
    tis_metrics: dict[str, Tensor] = {}
    if use_tis or _flag(args, "get_mismatch_metrics", False):
        rollout_list = _required(batch, "rollout_log_probs", "--use-tis / --get-mismatch-metrics")
        rollout = mb.flat(rollout_list, "rollout_log_probs", dtype)
        train = mb.flat(batch["log_probs"], "batch['log_probs']", dtype) if batch.get("log_probs") else new.detach()
        tis_fn = _load_hook(args, "custom_tis_function_path", "--custom-tis-function-path", vanilla_tis)
        weighted, modified_masks, tis_metrics = tis_fn(
            args=args,
            pg_loss=pg_loss,
            train_log_probs=mb.split(train),
            rollout_log_probs=mb.split(rollout),
            loss_masks=mb.loss_masks,
            total_lengths=mb.total_lengths,
            response_lengths=mb.response_lengths,
        )
        if use_tis:  # --get-mismatch-metrics alone only reports
            pg_loss, pg_masks = weighted, _as_float_masks(list(modified_masks))

    reducer_factory = _load_hook(
        args, "custom_pg_loss_reducer_function_path", "--custom-pg-loss-reducer-function-path", None
    )
    if reducer_factory is not None:
        pg_value = reducer_factory(mb.total_lengths, mb.response_lengths, pg_masks, mb.per_token)(pg_loss)
    else:
        pg_value = mb.reduce(pg_loss, pg_masks)

    loss = pg_value
    metrics["pg_loss"] = pg_value.detach().clone()
    metrics["pg_clipfrac"] = mb.reduce(clipfrac).detach()
    metrics["ppo_kl"] = mb.reduce(ppo_kl.detach())

    entropy_coef = float(_flag(args, "entropy_coef", 0.0))
    if entropy is not None:
        entropy_loss = mb.reduce(mb.flat(entropy, "entropy", dtype))
        loss = loss - entropy_coef * entropy_loss
        metrics["entropy_loss"] = entropy_loss.detach().clone()
    elif entropy_coef != 0:
        raise ValueError("--entropy-coef != 0 needs the per-token entropy of the current policy")

    if _flag(args, "use_kl_loss", False):
        ref = mb.flat(_required(batch, "ref_log_probs", "--use-kl-loss"), "ref_log_probs", dtype).detach()
        kl_loss_coef = float(_flag(args, "kl_loss_coef", 0.0))
        kl_input = new if kl_loss_coef != 0 else new.detach()
        ratio = torch.exp(kl_input - old) if _flag(args, "use_unbiased_kl", False) else None
        kl = compute_approx_kl(kl_input, ref, _flag(args, "kl_loss_type", "k1"), importance_ratio=ratio)
        kl_loss = mb.reduce(kl.to(dtype))
        if kl_loss_coef != 0:
            loss = loss + kl_loss_coef * kl_loss
        metrics["kl_loss"] = kl_loss.detach().clone()

    if use_tis or _flag(args, "get_mismatch_metrics", False):
        metrics["ois"] = mb.reduce(torch.exp(-ppo_kl.detach()))  # current / old policy ratio
    for key, value in tis_metrics.items():
        metrics[key] = mb.reduce(value.detach().to(device=mb.device, dtype=dtype))
    if "tis" in tis_metrics:
        ratios = tis_metrics["tis"].detach().to(mb.device)[mb.valid]
        if ratios.numel():
            metrics["tis_min"] = ratios.min()
            metrics["tis_max"] = ratios.max()
    return _keep_graph(loss, new)
