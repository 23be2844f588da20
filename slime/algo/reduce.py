"""Reductions of flat per-token tensors to one number per micro-batch.

    python -c "import torch; from slime.algo.reduce import sum_of_sample_mean; print(sum_of_sample_mean(torch.ones(5), [2, 3], [torch.ones(2), torch.ones(3)]))"

A micro-batch's per-token quantity `x` is the concatenation of its samples' response tokens
(lengths `response_lengths`). By default each sample contributes the masked mean of its tokens and
the micro-batch contributes the *sum* of those means; with `--calculate-per-token-loss` it
contributes the masked token *sum*. The backend then divides by the global number of samples
(or of loss-masked tokens), so every sample (or token) weighs the same whatever the micro-batching.

Masked tokens (mask 0) never influence the result, even when they hold inf or NaN.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor


def masked(x: Tensor, mask: Tensor) -> Tensor:
    """x * mask, with exact zeros where the mask is 0 (even where x holds inf or NaN)."""
    mask = mask.to(device=x.device, dtype=x.dtype)
    return torch.where(mask != 0, x * mask, 0.0)


def _check_lengths(x: Tensor, response_lengths: Sequence[int], loss_masks: Sequence[Tensor]) -> None:
    if x.dim() != 1:
        raise ValueError(f"expected a flat per-token tensor, got shape {tuple(x.shape)}")
    if len(response_lengths) != len(loss_masks):
        raise ValueError(f"{len(response_lengths)} response_lengths but {len(loss_masks)} loss_masks")
    if sum(response_lengths) != x.numel():
        raise ValueError(f"per-token tensor has {x.numel()} tokens but response_lengths sum to {sum(response_lengths)}")
    for i, (length, mask) in enumerate(zip(response_lengths, loss_masks)):
        if mask.numel() != length:
            raise ValueError(f"loss_masks[{i}] has {mask.numel()} entries but response_lengths[{i}] = {length}")


class SampleSegments:
    """Which sample each token of a flat micro-batch tensor belongs to, so per-sample sums are one kernel.

    A Python loop over samples costs a dozen kernels per sample and per reduction (thousands per micro-batch
    of short GRPO answers); `sums` is one `index_add` whatever the number of samples. On CUDA its float
    additions land in any order (last-bit differences run to run) unless `torch.use_deterministic_algorithms`.
    """

    def __init__(self, response_lengths: Sequence[int], device: torch.device | str) -> None:
        self.count = len(response_lengths)
        ids = torch.repeat_interleave(torch.arange(self.count), torch.as_tensor(list(response_lengths),
                                                                                dtype=torch.long))
        if torch.device(device).type == "cuda":  # pinned + non-blocking: no wait on the queued GPU work
            ids = ids.pin_memory()
        self.ids = ids.to(device, non_blocking=True)

    def sums(self, x: Tensor) -> Tensor:
        """[num_samples] sums of the flat per-token `x` over each sample's tokens (differentiable)."""
        return x.new_zeros(self.count).index_add(0, self.ids, x)

    def broadcast(self, per_sample: Tensor) -> Tensor:
        """A [num_samples] tensor spread back over the flat tokens."""
        return per_sample.index_select(0, self.ids)


def concat_samples(tensors: Sequence[Tensor], device: torch.device) -> Tensor:
    """Per-sample tensors flattened into one on `device` (each moved only if it lives elsewhere); non-empty."""
    parts = [torch.as_tensor(t).reshape(-1) for t in tensors]
    if any(part.device != device for part in parts):
        parts = [part.to(device) for part in parts]
    return torch.cat(parts)


def flat_mask(loss_masks: Sequence[Tensor], like: Tensor) -> Tensor:
    """The per-sample masks concatenated, on `like`'s device and dtype."""
    if not loss_masks:
        return like.new_zeros(0)
    return concat_samples(loss_masks, like.device).to(like.dtype)


def reduce_by_sample(x: Tensor, mask: Tensor, segments: SampleSegments, *, per_token: bool = False,
                     denominators: Tensor | None = None) -> Tensor:
    """`sum_of_sample_mean` over flat tensors: `mask` is the flat numerator mask, `denominators` each sample's
    normaliser (default: its number of masked-in tokens, at least 1)."""
    masked_x = masked(x, mask)
    if per_token:
        return masked_x.sum()
    if denominators is None:
        denominators = segments.sums(mask.to(x.dtype)).clamp_min(1)
    return (segments.sums(masked_x) / denominators).sum()


def sum_of_sample_mean(
    x: Tensor,
    response_lengths: Sequence[int],
    loss_masks: Sequence[Tensor],
    *,
    per_token: bool = False,
    normalizer_masks: Sequence[Tensor] | None = None,
) -> Tensor:
    """Sum over samples of the masked per-sample mean of `x` (or the masked token sum if `per_token`).

    `normalizer_masks` (default: `loss_masks`) gives the per-sample denominators; TIS hooks that
    reject tokens shrink the numerator mask but keep the original denominators.
    """
    _check_lengths(x, response_lengths, loss_masks)
    segments = SampleSegments(response_lengths, x.device)
    mask = flat_mask(loss_masks, x)
    denominators = None
    if normalizer_masks is not None and normalizer_masks is not loss_masks:
        _check_lengths(x, response_lengths, normalizer_masks)
        denominators = segments.sums(flat_mask(normalizer_masks, x)).clamp_min(1)
    return reduce_by_sample(x, mask, segments, per_token=per_token, denominators=denominators)


def get_sum_of_sample_mean(
    total_lengths: Sequence[int],
    response_lengths: Sequence[int],
    loss_masks: Sequence[Tensor],
    calculate_per_token_loss: bool = False,
) -> Callable[[Tensor], Tensor]:
    """Reducer factory with the original signature; custom loss and pg-loss-reducer plugins receive its result.

    `total_lengths` (prompt + response) is accepted for signature compatibility; without context
    parallelism the reduction needs only the response lengths.
    """
    if len(total_lengths) != len(response_lengths):
        raise ValueError(f"{len(total_lengths)} total_lengths but {len(response_lengths)} response_lengths")
    lengths = list(response_lengths)
    masks = list(loss_masks)

    def reduce(x: Tensor) -> Tensor:
        return sum_of_sample_mean(x, lengths, masks, per_token=calculate_per_token_loss)

    return reduce
