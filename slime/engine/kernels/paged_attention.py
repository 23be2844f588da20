"""Triton paged attention: KV store, varlen causal prefill and split-K decode over live KV blocks only.

    from slime.engine.kernels.paged_attention import TritonPagedAttention
    model = DecoderForCausalLM(hf_config, variant, torch.bfloat16, TritonPagedAttention(), max_positions)

Drop-in `AttentionBackend` (see slime/engine/attention.py): the same cache layout
[num_blocks, block_size, kv_heads, head_dim] and the same metadata. Each kernel walks a sequence's
block table and touches only the `context_len` live slots; nothing is padded or gathered in memory.
Decode keeps all query heads of one KV head together (GQA: K/V read once per group) and splits long
contexts across programs when the batch is too small to fill the GPU (flash-decoding), then merges
the partial results by their log-sum-exp. Slots < 0 in `slot_mapping` are skipped (CUDA-graph padding).

Kernel inputs beyond the reference metadata (`context_lens_tensor` int32 [seqs], `query_start_loc`
int32 [seqs + 1], `max_query_len`) are read from the metadata object when present (the CUDA-graph
runner provides them as static buffers) and otherwise built once per batch and cached on it.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from slime.engine.attention import AttentionMetadata

LOG2E = 1.4426950408889634
DECODE_BLOCK_N, DECODE_WARPS, DECODE_STAGES, DECODE_HEADS_FASTEST = 64, 4, 3, True  # tuned on H100
PREFILL_BLOCK_M, PREFILL_BLOCK_N, PREFILL_WARPS, PREFILL_STAGES = 128, 32, 4, 3  # tuned on H100
MAX_DECODE_SPLITS = 16


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, stride_k, stride_v,
                     ROW: tl.constexpr, ROW_PAD: tl.constexpr):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot >= 0:
        offs = tl.arange(0, ROW_PAD)
        mask = offs < ROW
        k = tl.load(k_ptr + token * stride_k + offs, mask=mask)
        v = tl.load(v_ptr + token * stride_v + offs, mask=mask)
        tl.store(k_cache_ptr + slot * ROW + offs, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_cache_ptr + slot * ROW + offs, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["stride_bt"])
def _decode_kernel(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, table_rows_ptr, context_lens_ptr, out_ptr,
                   part_out_ptr, part_lse_ptr, scale_log2, stride_qt, stride_qh, stride_bt, stride_ot, stride_oh,
                   NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
                   HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                   NUM_SPLITS: tl.constexpr, IEEE: tl.constexpr, HEADS_FASTEST: tl.constexpr,
                   HAS_TABLE_ROWS: tl.constexpr):
    if HEADS_FASTEST:  # the KV heads of one sequence run side by side and read whole cache rows together
        kv_head = tl.program_id(0)
        seq = tl.program_id(1)
    else:
        seq = tl.program_id(0)
        kv_head = tl.program_id(1)
    split = tl.program_id(2)
    context_len = tl.load(context_lens_ptr + seq)
    per_split = tl.cdiv(tl.cdiv(context_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(context_len, start + per_split)

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, DIM_PAD)
    heads = kv_head * GROUP + offs_g
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    q = tl.load(q_ptr + seq.to(tl.int64) * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)
    q = q.to(k_cache_ptr.dtype.element_ty)
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, DIM_PAD], tl.float32)
    row = NUM_KV_HEADS * HEAD_DIM
    if HAS_TABLE_ROWS:  # persistent tables: this sequence's row in block_tables
        table = block_tables_ptr + tl.load(table_rows_ptr + seq).to(tl.int64) * stride_bt
    else:
        table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        page = tl.load(table + offs_n // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
        slots = page * BLOCK_SIZE + offs_n % BLOCK_SIZE
        addr = slots[:, None] * row + kv_head * HEAD_DIM + offs_d[None, :]
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_cache_ptr + addr, mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + addr, mask=kv_mask, other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(n_mask[None, :], s * scale_log2, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m - m_new)
        l = l * alpha + tl.sum(p, 1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    safe_l = tl.where(l > 0.0, l, 1.0)
    out = acc / safe_l[:, None]
    if NUM_SPLITS == 1:
        o_ptrs = out_ptr + seq.to(tl.int64) * stride_ot + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])
    else:
        part = (seq.to(tl.int64) * NUM_HEADS + heads) * NUM_SPLITS + split  # [GROUP_PAD]
        tl.store(part_out_ptr + part[:, None] * DIM_PAD + offs_d[None, :], out, mask=g_mask[:, None])
        lse = tl.where(l > 0.0, m + tl.math.log2(safe_l), float("-inf"))
        tl.store(part_lse_ptr + part, lse, mask=g_mask)


@triton.jit
def _merge_splits_kernel(part_out_ptr, part_lse_ptr, out_ptr, stride_ot, stride_oh, NUM_HEADS: tl.constexpr,
                         HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr, NUM_SPLITS: tl.constexpr):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    base = (seq.to(tl.int64) * NUM_HEADS + head) * NUM_SPLITS
    offs_s = tl.arange(0, NUM_SPLITS)
    offs_d = tl.arange(0, DIM_PAD)
    lse = tl.load(part_lse_ptr + base + offs_s)
    top = tl.max(lse, 0)
    top = tl.where(top == float("-inf"), 0.0, top)
    weights = tl.math.exp2(lse - top)  # 0 for empty splits
    parts = tl.load(part_out_ptr + (base + offs_s)[:, None] * DIM_PAD + offs_d[None, :])
    total = tl.sum(weights, 0)
    out = tl.sum(parts * weights[:, None], 0) / tl.where(total > 0.0, total, 1.0)
    tl.store(out_ptr + seq.to(tl.int64) * stride_ot + head * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty),
             mask=offs_d < HEAD_DIM)


@triton.jit(do_not_specialize=["stride_bt"])
def _prefill_kernel(q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_tables_ptr, query_start_ptr, context_lens_ptr,
                    scale_log2, stride_qt, stride_qh, stride_bt, stride_ot, stride_oh,
                    NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
                    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    m_block = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    if m_block * BLOCK_M < q_len:
        context_len = tl.load(context_lens_ptr + seq)
        kv_head = head // GROUP
        offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, DIM_PAD)
        m_mask = offs_m < q_len
        d_mask = offs_d < HEAD_DIM
        q_pos = context_len - q_len + offs_m  # absolute positions of these queries
        tokens = (q_start + offs_m).to(tl.int64)
        q = tl.load(q_ptr + tokens[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                    mask=m_mask[:, None] & d_mask[None, :], other=0.0)
        q = q.to(k_cache_ptr.dtype.element_ty)
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, DIM_PAD], tl.float32)
        row = NUM_KV_HEADS * HEAD_DIM
        table = block_tables_ptr + seq.to(tl.int64) * stride_bt
        end = tl.minimum(context_len, context_len - q_len + (m_block + 1) * BLOCK_M)
        for n0 in range(0, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_mask = offs_n < end
            page = tl.load(table + offs_n // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
            slots = page * BLOCK_SIZE + offs_n % BLOCK_SIZE
            addr = slots[:, None] * row + kv_head * HEAD_DIM + offs_d[None, :]
            kv_mask = n_mask[:, None] & d_mask[None, :]
            k = tl.load(k_cache_ptr + addr, mask=kv_mask, other=0.0)
            v = tl.load(v_cache_ptr + addr, mask=kv_mask, other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            visible = n_mask[None, :] & (offs_n[None, :] <= q_pos[:, None])
            s = tl.where(visible, s * scale_log2, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_safe[:, None])
            alpha = tl.math.exp2(m - m_safe)
            l = l * alpha + tl.sum(p, 1)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
        out = acc / tl.where(l > 0.0, l, 1.0)[:, None]
        tl.store(out_ptr + tokens[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write k/v [tokens, kv_heads, head_dim] into the cache at `slot_mapping` (slots < 0 skipped)."""
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    assert k.stride(-1) == 1 and k.stride(-2) == k.shape[-1] and v.stride(-1) == 1 and v.stride(-2) == v.shape[-1]
    tokens = k.shape[0]
    if tokens == 0:
        return
    row = k.shape[1] * k.shape[2]
    _store_kv_kernel[(tokens,)](k, v, k_cache, v_cache, slot_mapping, k.stride(0), v.stride(0),
                                ROW=row, ROW_PAD=triton.next_power_of_2(row))


