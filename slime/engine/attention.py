"""Paged attention behind one small interface, so a GPU kernel can replace the reference backend.

    from slime.engine.attention import AttentionMetadata, TorchPagedAttention

Every layer calls `backend.forward(q, k, v, k_cache, v_cache, meta)` with the flat batch
(q: [tokens, heads, head_dim], k/v: [tokens, kv_heads, head_dim]) and its own cache tensors
([num_blocks, block_size, kv_heads, head_dim]). The backend first writes the new K/V at
`meta.slot_mapping`, then attends each query to its sequence's cached context (causal, the cached
prefix included). `TorchPagedAttention` is the exact reference: gathers plus
`scaled_dot_product_attention`; prefill batches the sequences of equal shape, decode the rows whose
contexts fill the same number of KV blocks.
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
    context_slots: list[torch.Tensor]  # prefill: per sequence, the slots of its whole context, in order (else [])
    block_tables: torch.Tensor  # [seqs, max_blocks] int32, padded with 0 (see context_lens)
    context_mask: torch.Tensor | None = None  # decode: [seqs, 1, 1, max_blocks * block_size] True where a key is real
    # Device-side views that GPU kernels build lazily (slime.engine.kernels.paged_attention.kernel_inputs):
    context_lens_tensor: torch.Tensor | None = None  # int32 [seqs]
    query_start_loc: torch.Tensor | None = None  # int32 [seqs + 1]
    max_query_len: int | None = None
    block_table_rows: torch.Tensor | None = None  # decode, CUDA graphs: sequence i uses block_tables[rows[i]]
    # TorchPagedAttention: the batch's sequences grouped by shape, with their gather indices; built at the first
    # layer and reused by the others
    row_groups: list[RowGroup] | None = None


@dataclass
class RowGroup:
    """Sequences of one shape that the reference backend attends in a single call."""

    rows: torch.Tensor | None  # prefill: token rows [n, query_len]; decode: sequence rows [n]; None = the whole batch
    slots: torch.Tensor  # prefill: KV slots [n * context_len]; decode: KV blocks [n * blocks]
    count: int  # n
    query_len: int
    context_len: int  # keys per sequence (decode: blocks * block_size, masked past the context)
    mask: torch.Tensor | None  # prefill: [query_len, context_len] or None; decode: [n, 1, 1, context_len]
    is_causal: bool


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
        """Sequences of equal (query_len, context_len) share one batched attention call: the same math per
        sequence as one call each (so results do not depend on the batch), without a Python loop per sequence."""
        if meta.row_groups is None:
            meta.row_groups = self._prefill_groups(meta, q.device)
        return self._run_groups(q, k_flat, v_flat, meta.row_groups, scale)

    def _decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                scale: float) -> torch.Tensor:
        """Rows are grouped by how many KV blocks their context fills, so each group gathers and attends over
        its own blocks only (not the batch's widest table): less copying, and a row's result does not
        depend on its neighbours' lengths."""
        if meta.row_groups is None:
            meta.row_groups = self._decode_groups(meta, k_cache.shape[1], q.device)
        block_shape = (k_cache.shape[1], *k_cache.shape[2:])
        out = self._run_groups(q.unsqueeze(1), k_cache.view(k_cache.shape[0], -1), v_cache.view(v_cache.shape[0], -1),
                               meta.row_groups, scale, block_shape)
        return out.squeeze(1)

    @staticmethod
    def _prefill_groups(meta: AttentionMetadata, device: torch.device) -> list[RowGroup]:
        members: dict[tuple[int, int], list[int]] = {}
        for i, shape in enumerate(zip(meta.query_lens, meta.context_lens)):
            members.setdefault(shape, []).append(i)
        starts = [0]
        for query_len in meta.query_lens:
            starts.append(starts[-1] + query_len)
        groups = []
        for (query_len, context_len), seqs in members.items():
            rows = None if len(members) == 1 else torch.tensor(
                [list(range(starts[i], starts[i] + query_len)) for i in seqs], device=device)
            slots = torch.cat([meta.context_slots[i] for i in seqs])
            mask = None
            if query_len > 1 and query_len != context_len:  # queries are the last query_len positions
                q_pos = torch.arange(context_len - query_len, context_len, device=device)
                mask = q_pos[:, None] >= torch.arange(context_len, device=device)[None, :]
            groups.append(RowGroup(rows, slots, len(seqs), query_len, context_len, mask,
                                   is_causal=query_len == context_len and query_len > 1))
        return groups

    @staticmethod
    def _decode_groups(meta: AttentionMetadata, block_size: int, device: torch.device) -> list[RowGroup]:
        assert meta.context_mask is not None
        members: dict[int, list[int]] = {}
        for i, context_len in enumerate(meta.context_lens):
            members.setdefault(-(-context_len // block_size), []).append(i)
        groups = []
        for num_blocks, seqs in members.items():
            width = num_blocks * block_size
            if len(members) == 1:
                rows, tables, mask = None, meta.block_tables[:, :num_blocks], meta.context_mask[..., :width]
            else:
                rows = torch.tensor(seqs, device=device)
                tables, mask = meta.block_tables[rows, :num_blocks], meta.context_mask[rows, ..., :width]
            groups.append(RowGroup(rows, tables.reshape(-1).long(), len(seqs), 1, width, mask, is_causal=False))
        return groups

    @staticmethod
    def _run_groups(q: torch.Tensor, k_flat: torch.Tensor, v_flat: torch.Tensor, groups: list[RowGroup], scale: float,
                    block_shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """q [tokens, H, D] (decode: [seqs, 1, H, D]); k/v_flat [slots, KVH, D] or, with `block_shape`
        (block_size, KVH, D), [blocks, block_size * KVH * D]. Gathers each group's keys with index_select
        (the same values as advanced indexing, faster on CPU) and attends them in one call."""
        out = torch.empty_like(q) if len(groups) > 1 or groups[0].rows is not None else None
        kv_shape = tuple(k_flat.shape[1:]) if block_shape is None else block_shape[1:]
        for group in groups:
            q_group = q if group.rows is None else q[group.rows]
            q_batch = q_group.view(group.count, group.query_len, *q.shape[-2:]).transpose(1, 2)  # [n, H, Lq, D]
            k = k_flat.index_select(0, group.slots).view(group.count, group.context_len, *kv_shape).transpose(1, 2)
            v = v_flat.index_select(0, group.slots).view(group.count, group.context_len, *kv_shape).transpose(1, 2)
            result = F.scaled_dot_product_attention(q_batch, k.to(q.dtype), v.to(q.dtype), attn_mask=group.mask,
                                                    is_causal=group.is_causal, scale=scale, enable_gqa=True)
            result = result.transpose(1, 2).reshape(q_group.shape)
            if out is None:
                return result
            out[group.rows] = result
        assert out is not None
        return out
