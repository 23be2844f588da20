"""Batched token sampling: temperature, top-k, top-p, min-p, per-request seeds, greedy, log-probs.

    from slime.engine.sampler import Sampler, SamplingTensors
    token_ids, logprobs = Sampler()(logits, SamplingTensors.build(params, seeds, positions, device))

Log-probs are `log_softmax(logits / T)` at the chosen token, before any top-k/top-p/min-p truncation
(T = 1 for greedy) — what the trainer recomputes. Sampling is a Gumbel race whose noise is a
counter-based hash of (seed, output position, vocab index): each row depends only on its own logits,
seed and position, so the same seed gives the same tokens whatever else is in the batch (and after a
preemption), and nothing here needs a host sync.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slime.engine.sampling_params import SamplingParams

_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """(x * constant) mod 2**32 for x in [0, 2**32), without int64 overflow."""
    lo, hi = constant & 0xFFFF, constant >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit avalanche hash (murmur3 finaliser constants) on int64 tensors holding uint32 values."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def row_hashes(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Per-row uint32 (held in int64) hash of (seed, output position): the row term of `uniform_noise`."""
    seeds = seeds.to(torch.int64)
    row = _mix32((seeds & _MASK32) ^ 0x9E3779B9)
    row = _mix32(row ^ ((seeds >> 32) & _MASK32))
    return _mix32(row ^ (positions.to(torch.int64) & _MASK32))


def uniform_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """U(0,1) noise [rows, vocab], a pure function of (seed, position, vocab index).

    Bits: h = mix(mix(row_hash ^ index) ^ 0x27D4EB2F); u = (h >> 8 + 0.5) / 2**24. GPU kernels that
    sample must reproduce exactly this so both paths pick the same tokens for a seed."""
    row = row_hashes(seeds, positions)
    vocab = torch.arange(vocab_size, device=seeds.device, dtype=torch.int64)
    h = _mix32(_mix32(row[:, None] ^ vocab[None, :]) ^ 0x27D4EB2F)
    return ((h >> 8).to(torch.float32) + 0.5) / float(1 << 24)


@dataclass
class SamplingTensors:
    temperatures: torch.Tensor  # [rows] float32, 1.0 where greedy
    greedy: torch.Tensor  # [rows] bool
    top_k: torch.Tensor  # [rows] int64, vocab size where off
    top_p: torch.Tensor  # [rows] float32
    min_p: torch.Tensor  # [rows] float32
    seeds: torch.Tensor  # [rows] int64
    positions: torch.Tensor  # [rows] int64 index of the token being sampled within the output
    all_greedy: bool
    needs_top_k: bool
    needs_top_p: bool
    needs_min_p: bool

    @classmethod
    def build(cls, params: list[SamplingParams], seeds: list[int], positions: list[int], vocab_size: int,
              device: torch.device | str) -> "SamplingTensors":
        greedy = [p.is_greedy for p in params]
        top_k = [vocab_size if p.top_k == -1 else min(p.top_k, vocab_size) for p in params]

        on_gpu = torch.device(device).type == "cuda"

        def tensor(values: list, dtype: torch.dtype) -> torch.Tensor:
            if on_gpu:  # pinned staging + async copy: building overlaps a decode step already on the GPU
                return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)
            return torch.tensor(values, dtype=dtype, device=device)

        return cls(
            temperatures=tensor([1.0 if g else p.temperature for p, g in zip(params, greedy)], torch.float32),
            greedy=tensor(greedy, torch.bool), top_k=tensor(top_k, torch.int64),
            top_p=tensor([p.top_p for p in params], torch.float32), min_p=tensor([p.min_p for p in params], torch.float32),
            seeds=tensor([s & ((1 << 63) - 1) for s in seeds], torch.int64), positions=tensor(positions, torch.int64),
            all_greedy=all(greedy),
            needs_top_k=any(k < vocab_size and not g for k, g in zip(top_k, greedy)),
            needs_top_p=any(p.top_p < 1.0 and not g for p, g in zip(params, greedy)),
            needs_min_p=any(p.min_p > 0.0 and not g for p, g in zip(params, greedy)),
        )


class Sampler:
    def __init__(self, fused_gpu_sampling: bool = False) -> None:
        self.fused_gpu_sampling = fused_gpu_sampling  # Triton one-pass kernel for batches without truncation

    def __call__(self, logits: torch.Tensor, t: SamplingTensors) -> tuple[torch.Tensor, torch.Tensor]:
        """logits [rows, vocab] float32 -> (token ids [rows] int64, log-probs [rows] float32)."""
        if self.fused_gpu_sampling and not (t.needs_top_k or t.needs_top_p or t.needs_min_p):
            from slime.engine.kernels.sampling import gumbel_sample

            return gumbel_sample(logits.contiguous(), t.temperatures, t.greedy, t.seeds, t.positions)
        logits = logits.float()
        logprobs = torch.log_softmax(logits / t.temperatures[:, None], dim=-1)
        greedy_tokens = logits.argmax(dim=-1)
        if t.all_greedy:
            tokens = greedy_tokens
        else:
            truncated = self._truncate(logprobs, t)
            gumbel = -torch.log(-torch.log(uniform_noise(t.seeds, t.positions, logits.shape[-1])))
            sampled = (truncated + gumbel).argmax(dim=-1)
            tokens = torch.where(t.greedy, greedy_tokens, sampled)
        return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)

    @staticmethod
    def _truncate(logprobs: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
        """Log-probs with tokens outside top-k / top-p / min-p set to -inf (the argmax always survives)."""
        if not (t.needs_top_k or t.needs_top_p or t.needs_min_p):
            return logprobs
        sorted_logprobs, order = logprobs.sort(dim=-1, descending=True)
        sorted_probs = sorted_logprobs.exp()
        ranks = torch.arange(logprobs.shape[-1], device=logprobs.device)[None, :]
        remove = torch.zeros_like(sorted_logprobs, dtype=torch.bool)
        if t.needs_top_k:
            remove |= ranks >= t.top_k[:, None]
        if t.needs_top_p:
            mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
            remove |= mass_before > t.top_p[:, None]
        if t.needs_min_p:
            remove |= sorted_probs < t.min_p[:, None] * sorted_probs[:, :1]
        remove[:, 0] = False
        sorted_logprobs = sorted_logprobs.masked_fill(remove, float("-inf"))
        return torch.empty_like(logprobs).scatter_(-1, order, sorted_logprobs)