def decode_splits(num_seqs: int, num_kv_heads: int, device: torch.device) -> int:
    """How many programs share one (sequence, KV head): 1 for big batches, more to fill the GPU for small ones."""
    if device.type != "cuda":
        return 1
    target = 2 * torch.cuda.get_device_properties(device).multi_processor_count  # two waves
    programs = num_seqs * num_kv_heads
    if programs >= target:
        return 1
    return min(MAX_DECODE_SPLITS, triton.next_power_of_2(math.ceil(target / programs)))


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 context_lens: torch.Tensor, scale: float, num_splits: int | None = None,
                 table_rows: torch.Tensor | None = None,
                 block_n: int = DECODE_BLOCK_N, num_warps: int = DECODE_WARPS,
                 num_stages: int = DECODE_STAGES, heads_fastest: bool = DECODE_HEADS_FASTEST) -> torch.Tensor:
    """One query token per sequence. q [seqs, heads, head_dim] -> [seqs, heads, head_dim] in q's dtype.

    Sequence i's block table is `block_tables[i]`, or `block_tables[table_rows[i]]` when given."""
    seqs, heads, head_dim = q.shape
    _, block_size, kv_heads, cache_dim = k_cache.shape
    assert cache_dim == head_dim and heads % kv_heads == 0 and q.stride(-1) == 1
    group = heads // kv_heads
    splits = num_splits or decode_splits(seqs, kv_heads, q.device)
    dim_pad = triton.next_power_of_2(head_dim)
    out = torch.empty_like(q)
    if splits > 1:
        part_out = torch.empty(seqs * heads * splits, dim_pad, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(seqs * heads * splits, dtype=torch.float32, device=q.device)
    else:
        part_out = part_lse = out  # unused
    grid = (kv_heads, seqs, splits) if heads_fastest else (seqs, kv_heads, splits)
    _decode_kernel[grid](
        q, k_cache, v_cache, block_tables, table_rows if table_rows is not None else context_lens, context_lens, out,
        part_out, part_lse, scale * LOG2E,
        q.stride(0), q.stride(1), block_tables.stride(0), out.stride(0), out.stride(1),
        NUM_HEADS=heads, NUM_KV_HEADS=kv_heads, GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim, DIM_PAD=dim_pad, BLOCK_SIZE=block_size, BLOCK_N=block_n, NUM_SPLITS=splits,
        IEEE=k_cache.dtype == torch.float32, HEADS_FASTEST=heads_fastest, HAS_TABLE_ROWS=table_rows is not None,
        num_warps=num_warps, num_stages=num_stages)
    if splits > 1:
        _merge_splits_kernel[(seqs, heads)](part_out, part_lse, out, out.stride(0), out.stride(1), NUM_HEADS=heads,
                                            HEAD_DIM=head_dim, DIM_PAD=dim_pad, NUM_SPLITS=splits, num_warps=4)
    return out


def paged_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                  query_start_loc: torch.Tensor, context_lens: torch.Tensor, max_query_len: int, scale: float,
                  block_m: int = PREFILL_BLOCK_M, block_n: int = PREFILL_BLOCK_N, num_warps: int = PREFILL_WARPS,
                  num_stages: int = PREFILL_STAGES) -> torch.Tensor:
    """Causal attention of each sequence's new tokens (the last query_len of its context) to its cached context."""
    tokens, heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    seqs = context_lens.shape[0]
    out = torch.empty_like(q)
    if tokens == 0:
        return out
    grid = (triton.cdiv(max_query_len, block_m), seqs, heads)
    _prefill_kernel[grid](
        q, k_cache, v_cache, out, block_tables, query_start_loc, context_lens, scale * LOG2E,
        q.stride(0), q.stride(1), block_tables.stride(0), out.stride(0), out.stride(1),
        NUM_KV_HEADS=kv_heads, GROUP=heads // kv_heads, HEAD_DIM=head_dim, DIM_PAD=triton.next_power_of_2(head_dim),
        BLOCK_SIZE=block_size, BLOCK_M=block_m, BLOCK_N=block_n, IEEE=k_cache.dtype == torch.float32,
        num_warps=num_warps, num_stages=num_stages)
    return out


