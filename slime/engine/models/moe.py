"""Sparse mixture-of-experts MLP (Qwen3-MoE): softmax router, top-k experts, optional renormalisation.

    from slime.engine.models.moe import SparseMoE
    block = SparseMoE(hf_config, dtype=torch.float32)

Expert weights are stacked like transformers v5 keeps them in memory: `experts.gate_up_proj`
[experts, 2 * moe_intermediate, hidden] and `experts.down_proj` [experts, hidden, moe_intermediate].
They load from either naming: the stacked v5 tensors (a trainer's `state_dict()`), or the per-expert
checkpoint tensors `experts.{e}.gate_proj/up_proj/down_proj.weight` (shard ids `(e, "gate")`, ...).
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slime.engine.models.layers import Linear, default_weight_loader, set_weight_loader

EXPERT_WEIGHT = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<expert>\d+)\.(?P<part>gate_proj|up_proj|down_proj)\.weight$")


def is_moe_layer(cfg: Any, layer_index: int) -> bool:
    return (layer_index not in (getattr(cfg, "mlp_only_layers", None) or [])
            and getattr(cfg, "num_experts", 0) > 0
            and (layer_index + 1) % getattr(cfg, "decoder_sparse_step", 1) == 0)


class Experts(nn.Module):
    def __init__(self, num_experts: int, hidden: int, intermediate: int, dtype: torch.dtype) -> None:
        super().__init__()
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
            default_weight_loader(param, loaded)
            return
        expert, part = shard_id
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


class SparseMoE(nn.Module):
    def __init__(self, cfg: Any, dtype: torch.dtype, activation) -> None:
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.norm_topk_prob = bool(getattr(cfg, "norm_topk_prob", False))
        self.gate = Linear(cfg.hidden_size, cfg.num_experts, False, dtype)
        self.experts = Experts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size, dtype)
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
        return out
