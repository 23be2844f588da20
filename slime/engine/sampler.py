"""Batched token sampling: temperature, top-k, top-p, min-p, per-request seeds, greedy, log-probs.

    from slime.engine.sampler import Sampler, SamplingTensors
    token_ids, logprobs = Sampler()(logits, SamplingTensors.build(params, seeds, positions, device))

Log-probs are `log_softmax(logits / T)` at the chosen token, before any top-k/top-p/min-p truncation
(T = 1 for greedy) — what the trainer recomputes. Sampling is a Gumbel race whose noise is a
counter-based hash of (seed, output position, vocab index): each row depends only on its own logits,
seed and position, so the same seed gives the same tokens whatever else is in the batch (and after a
preemption), and nothing here needs a host sync.

`min_new_tokens`: rows still short of it carry their stop ids (EOS ids + `stop_token_ids`) in
`suppressed_ids` with a -inf `suppressed_bias` ([rows, K], padded with bias 0); both sampling paths
add that to the logits first (one scatter on the device), so log-probs are those of the masked
distribution, as SGLang reports them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from slime.engine.sampling_params import SamplingParams

_MASK32 = 0xFFFFFFFF


def _int32_bits(value: int) -> int:
    """The int32 whose bits are the uint32 `value` (torch has no uint32 shifts on CPU)."""
    return value - (1 << 32) if value >= 1 << 31 else value


_M1, _M2 = _int32_bits(0x85EBCA6B), _int32_bits(0xC2B2AE35)
_ROW_SALT, _INDEX_SALT = _int32_bits(0x9E3779B9), _int32_bits(0x27D4EB2F)
# (2**24 - 1 + 0.5) / 2**24 rounds to 1.0 in float32, and -log(-log(1.0)) is +inf: one token in 2**24 would win
# the Gumbel race whatever its logit (0.9% of all sampled tokens over a 151k vocabulary). u stops just below 1.
UNIFORM_MAX = 1.0 - 2.0 ** -24


def _uint32_as_int32(x: torch.Tensor) -> torch.Tensor:
    """int64 tensor of uint32 values -> int32 tensor of the same bits."""
    return torch.where(x >= 1 << 31, x - (1 << 32), x).to(torch.int32)


def _mix32_(x: torch.Tensor) -> torch.Tensor:
    """In place: the murmur3 finaliser on an int32 tensor holding uint32 bits (multiplication wraps mod 2**32;
    each right shift is masked to be logical)."""
    x ^= (x >> 16) & 0xFFFF
    x *= _M1
    x ^= (x >> 13) & 0x7FFFF
    x *= _M2
    x ^= (x >> 16) & 0xFFFF
    return x


def _row_hashes_int32(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    seeds = seeds.to(torch.int64)
    row = _mix32_(_uint32_as_int32(seeds & _MASK32) ^ _ROW_SALT)
    row = _mix32_(row ^ _uint32_as_int32((seeds >> 32) & _MASK32))
    return _mix32_(row ^ _uint32_as_int32(positions.to(torch.int64) & _MASK32))


def row_hashes(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Per-row uint32 (held in int64) hash of (seed, output position): the row term of `uniform_noise`."""
    return _row_hashes_int32(seeds, positions).to(torch.int64) & _MASK32


def uniform_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """U(0,1) noise [rows, vocab], a pure function of (seed, position, vocab index).

    Bits: h = mix(mix(row_hash ^ index) ^ 0x27D4EB2F); u = min((h >> 8 + 0.5) / 2**24, UNIFORM_MAX) in float32,
    with `mix` the murmur3 finaliser on uint32. GPU kernels that sample must reproduce exactly this so both paths
    pick the same tokens for a seed. Computed in place on int32 bits: several times faster than emulating uint32
    in int64."""
    vocab = torch.arange(vocab_size, device=seeds.device, dtype=torch.int32)
    h = _row_hashes_int32(seeds, positions)[:, None] ^ vocab[None, :]
    _mix32_(h)
    h ^= _INDEX_SALT
    _mix32_(h)
    return ((h >> 8) & 0xFFFFFF).to(torch.float32).add_(0.5).div_(float(1 << 24)).clamp_(max=UNIFORM_MAX)


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
    suppressed_ids: torch.Tensor | None = None  # [rows, K] int64: stop ids masked until min_new_tokens
    suppressed_bias: torch.Tensor | None = None  # [rows, K] float32: -inf where masked, 0 for padding

    @classmethod
    def build(cls, params: list[SamplingParams], seeds: list[int], positions: list[int], vocab_size: int,
              device: torch.device | str, eos_token_ids: Sequence[int] = ()) -> "SamplingTensors":
        greedy = [p.is_greedy for p in params]
        top_k = [vocab_size if p.top_k == -1 else min(p.top_k, vocab_size) for p in params]

        on_gpu = torch.device(device).type == "cuda"

        def tensor(values: list, dtype: torch.dtype) -> torch.Tensor:
            if on_gpu:  # pinned staging + async copy: building overlaps a decode step already on the GPU
                return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)
            return torch.tensor(values, dtype=dtype, device=device)

        suppressed = [sorted(i for i in set(eos_token_ids) | set(p.stop_token_ids) if i < vocab_size)
                      if pos < p.min_new_tokens else [] for p, pos in zip(params, positions)]
        width = max((len(ids) for ids in suppressed), default=0)
        suppressed_ids = suppressed_bias = None
        if width:
            suppressed_ids = tensor([ids + [0] * (width - len(ids)) for ids in suppressed], torch.int64)
            suppressed_bias = tensor([[float("-inf")] * len(ids) + [0.0] * (width - len(ids)) for ids in suppressed],
                                     torch.float32)
        # two host-to-device copies per step: the float fields in one tensor, the integer fields in another
        floats = tensor([[1.0 if g else p.temperature for p, g in zip(params, greedy)], [p.top_p for p in params],
                         [p.min_p for p in params]], torch.float32)
        ints = tensor([greedy, top_k, [s & ((1 << 63) - 1) for s in seeds], positions], torch.int64)
        return cls(
            temperatures=floats[0], greedy=ints[0] != 0, top_k=ints[1], top_p=floats[1], min_p=floats[2],
            seeds=ints[2], positions=ints[3],
            all_greedy=all(greedy),
            needs_top_k=any(k < vocab_size and not g for k, g in zip(top_k, greedy)),
            needs_top_p=any(p.top_p < 1.0 and not g for p, g in zip(params, greedy)),
            needs_min_p=any(p.min_p > 0.0 and not g for p, g in zip(params, greedy)),
            suppressed_ids=suppressed_ids, suppressed_bias=suppressed_bias,
        )


class Sampler:
    def __init__(self, fused_gpu_sampling: bool = False) -> None:
        self.fused_gpu_sampling = fused_gpu_sampling  # Triton one-pass kernel for batches without truncation

    def __call__(self, logits: torch.Tensor, t: SamplingTensors) -> tuple[torch.Tensor, torch.Tensor]:
        """logits [rows, vocab] float32 -> (token ids [rows] int64, log-probs [rows] float32)."""
        if t.suppressed_ids is not None:
            assert t.suppressed_bias is not None
            logits = logits.float().scatter_add(-1, t.suppressed_ids, t.suppressed_bias)
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
            gumbel = uniform_noise(t.seeds, t.positions, logits.shape[-1]).log_().neg_().log_().neg_()
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
