"""Sparse mixture-of-experts MLP (Qwen3-MoE): softmax router, top-k experts, optional renormalisation.

    from slime.engine.models.moe import SparseMoE
    block = SparseMoE(hf_config, dtype=torch.float32)

Expert weights are stacked like transformers v5 keeps them in memory: `experts.gate_up_proj`
[experts, 2 * moe_intermediate, hidden] and `experts.down_proj` [experts, hidden, moe_intermediate].
They load from either naming: the stacked v5 tensors (a trainer's `state_dict()`), or the per-expert
checkpoint tensors `experts.{e}.gate_proj/up_proj/down_proj.weight` (shard ids `(e, "gate")`, ...).
Under tensor parallelism every rank keeps all experts but only its slice of `moe_intermediate_size`
(the loaders cut the full tensors) and the block's output is all-reduced; the router is replicated.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slime.engine.models.layers import Linear, default_weight_loader, set_weight_loader
from slime.engine.parallel import TPInfo, shard_range

EXPERT_WEIGHT = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<expert>\d+)\.(?P<part>gate_proj|up_proj|down_proj)\.weight$")


def is_moe_layer(cfg: Any, layer_index: int) -> bool:
    return (layer_index not in (getattr(cfg, "mlp_only_layers", None) or [])
            and getattr(cfg, "num_experts", 0) > 0
            and (layer_index + 1) % getattr(cfg, "decoder_sparse_step", 1) == 0)


class Experts(nn.Module):
    def __init__(self, num_experts: int, hidden: int, full_intermediate: int, dtype: torch.dtype,
                 tp: TPInfo | None = None) -> None:
        super().__init__()
        tp = tp or TPInfo()
        self.full_intermediate = full_intermediate
        self.start, intermediate = shard_range(full_intermediate, tp.rank, tp.size, "moe_intermediate_size")
        self.intermediate = intermediate
        self.gate_up_proj = set_weight_loader(
            nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden, dtype=dtype), requires_grad=False),
            self._load)
        self.down_proj = set_weight_loader(
            nn.Parameter(torch.empty(num_experts, hidden, intermediate, dtype=dtype), requires_grad=False), self._load)
        self.gate_up_proj.shard_ids = [(e, p) for e in range(num_experts) for p in ("gate", "up")]  # type: ignore[attr-defined]
        self.down_proj.shard_ids = [(e, "down") for e in range(num_experts)]  # type: ignore[attr-defined]

    def _load(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: tuple[int, str] | None = None) -> None:
        if shard_id is None:
            default_weight_loader(param, self._local_stack(param, loaded))
            return
        expert, part = shard_id
        loaded = self._local_part(loaded, part, expert)
        if not 0 <= expert < param.shape[0]:
            raise ValueError(f"expert {expert} does not exist (the config has {param.shape[0]} experts)")
        target = param.data[expert]
        if part == "gate":
            target = target[:self.intermediate]
        elif part == "up":
            target = target[self.intermediate:]
        if tuple(target.shape) != tuple(loaded.shape):
            raise ValueError(f"shape {tuple(loaded.shape)} does not fit expert {expert} {part} of shape {tuple(target.shape)}")
        with torch.no_grad():
            target.copy_(loaded)

    def _local_stack(self, param: nn.Parameter, loaded: torch.Tensor) -> torch.Tensor:
        """This rank's slice of a stacked v5 tensor (all of it without tensor parallelism)."""
        full, start, size = self.full_intermediate, self.start, self.intermediate
        if size == full:
            return loaded
        if param is self.gate_up_proj:
            if loaded.dim() != 3 or loaded.shape[1] != 2 * full:
                raise ValueError(f"shape {tuple(loaded.shape)} does not fit stacked gate_up_proj with {2 * full} rows")
            return torch.cat([loaded[:, start:start + size], loaded[:, full + start:full + start + size]], dim=1)
        if loaded.dim() != 3 or loaded.shape[2] != full:
            raise ValueError(f"shape {tuple(loaded.shape)} does not fit stacked down_proj with {full} columns")
        return loaded[:, :, start:start + size]

    def _local_part(self, loaded: torch.Tensor, part: str, expert: int) -> torch.Tensor:
        full, start, size = self.full_intermediate, self.start, self.intermediate
        if size == full:
            return loaded
        dim = 1 if part == "down" else 0
        if loaded.dim() != 2 or loaded.shape[dim] != full:
            raise ValueError(f"shape {tuple(loaded.shape)} does not fit expert {expert} {part} "
                             f"(expected {full} along dim {dim} before the tensor-parallel split)")
        return loaded.narrow(dim, start, size)


class SparseMoE(nn.Module):
    def __init__(self, cfg: Any, dtype: torch.dtype, activation, tp: TPInfo | None = None) -> None:
        super().__init__()
        self.tp = tp or TPInfo()
        self.top_k = cfg.num_experts_per_tok
        self.norm_topk_prob = bool(getattr(cfg, "norm_topk_prob", False))
        self.gate = Linear(cfg.hidden_size, cfg.num_experts, False, dtype)
        self.experts = Experts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size, dtype, self.tp)
        self.act = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(self.gate(x), dim=-1, dtype=torch.float32)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype)
        out = torch.zeros_like(x)
        for expert in experts.unique().tolist():  # ascending, like the HF loop (same summation order)
            token, slot = torch.where(experts == expert)
            gate, up = F.linear(x[token], self.experts.gate_up_proj[expert]).chunk(2, dim=-1)
            y = F.linear(self.act(gate) * up, self.experts.down_proj[expert]) * weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return self.tp.all_reduce(out)
