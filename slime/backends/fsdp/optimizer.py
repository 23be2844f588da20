"""AdamW over the trainable parameters and the Megatron-style learning-rate schedule.

    from slime.backends.fsdp.optimizer import build_optimizer, LRSchedule, lr_at_step

Schedule (step = optimizer steps already taken): linear warmup from 0 to `--lr` over the warmup
steps (`--lr-warmup-iters`, or `--lr-warmup-fraction` of the decay steps), then `--lr-decay-style`
constant | linear | cosine from `--lr` down to `--min-lr` at the last step, `--min-lr` after it.
Weight decay applies to matrices only (biases and norm scales are not decayed).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Iterable

import torch

logger = logging.getLogger(__name__)

DECAY_STYLES = ("constant", "linear", "cosine")


def lr_at_step(step: int, *, max_lr: float, min_lr: float, warmup_steps: int, decay_steps: int, style: str) -> float:
    if style not in DECAY_STYLES:
        raise ValueError(f"--lr-decay-style {style!r} is not supported; choose one of {DECAY_STYLES}")
    if warmup_steps > 0 and step <= warmup_steps:
        return max_lr * step / warmup_steps
    if style == "constant":
        return max_lr
    if step > decay_steps:
        return min_lr
    span = decay_steps - warmup_steps
    ratio = (step - warmup_steps) / span if span > 0 else 1.0
    coeff = 1.0 - ratio if style == "linear" else 0.5 * (math.cos(math.pi * ratio) + 1.0)
    return min_lr + coeff * (max_lr - min_lr)


def total_train_steps(args) -> int | None:
    """Optimizer steps over the whole run: rollouts x steps per rollout (or --lr-decay-iters when set);
    None when the run length is not known yet (--num-epoch before the data is loaded)."""
    explicit = getattr(args, "lr_decay_iters", None)
    if explicit:
        return int(explicit)
    num_rollout = getattr(args, "num_rollout", None)
    if num_rollout is None:
        return None
    return max(1, int(num_rollout) * steps_per_rollout(args))


def steps_per_rollout(args) -> int:
    """Optimizer steps per rollout, from --num-steps-per-rollout or samples / --global-batch-size."""
    explicit = getattr(args, "num_steps_per_rollout", None)
    if explicit:
        return int(explicit)
    samples = int(args.rollout_batch_size) * int(getattr(args, "n_samples_per_prompt", 1) or 1)
    gbs = getattr(args, "global_batch_size", None) or samples
    if samples % gbs:
        raise ValueError(f"--global-batch-size {gbs} must divide --rollout-batch-size x --n-samples-per-prompt "
                         f"= {samples}")
    return samples // gbs


class LRSchedule:
    """Sets every param group's lr from the step count; state is just the step count."""

    def __init__(self, optimizer: torch.optim.Optimizer, args) -> None:
        self.optimizer = optimizer
        self.max_lr = float(args.lr)
        self.min_lr = float(getattr(args, "min_lr", 0.0) or 0.0)
        self.style = getattr(args, "lr_decay_style", None) or "constant"
        total = total_train_steps(args)
        if total is None and self.style != "constant":
            logger.warning("--lr-decay-style %s: the number of training steps is unknown (no --num-rollout or "
                           "--lr-decay-iters when the trainer starts); the lr stays at --lr after warmup", self.style)
            self.style = "constant"
        self.decay_steps = total or 1
        warmup_iters = getattr(args, "lr_warmup_iters", 0) or 0
        warmup_fraction = getattr(args, "lr_warmup_fraction", None)
        if warmup_fraction is not None and warmup_iters:
            raise ValueError("set only one of --lr-warmup-iters and --lr-warmup-fraction")
        if warmup_fraction is not None and not 0.0 <= warmup_fraction <= 1.0:
            raise ValueError(f"--lr-warmup-fraction must be in [0, 1], got {warmup_fraction}")
        self.warmup_steps = int(warmup_fraction * self.decay_steps) if warmup_fraction is not None else int(warmup_iters)
        if self.min_lr > self.max_lr:
            raise ValueError(f"--min-lr {self.min_lr} is larger than --lr {self.max_lr}")
        self.num_steps = 0
        self._apply()

    def get_lr(self) -> float:
        return lr_at_step(self.num_steps, max_lr=self.max_lr, min_lr=self.min_lr, warmup_steps=self.warmup_steps,
                          decay_steps=self.decay_steps, style=self.style)

    def _apply(self) -> None:
        lr = self.get_lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self) -> None:
        self.num_steps += 1
        self._apply()

    def state_dict(self) -> dict[str, Any]:
        return {"num_steps": self.num_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.num_steps = int(state["num_steps"])
        self._apply()


def build_optimizer(named_params: Iterable[tuple[str, torch.nn.Parameter]], args) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for _, p in named_params:
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError("no trainable parameters: --only-train-params-name-list / --freeze-params-name-list "
                         "froze everything")
    groups = [g for g in ({"params": decay, "weight_decay": float(getattr(args, "weight_decay", 0.0) or 0.0)},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    on_gpu = str(getattr(args, "device", "cpu")) == "cuda"
    return torch.optim.AdamW(
        groups, lr=float(args.lr), betas=(float(args.adam_beta1), float(args.adam_beta2)), eps=float(args.adam_eps),
        fused=on_gpu or None, foreach=None if on_gpu else False,  # one fused kernel per group on GPU (DTensors too)
    )


def reset_optimizer_states(optimizer: torch.optim.Optimizer) -> None:
    """--reset-optimizer-states: forget Adam moments and step counts (before each rollout's training)."""
    optimizer.state.clear()
