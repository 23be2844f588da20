"""The CPU fast paths give bit-identical results: int32 hash noise and shape-grouped prefill attention.

    cd /work/main && python -m pytest -q tests/test_engine_polish_speed.py
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from slime.engine.attention import AttentionMetadata, TorchPagedAttention
from slime.engine.sampler import UNIFORM_MAX, row_hashes, uniform_noise


def _mix32(x: int) -> int:
    """The murmur3 finaliser on Python ints (the specification the tensor code must match)."""
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & 0xFFFFFFFF
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & 0xFFFFFFFF
    return x ^ (x >> 16)


def _reference_row(seed: int, position: int) -> int:
    row = _mix32((seed & 0xFFFFFFFF) ^ 0x9E3779B9)
    row = _mix32(row ^ ((seed >> 32) & 0xFFFFFFFF))
    return _mix32(row ^ (position & 0xFFFFFFFF))


def _reference_noise(seed: int, position: int, vocab_size: int) -> list[float]:
    row = _reference_row(seed, position)
    bits = [_mix32(_mix32(row ^ index) ^ 0x27D4EB2F) >> 8 for index in range(vocab_size)]
    u = torch.tensor(bits, dtype=torch.int64).to(torch.float32).add(0.5).div(float(1 << 24))
    return u.clamp(max=UNIFORM_MAX).tolist()


def test_noise_matches_the_integer_specification():
    seeds = [0, 1, 7, 2**31, 2**32 - 1, 2**32 + 3, 2**62 + 12345, 2**63 - 1]
    positions = [0, 1, 2**31 + 5, 3, 100, 2**32 - 1, 7, 4095]
    noise = uniform_noise(torch.tensor(seeds), torch.tensor(positions), 97)
    rows = row_hashes(torch.tensor(seeds), torch.tensor(positions))
    assert rows.dtype == torch.int64
    for i, (seed, position) in enumerate(zip(seeds, positions)):
        assert int(rows[i]) == _reference_row(seed, position), (seed, position)
        assert noise[i].tolist() == _reference_noise(seed, position, 97), (seed, position)


def _per_sequence_prefill(q: torch.Tensor, k_flat: torch.Tensor, v_flat: torch.Tensor, meta: AttentionMetadata,
                          scale: float) -> torch.Tensor:
    """The reference before grouping: one attention call per sequence."""
    outputs, start = [], 0
    for query_len, context_len, slots in zip(meta.query_lens, meta.context_lens, meta.context_slots):
        q_seq = q[start:start + query_len].transpose(0, 1).unsqueeze(0)
        k_seq = k_flat[slots].transpose(0, 1).unsqueeze(0)
        v_seq = v_flat[slots].transpose(0, 1).unsqueeze(0)
        mask, is_causal = None, False
        if query_len == context_len:
            is_causal = query_len > 1
        elif query_len > 1:
            q_pos = torch.arange(context_len - query_len, context_len)
            mask = q_pos[:, None] >= torch.arange(context_len)[None, :]
        out = F.scaled_dot_product_attention(q_seq, k_seq, v_seq, attn_mask=mask, is_causal=is_causal, scale=scale,
                                             enable_gqa=True)
        outputs.append(out[0].transpose(0, 1))
        start += query_len
    return torch.cat(outputs, 0)


def test_grouped_prefill_is_bit_identical_to_one_call_per_sequence():
    rng, g = random.Random(0), torch.Generator().manual_seed(0)
    heads, kv_heads, head_dim = 4, 2, 32
    for _ in range(12):
        shapes = []
        for _ in range(rng.randint(1, 30)):
            context_len = rng.choice([1, 5, 17, 45, 45, 46, 130])
            shapes.append((rng.choice([context_len, context_len, 1, max(1, context_len - 16)]), context_len))
        num_slots = sum(c for _, c in shapes) + 10
        k_flat = torch.randn(num_slots, kv_heads, head_dim, generator=g)
        v_flat = torch.randn(num_slots, kv_heads, head_dim, generator=g)
        order = torch.randperm(num_slots, generator=g)
        offsets = [0]
        for _, context_len in shapes:
            offsets.append(offsets[-1] + context_len)
        tokens = sum(q for q, _ in shapes)
        meta = AttentionMetadata(is_prefill=True, slot_mapping=torch.zeros(tokens, dtype=torch.int64),
                                 query_lens=[q for q, _ in shapes], context_lens=[c for _, c in shapes],
                                 context_slots=[order[a:b] for a, b in zip(offsets, offsets[1:])],
                                 block_tables=torch.zeros(len(shapes), 1, dtype=torch.int32))
        q = torch.randn(tokens, heads, head_dim, generator=g)
        expected = _per_sequence_prefill(q, k_flat, v_flat, meta, 0.17)
        assert torch.equal(TorchPagedAttention()._prefill(q, k_flat, v_flat, meta, 0.17), expected), shapes


def _padded_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                   context_lens: list[int], scale: float) -> torch.Tensor:
    """The reference before grouping: every row over the batch's widest block table."""
    rows, width = tables.shape[0], tables.shape[1] * k_cache.shape[1]
    mask = (torch.arange(width)[None, :] < torch.tensor(context_lens)[:, None])[:, None, None, :]
    k = k_cache[tables.long()].view(rows, width, *k_cache.shape[2:]).transpose(1, 2)
    v = v_cache[tables.long()].view(rows, width, *v_cache.shape[2:]).transpose(1, 2)
    return F.scaled_dot_product_attention(q.unsqueeze(2), k, v, attn_mask=mask, scale=scale, enable_gqa=True)[:, :, 0]


def _decode_meta(tables: torch.Tensor, context_lens: list[int], block_size: int) -> AttentionMetadata:
    width = tables.shape[1] * block_size
    mask = (torch.arange(width)[None, :] < torch.tensor(context_lens)[:, None])[:, None, None, :]
    return AttentionMetadata(is_prefill=False, slot_mapping=torch.zeros(len(context_lens), dtype=torch.int64),
                             query_lens=[1] * len(context_lens), context_lens=context_lens, context_slots=[],
                             block_tables=tables, context_mask=mask)


def test_grouped_decode_is_bit_identical_to_padded_tables_and_batch_invariant():
    rng, g = random.Random(1), torch.Generator().manual_seed(1)
    heads, kv_heads, head_dim, block_size, num_blocks = 4, 2, 32, 16, 512
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g)
    backend = TorchPagedAttention()
    for _ in range(8):
        context_lens = [rng.choice([1, 15, 16, 17, 40, 88, 200, 333]) for _ in range(rng.randint(1, 40))]
        width = max(-(-n // block_size) for n in context_lens)
        tables = torch.randint(0, num_blocks, (len(context_lens), width), generator=g, dtype=torch.int32)
        q = torch.randn(len(context_lens), heads, head_dim, generator=g)
        out = backend._decode(q, k_cache, v_cache, _decode_meta(tables, context_lens, block_size), 0.2)
        assert torch.equal(out, _padded_decode(q, k_cache, v_cache, tables, context_lens, 0.2)), context_lens
        i = rng.randrange(len(context_lens))
        own = -(-context_lens[i] // block_size)
        alone = backend._decode(q[i:i + 1], k_cache, v_cache, _decode_meta(tables[i:i + 1, :own], context_lens[i:i + 1],
                                                                            block_size), 0.2)
        assert torch.equal(alone[0], out[i])
