"""One-pass GPU sampling for rows without top-k/top-p/min-p: Gumbel-max race plus the token's log-prob.

    from slime.engine.kernels.sampling import gumbel_sample
    tokens, logprobs = gumbel_sample(logits, temperatures, greedy, seeds, positions)

Computes what `slime.engine.sampler.Sampler` computes for untruncated rows, reading the logits once
and writing two numbers per row (no [rows, vocab] temporaries): the Gumbel noise is the same
counter-based hash of (seed, output position, vocab index) as `slime.engine.sampler.uniform_noise`
(its row term, `row_hashes`, is computed in the kernel), so a given seed picks the same token on
either path up to float ties; greedy rows take the argmax; log-probs are `log_softmax(logits / T)`
at the chosen token (T = 1 for greedy rows). Nothing syncs with the host, so it can sit inside a
CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from slime.engine import sampler

SAMPLE_BLOCK_V = 2048
UNIFORM_MAX: tl.constexpr = tl.constexpr(sampler.UNIFORM_MAX)


@triton.jit
def _mix32(x):
    """murmur3 finaliser on uint32 (wrapping multiplication), as `slime.engine.sampler._mix32_`."""
    x = x ^ (x >> 16)
    x = x * 0x85EBCA6B
    x = x ^ (x >> 13)
    x = x * 0xC2B2AE35
    return x ^ (x >> 16)


@triton.jit
def _gumbel_sample_kernel(logits_ptr, temperature_ptr, greedy_ptr, seed_ptr, position_ptr, token_ptr, logprob_ptr,
                          stride_row, vocab_size, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * stride_row
    temperature = tl.load(temperature_ptr + row)
    is_greedy = tl.load(greedy_ptr + row) != 0
    seed = tl.load(seed_ptr + row).to(tl.int64)
    position = tl.load(position_ptr + row).to(tl.int64)
    row_hash = _mix32((seed & 0xFFFFFFFF).to(tl.uint32) ^ 0x9E3779B9)  # = slime.engine.sampler.row_hashes
    row_hash = _mix32(row_hash ^ ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32))
    row_hash = _mix32(row_hash ^ (position & 0xFFFFFFFF).to(tl.uint32))
    run_max = tl.full([BLOCK_V], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_V], tl.float32)
    best_score = tl.full([BLOCK_V], float("-inf"), tl.float32)
    best_index = tl.zeros([BLOCK_V], tl.int32)
    for v0 in range(0, vocab_size, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        mask = offs < vocab_size
        x = tl.load(base + offs, mask=mask, other=float("-inf")).to(tl.float32) / temperature
        new_max = tl.maximum(run_max, x)
        safe = tl.where(new_max == float("-inf"), 0.0, new_max)
        run_sum = run_sum * tl.exp(run_max - safe) + tl.exp(x - safe)
        run_max = new_max
        if is_greedy:
            score = x
        else:
            h = _mix32(_mix32(row_hash ^ offs.to(tl.uint32)) ^ 0x27D4EB2F)
            u = tl.minimum(((h >> 8).to(tl.float32) + 0.5) / 16777216.0, UNIFORM_MAX)  # never 1.0: see sampler.py
            score = x - tl.log(-tl.log(u))
        score = tl.where(mask, score, float("-inf"))
        better = score > best_score  # strict: the first index wins ties, as torch.argmax
        best_score = tl.where(better, score, best_score)
        best_index = tl.where(better, offs, best_index)
    top = tl.max(run_max, 0)
    total = tl.sum(run_sum * tl.exp(run_max - top), 0)
    winner_score = tl.max(best_score, 0)
    token = tl.min(tl.where(best_score == winner_score, best_index, vocab_size), 0)
    chosen = tl.load(base + token).to(tl.float32) / temperature
    tl.store(token_ptr + row, token.to(tl.int64))
    tl.store(logprob_ptr + row, chosen - top - tl.log(total))


def gumbel_sample(logits: torch.Tensor, temperatures: torch.Tensor, greedy: torch.Tensor, seeds: torch.Tensor,
                  positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [rows, vocab] (any float dtype) -> (token ids int64 [rows], log-probs float32 [rows])."""
    rows, vocab = logits.shape
    assert logits.stride(-1) == 1
    tokens = torch.empty(rows, dtype=torch.int64, device=logits.device)
    logprobs = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows == 0:
        return tokens, logprobs
    _gumbel_sample_kernel[(rows,)](logits, temperatures.to(torch.float32), greedy.to(torch.int8), seeds, positions,
                                   tokens, logprobs, logits.stride(0), vocab, BLOCK_V=SAMPLE_BLOCK_V, num_warps=8)
    return tokens, logprobs
