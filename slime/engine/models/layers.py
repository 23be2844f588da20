"""Building blocks of the engine's decoder models; every parameter carries its own `weight_loader`.

    from slime.engine.models.layers import FusedLinear, RMSNorm, RotaryEmbedding

`param.weight_loader(param, tensor, shard_id)` copies a full Hugging Face tensor in place (no new
storage, so captured graphs and CUDA IPC stay valid). `FusedLinear` stores several HF projections
in one matrix (q/k/v, gate/up); its shard ids name the HF projection. Modules with a `fused` flag
call the Triton kernels of `slime.engine.kernels.fused_ops` when it is set (CUDA + Triton only).
Under tensor parallelism (`slime.engine.parallel`) the loaders still take the full HF tensor and
keep this rank's slice: `FusedLinear(source_slices=...)` is column-parallel, `RowParallelLinear`
splits its input dim and all-reduces its output.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from slime.engine.parallel import TPInfo


def _check_shape(param: nn.Parameter | torch.Tensor, loaded: torch.Tensor, where: str) -> None:
    if tuple(param.shape) != tuple(loaded.shape):
        raise ValueError(f"shape {tuple(loaded.shape)} does not fit {where} of shape {tuple(param.shape)}")


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
    assert shard_id is None
    _check_shape(param, loaded, "the parameter")
    with torch.no_grad():
        param.data.copy_(loaded)


def set_weight_loader(param: nn.Parameter, loader: Callable[..., None]) -> nn.Parameter:
    param.weight_loader = loader  # type: ignore[attr-defined]
    return param


class FusedLinear(nn.Module):
    """y = x W^T (+ b) where W stacks several HF projections along the output dim.

    `source_slices[shard_id] = (start, length, full)`: keep rows [start, start + length) of the HF tensor
    of `full` rows (column parallelism); `shard_sizes` are then the kept lengths."""

    def __init__(self, in_features: int, shard_sizes: dict[str, int], bias: bool, dtype: torch.dtype,
                 source_slices: dict[str, tuple[int, int, int]] | None = None) -> None:
        super().__init__()
        self.source_slices = source_slices or {}
        self.shard_offsets: dict[str, tuple[int, int]] = {}
        offset = 0
        for shard_id, size in shard_sizes.items():
            self.shard_offsets[shard_id] = (offset, size)
            offset += size
        self.weight = set_weight_loader(nn.Parameter(torch.empty(offset, in_features, dtype=dtype), requires_grad=False),
                                        self._load_shard)
        self.bias = None
        if bias:
            self.bias = set_weight_loader(nn.Parameter(torch.zeros(offset, dtype=dtype), requires_grad=False),
                                          self._load_shard)

    def _load_shard(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str) -> None:
        if shard_id not in self.shard_offsets:
            raise ValueError(f"fused weight has no part {shard_id!r}; parts are {list(self.shard_offsets)}")
        offset, size = self.shard_offsets[shard_id]
        target = param.data.narrow(0, offset, size)
        if shard_id in self.source_slices:
            start, length, full = self.source_slices[shard_id]
            if loaded.dim() == 0 or loaded.shape[0] != full:
                raise ValueError(f"shape {tuple(loaded.shape)} does not fit part [{shard_id}] of the fused parameter "
                                 f"(expected {full} rows before the tensor-parallel split)")
            loaded = loaded.narrow(0, start, length)
        _check_shape(target, loaded, f"part [{shard_id}] of the fused parameter")
        with torch.no_grad():
            target.copy_(loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def split(self, y: torch.Tensor) -> list[torch.Tensor]:
        return list(y.split([size for _, size in self.shard_offsets.values()], dim=-1))


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = set_weight_loader(nn.Parameter(torch.empty(out_features, in_features, dtype=dtype),
                                                     requires_grad=False), default_weight_loader)
        self.bias = None
        if bias:
            self.bias = set_weight_loader(nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False),
                                          default_weight_loader)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_r W_r^T) + b: this rank holds columns [start, start + in/tp) of the HF weight;
    the bias (replicated) is added once, after the sum."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, tp: TPInfo) -> None:
        super().__init__()
        from slime.engine.parallel import shard_range

        self.tp = tp
        self.full_in = in_features
        self.start, local = shard_range(in_features, tp.rank, tp.size, "row-parallel input dim")
        self.weight = set_weight_loader(nn.Parameter(torch.empty(out_features, local, dtype=dtype),
                                                     requires_grad=False), self._load_weight)
        self.bias = None
        if bias:
            self.bias = set_weight_loader(nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False),
                                          default_weight_loader)

    def _load_weight(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
        assert shard_id is None
        if loaded.dim() != 2 or loaded.shape[1] != self.full_in:
            raise ValueError(f"shape {tuple(loaded.shape)} does not fit the parameter of shape "
                             f"({param.shape[0]}, {self.full_in}) before the tensor-parallel split")
        default_weight_loader(param, loaded.narrow(1, self.start, param.shape[1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.tp.all_reduce(F.linear(x, self.weight))
        return y if self.bias is None else y + self.bias


class Embedding(nn.Module):
    def __init__(self, num_embeddings: int, dim: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = set_weight_loader(nn.Parameter(torch.empty(num_embeddings, dim, dtype=dtype), requires_grad=False),
                                        default_weight_loader)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class RMSNorm(nn.Module):
    """Normalises in float32 and multiplies by the weight in the input dtype, as the HF models do.
    With `fused` set (`DecoderForCausalLM.set_fused_ops`), one Triton kernel computes the same."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = set_weight_loader(nn.Parameter(torch.ones(dim, dtype=dtype), requires_grad=False),
                                        default_weight_loader)
        self.fused = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            from slime.engine.kernels.fused_ops import rms_norm

            return rms_norm(x, self.weight, self.eps)
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_inverse_frequencies(hf_config: Any, head_dim: int) -> tuple[torch.Tensor, float]:
    """(inv_freq, attention_scaling) for the checkpoint's RoPE; non-default types use HF's formulas."""
    params = dict(getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    if rope_type == "default":
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        return inv_freq, 1.0
    if rope_type == "dynamic":
        raise ValueError(f"{hf_config.name_or_path}/config.json: rope type 'dynamic' is not supported by the built-in engine")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"{hf_config.name_or_path}/config.json: unknown rope type {rope_type!r}")
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, "cpu")
    return inv_freq.float(), float(scaling)


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE with a precomputed float32 cos/sin table indexed by absolute position."""

    def __init__(self, hf_config: Any, head_dim: int, max_positions: int) -> None:
        super().__init__()
        inv_freq, scaling = rope_inverse_frequencies(hf_config, head_dim)
        freqs = torch.arange(max_positions, dtype=torch.int64).float()[:, None] * inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        self.register_buffer("cos", emb.cos() * scaling, persistent=False)
        self.register_buffer("sin", emb.sin() * scaling, persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos = self.cos[positions].to(q.dtype).unsqueeze(1)  # [tokens, 1, head_dim]
        sin = self.sin[positions].to(q.dtype).unsqueeze(1)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)
