"""Paged attention behind one small interface, so a GPU kernel can replace the reference backend.

    from slime.engine.attention import AttentionMetadata, TorchPagedAttention

Every layer calls `backend.forward(q, k, v, k_cache, v_cache, meta)` with the flat batch
(q: [tokens, heads, head_dim], k/v: [tokens, kv_heads, head_dim]) and its own cache tensors
([num_blocks, block_size, kv_heads, head_dim]). The backend first writes the new K/V at
`meta.slot_mapping`, then attends each query to its sequence's cached context (causal, the cached
prefix included). `TorchPagedAttention` is the exact reference: per-sequence gathers plus
`scaled_dot_product_attention`, with decode batched over padded block tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    is_prefill: bool
    slot_mapping: torch.Tensor  # [tokens] cache slot of each new token
    query_lens: list[int]  # new tokens per sequence
    context_lens: list[int]  # tokens in the cache per sequence after this step's writes
    context_slots: list[torch.Tensor]  # per sequence: the slots of its whole context, in order
    block_tables: torch.Tensor  # [seqs, max_blocks] int32, padded with 0 (see context_lens)
    context_mask: torch.Tensor | None = None  # decode: [seqs, 1, 1, max_blocks * block_size] True where a key is real
    # Device-side views that GPU kernels build lazily (slime.engine.kernels.paged_attention.kernel_inputs):
    context_lens_tensor: torch.Tensor | None = None  # int32 [seqs]
    query_start_loc: torch.Tensor | None = None  # int32 [seqs + 1]
    max_query_len: int | None = None
    block_table_rows: torch.Tensor | None = None  # decode, CUDA graphs: sequence i uses block_tables[rows[i]]


class AttentionBackend(Protocol):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor: ...


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    k_cache.view(-1, *k.shape[1:]).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, *v.shape[1:]).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


class TorchPagedAttention:
    """Reference backend on any device: exact, not fast."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        k_flat = k_cache.view(-1, *k_cache.shape[2:])
        v_flat = v_cache.view(-1, *v_cache.shape[2:])
        if not meta.is_prefill and meta.context_mask is not None:
            return self._decode(q, k_cache, v_cache, meta, scale)
        return self._prefill(q, k_flat, v_flat, meta, scale)

    def _prefill(self, q: torch.Tensor, k_flat: torch.Tensor, v_flat: torch.Tensor, meta: AttentionMetadata,
                 scale: float) -> torch.Tensor:
        outputs = []
        start = 0
        for query_len, context_len, slots in zip(meta.query_lens, meta.context_lens, meta.context_slots):
            q_seq = q[start:start + query_len].transpose(0, 1).unsqueeze(0)  # [1, H, Lq, D]
            k_seq = k_flat[slots].transpose(0, 1).unsqueeze(0)  # [1, KVH, Lk, D]
            v_seq = v_flat[slots].transpose(0, 1).unsqueeze(0)
            mask = None
            is_causal = False
            if query_len == context_len:
                is_causal = query_len > 1
            elif query_len > 1:  # queries are the last query_len positions of the context
                q_pos = torch.arange(context_len - query_len, context_len, device=q.device)
                mask = q_pos[:, None] >= torch.arange(context_len, device=q.device)[None, :]
            out = F.scaled_dot_product_attention(q_seq, k_seq.to(q.dtype), v_seq.to(q.dtype), attn_mask=mask,
                                                 is_causal=is_causal, scale=scale, enable_gqa=True)
            outputs.append(out[0].transpose(0, 1))
            start += query_len
        return torch.cat(outputs, dim=0)

    def _decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                scale: float) -> torch.Tensor:
        assert meta.context_mask is not None
        tables = meta.block_tables.long()
        rows, width = tables.shape[0], tables.shape[1] * k_cache.shape[1]
        k_all = k_cache[tables].view(rows, width, *k_cache.shape[2:]).transpose(1, 2).to(q.dtype)  # [B, KVH, L, D]
        v_all = v_cache[tables].view(rows, width, *v_cache.shape[2:]).transpose(1, 2).to(q.dtype)
        out = F.scaled_dot_product_attention(q.unsqueeze(2), k_all, v_all, attn_mask=meta.context_mask,
                                             scale=scale, enable_gqa=True)  # [B, H, 1, D]
        return out.squeeze(2)
