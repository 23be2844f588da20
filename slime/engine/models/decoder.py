"""One decoder-only transformer covering Qwen3 (q/k RMSNorm), Qwen3-MoE, Qwen2/Qwen2.5 (q/k/v bias) and Llama.

    from slime.engine.models.decoder import DecoderForCausalLM, DecoderVariant
    model = DecoderForCausalLM(hf_config, DecoderVariant(qk_norm=True), dtype=torch.float32, attention=backend)

Inputs are a flat batch of new tokens (`input_ids`, `positions`) plus `AttentionMetadata`; the KV
cache tensors are attached per layer by the model runner (`layer.self_attn.k_cache/v_cache`).
Parameter names follow the HF checkpoint except for fused projections (`qkv_proj`, `gate_up_proj`),
which `load_weights` maps back (see `PACKED_MODULES`). `set_fused_ops(True)` (the model runner, on
CUDA with Triton) makes the RMSNorm / attention / MLP modules call the fused kernels directly.
With `tp` (a `slime.engine.parallel.TPInfo` of size > 1) each rank holds its heads / MLP columns and
all-reduces after o_proj / down_proj (layout in `slime.engine.parallel`); `compute_logits=False`
(tp ranks other than 0, which never sample) skips the replicated lm_head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from slime.engine.attention import AttentionBackend, AttentionMetadata
from slime.engine.models.layers import Embedding, FusedLinear, Linear, RMSNorm, RotaryEmbedding, RowParallelLinear
from slime.engine.models.moe import EXPERT_WEIGHT, SparseMoE, is_moe_layer
from slime.engine.parallel import TPInfo, kv_head_range, shard_range

# HF projection name -> (fused parameter module, shard id)
PACKED_MODULES = {
    "q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", "gate"), "up_proj": ("gate_up_proj", "up"),
}
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class DecoderVariant:
    qk_norm: bool = False  # Qwen3
    qkv_bias: bool = False  # Qwen2 always; Llama/Qwen3 with attention_bias
    o_bias: bool = False  # Llama/Qwen3 with attention_bias
    mlp_bias: bool = False  # Llama with mlp_bias
    moe: bool = False  # Qwen3-MoE: sparse expert MLP on the layers `is_moe_layer` picks


def _activation(name: str):
    if name in ("silu", "swish"):
        return F.silu
    if name in ("gelu", "gelu_pytorch_tanh"):
        return lambda x: F.gelu(x, approximate="tanh" if name.endswith("tanh") else "none")
    raise ValueError(f"config.json hidden_act {name!r} is not supported by the built-in engine (silu, gelu)")


def _row_linear(in_features: int, out_features: int, bias: bool, dtype: torch.dtype, tp: TPInfo) -> nn.Module:
    if tp.size == 1:
        return Linear(in_features, out_features, bias, dtype)
    return RowParallelLinear(in_features, out_features, bias, dtype, tp)


class Attention(nn.Module):
    def __init__(self, cfg: Any, variant: DecoderVariant, dtype: torch.dtype, backend: AttentionBackend,
                 rotary: RotaryEmbedding, tp: TPInfo) -> None:
        super().__init__()
        total_heads = cfg.num_attention_heads
        total_kv_heads = getattr(cfg, "num_key_value_heads", None) or total_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // total_heads
        self.scale = self.head_dim ** -0.5
        first_head, self.num_heads = shard_range(total_heads, tp.rank, tp.size, "num_attention_heads")
        first_kv, self.num_kv_heads = kv_head_range(total_kv_heads, tp.rank, tp.size)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        slices = None
        if tp.size > 1:
            d = self.head_dim
            slices = {"q": (first_head * d, q_size, total_heads * d), "k": (first_kv * d, kv_size, total_kv_heads * d),
                      "v": (first_kv * d, kv_size, total_kv_heads * d)}
        self.qkv_proj = FusedLinear(cfg.hidden_size, {"q": q_size, "k": kv_size, "v": kv_size}, variant.qkv_bias, dtype,
                                    slices)
        self.o_proj = _row_linear(total_heads * self.head_dim, cfg.hidden_size, variant.o_bias, dtype, tp)
        self.qk_norm = variant.qk_norm
        if variant.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, dtype)
        self.rotary = rotary
        self.backend = backend
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None
        self.fused = False  # q/k RMSNorm + RoPE as one Triton kernel per tensor (set_fused_ops)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj.split(self.qkv_proj(x))
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.fused:
            q, k = self._fused_norm_rope(positions, q, k)
        else:
            if self.qk_norm:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = self.rotary(positions, q, k)
        assert self.k_cache is not None and self.v_cache is not None, "KV cache is not allocated"
        out = self.backend.forward(q, k, v, self.k_cache, self.v_cache, meta, self.scale)
        return self.o_proj(out.reshape(-1, self.num_heads * self.head_dim))

    def _fused_norm_rope(self, positions: torch.Tensor, q: torch.Tensor,
                         k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from slime.engine.kernels.fused_ops import qk_norm_rope

        cos, sin = self.rotary.cos, self.rotary.sin
        if self.qk_norm:
            return (qk_norm_rope(q, self.q_norm.weight, self.q_norm.eps, cos, sin, positions),
                    qk_norm_rope(k, self.k_norm.weight, self.k_norm.eps, cos, sin, positions))
        return qk_norm_rope(q, None, 0.0, cos, sin, positions), qk_norm_rope(k, None, 0.0, cos, sin, positions)


class MLP(nn.Module):
    def __init__(self, cfg: Any, variant: DecoderVariant, dtype: torch.dtype, tp: TPInfo) -> None:
        super().__init__()
        full = cfg.intermediate_size
        start, size = shard_range(full, tp.rank, tp.size, "intermediate_size")
        slices = {"gate": (start, size, full), "up": (start, size, full)} if tp.size > 1 else None
        self.gate_up_proj = FusedLinear(cfg.hidden_size, {"gate": size, "up": size}, variant.mlp_bias, dtype, slices)
        self.down_proj = _row_linear(full, cfg.hidden_size, variant.mlp_bias, dtype, tp)
        self.act = _activation(cfg.hidden_act)
        self.fused = False  # SiLU-and-multiply as one Triton kernel (set_fused_ops; SiLU MLPs only)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            from slime.engine.kernels.fused_ops import silu_and_mul

            return self.down_proj(silu_and_mul(self.gate_up_proj(x)))
        gate, up = self.gate_up_proj.split(self.gate_up_proj(x))
        return self.down_proj(self.act(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Any, variant: DecoderVariant, dtype: torch.dtype, backend: AttentionBackend,
                 rotary: RotaryEmbedding, layer_index: int, tp: TPInfo) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = Attention(cfg, variant, dtype, backend, rotary, tp)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        if variant.moe and is_moe_layer(cfg, layer_index):
            self.mlp: nn.Module = SparseMoE(cfg, dtype, _activation(cfg.hidden_act), tp)
        else:
            self.mlp = MLP(cfg, variant, dtype, tp)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.self_attn(positions, self.input_layernorm(x), meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderModel(nn.Module):
    def __init__(self, cfg: Any, variant: DecoderVariant, dtype: torch.dtype, backend: AttentionBackend,
                 max_positions: int, tp: TPInfo) -> None:
        super().__init__()
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        rotary = RotaryEmbedding(cfg, head_dim, max_positions)
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, dtype)
        self.layers = nn.ModuleList(DecoderLayer(cfg, variant, dtype, backend, rotary, i, tp)
                                    for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.rotary = rotary

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(positions, x, meta)
        return self.norm(x)


class DecoderForCausalLM(nn.Module):
    def __init__(self, hf_config: Any, variant: DecoderVariant, dtype: torch.dtype, attention: AttentionBackend,
                 max_positions: int, tp: TPInfo | None = None) -> None:
        super().__init__()
        self.hf_config = hf_config
        self.variant = variant
        self.tp = tp or TPInfo()
        self.compute_logits = True
        self.model = DecoderModel(hf_config, variant, dtype, attention, max_positions, self.tp)
        self.tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False))
        if not self.tie_word_embeddings:
            self.lm_head = Linear(hf_config.hidden_size, hf_config.vocab_size, False, dtype)
        for module in self.modules():
            if isinstance(module, FusedLinear):
                for param in (module.weight, module.bias):
                    if param is not None:
                        param.shard_ids = list(module.shard_offsets)  # type: ignore[attr-defined]

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.tie_word_embeddings else self.lm_head.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                last_token_indices: torch.Tensor) -> torch.Tensor:
        """Float32 logits [num_seqs, vocab] at each sequence's last new token."""
        hidden = self.model(input_ids, positions, meta)[last_token_indices]
        if not self.compute_logits:
            return hidden
        return F.linear(hidden, self.lm_head_weight).float()

    def set_fused_ops(self, enabled: bool) -> bool:
        """Switch the RMSNorm, attention (q/k norm + RoPE) and MLP modules to the fused Triton kernels of
        `slime.engine.kernels.fused_ops` (CUDA with Triton). Returns whether they are on: enabling does
        nothing and returns False when the model has a part the kernels do not cover (`fusable`)."""
        if enabled:
            from slime.engine.kernels.fused_ops import fusable

            if not fusable(self):
                return False
        for module in self.modules():
            if isinstance(module, (RMSNorm, Attention, MLP)):
                module.fused = enabled
        return enabled

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn for layer in self.model.layers]

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> set[tuple[str, Any]]:
        """Copy HF-named full tensors into the parameters (any subset); returns the (parameter, shard) pairs set."""
        params = dict(self.named_parameters())
        loaded: set[tuple[str, Any]] = set()
        for hf_name, tensor in named_tensors:
            if hf_name.endswith(IGNORED_SUFFIXES):
                continue
            name, shard_id = self._parameter_for(hf_name, params)
            target = params[name]
            try:
                target.weight_loader(target, tensor, shard_id)  # type: ignore[attr-defined]
            except ValueError as exc:
                raise ValueError(f"weight {hf_name!r}: {exc}") from None
            loaded.add((name, shard_id))
        return loaded

    def missing_weights(self, loaded: set[tuple[str, Any]]) -> list[str]:
        """Parameters (or parts of fused ones) that `loaded` from `load_weights` did not cover."""
        missing = []
        for name, param in self.named_parameters():
            if (name, None) in loaded:
                continue
            shards = getattr(param, "shard_ids", None)
            if shards is None:
                missing.append(name)
            else:
                missing += [f"{name}[{s}]" for s in shards if (name, s) not in loaded]
        return missing

    def _parameter_for(self, hf_name: str, params: dict[str, nn.Parameter]) -> tuple[str, Any]:
        if hf_name == "lm_head.weight" and self.tie_word_embeddings:
            return "model.embed_tokens.weight", None
        expert = EXPERT_WEIGHT.match(hf_name)
        if expert:
            part = expert["part"].removesuffix("_proj")
            name = f"{expert['prefix']}.{'down_proj' if part == 'down' else 'gate_up_proj'}"
            if name in params:
                return name, (int(expert["expert"]), part)
        for hf_part, (fused, shard_id) in PACKED_MODULES.items():
            if f".{hf_part}." in hf_name:
                name = hf_name.replace(f".{hf_part}.", f".{fused}.")
                if name in params:
                    return name, shard_id
        if hf_name in params:
            return hf_name, None
        arch = (getattr(self.hf_config, "architectures", None) or ["?"])[0]
        raise ValueError(f"weight {hf_name!r} does not belong to a {arch} model with this config")