def kernel_inputs(meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(context_lens int32 [seqs], query_start_loc int32 [seqs + 1], max_query_len), built once per batch."""
    context_lens = getattr(meta, "context_lens_tensor", None)
    query_start = getattr(meta, "query_start_loc", None)
    max_query_len = getattr(meta, "max_query_len", None)
    device = meta.block_tables.device
    if context_lens is None:
        context_lens = torch.tensor(meta.context_lens, dtype=torch.int32, device=device)
        meta.context_lens_tensor = context_lens  # type: ignore[attr-defined]
    if meta.is_prefill and query_start is None:
        starts = [0]
        for n in meta.query_lens:
            starts.append(starts[-1] + n)
        query_start = torch.tensor(starts, dtype=torch.int32, device=device)
        meta.query_start_loc = query_start  # type: ignore[attr-defined]
    if max_query_len is None:
        max_query_len = max(meta.query_lens) if meta.query_lens else 0
        meta.max_query_len = max_query_len  # type: ignore[attr-defined]
    return context_lens, query_start, max_query_len  # type: ignore[return-value]


class TritonPagedAttention:
    """Same contract as `TorchPagedAttention`; decode reads only the live KV blocks of each sequence."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        context_lens, query_start, max_query_len = kernel_inputs(meta)
        q = q.contiguous()
        if meta.is_prefill:
            return paged_prefill(q, k_cache, v_cache, meta.block_tables, query_start, context_lens, max_query_len,
                                 scale)
        return paged_decode(q, k_cache, v_cache, meta.block_tables, context_lens, scale,
                            table_rows=meta.block_table_rows)
