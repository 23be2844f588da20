"""Fused Triton versions of the decoder's small elementwise ops, called by the model's modules when enabled.

    model.set_fused_ops(True)   # model: slime.engine.models.decoder.DecoderForCausalLM on CUDA; checks `fusable`

A decode step of a small model is bound by kernel count, not bytes: torch runs RMSNorm as ~7
kernels, rotary embedding as ~10 per tensor, SiLU-and-multiply as 2. Here each is one kernel:
`rms_norm` (any row layout), `qk_norm_rope` (Qwen3's per-head q/k RMSNorm plus RoPE for q and k,
written to contiguous outputs; RoPE only for models without q/k norm) and `silu_and_mul`. They
reproduce the torch modules' rounding (normalise in float32, cast, multiply by the weight in the
model dtype; RoPE products rounded as torch rounds them), so results match the eager modules up to
the last bit of exp/rsqrt. The RMSNorm, Attention and MLP modules (slime/engine/models) call them
when their `fused` flag is set; parameters, buffers and state dicts are the same either way.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, rows_per_group, stride_xg, stride_xr, stride_og, stride_or, eps,
                     N: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    group = row // rows_per_group
    inner = row % rows_per_group
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(x_ptr + group.to(tl.int64) * stride_xg + inner * stride_xr + offs, mask=mask, other=0.0)
    x32 = x.to(tl.float32)
    inv = tl.rsqrt(tl.sum(x32 * x32, 0) / N + eps)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    y = w.to(tl.float32) * (x32 * inv).to(x.dtype).to(tl.float32)
    tl.store(out_ptr + group.to(tl.int64) * stride_og + inner * stride_or + offs, y.to(out_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _qk_norm_rope_kernel(x_ptr, w_ptr, cos_ptr, sin_ptr, pos_ptr, out_ptr, heads, stride_xt, stride_xh, eps,
                         HALF: tl.constexpr, HAS_NORM: tl.constexpr):
    row = tl.program_id(0)
    token = row // heads
    head = row % heads
    offs = tl.arange(0, HALF)
    base = x_ptr + token.to(tl.int64) * stride_xt + head * stride_xh
    x1 = tl.load(base + offs)
    x2 = tl.load(base + HALF + offs)
    dtype = x1.dtype
    if HAS_NORM:
        a = x1.to(tl.float32)
        b = x2.to(tl.float32)
        inv = tl.rsqrt((tl.sum(a * a, 0) + tl.sum(b * b, 0)) / (2 * HALF) + eps)
        w1 = tl.load(w_ptr + offs).to(tl.float32)
        w2 = tl.load(w_ptr + HALF + offs).to(tl.float32)
        x1 = (w1 * (a * inv).to(dtype).to(tl.float32)).to(dtype)
        x2 = (w2 * (b * inv).to(dtype).to(tl.float32)).to(dtype)
    pos = tl.load(pos_ptr + token).to(tl.int64)
    cos = tl.load(cos_ptr + pos * (2 * HALF) + offs).to(dtype).to(tl.float32)  # the table halves are equal
    sin = tl.load(sin_ptr + pos * (2 * HALF) + offs).to(dtype).to(tl.float32)
    f1 = x1.to(tl.float32)
    f2 = x2.to(tl.float32)
    out1 = (f1 * cos).to(dtype).to(tl.float32) + (-f2 * sin).to(dtype).to(tl.float32)
    out2 = (f2 * cos).to(dtype).to(tl.float32) + (f1 * sin).to(dtype).to(tl.float32)
    out_base = out_ptr + row.to(tl.int64) * (2 * HALF)
    tl.store(out_base + offs, out1.to(dtype))
    tl.store(out_base + HALF + offs, out2.to(dtype))


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, N, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = col < N
    gate = tl.load(x_ptr + row.to(tl.int64) * stride_x + col, mask=mask, other=0.0)
    up = tl.load(x_ptr + row.to(tl.int64) * stride_x + N + col, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype).to(tl.float32)
    tl.store(out_ptr + row.to(tl.int64) * stride_o + col, (act * up.to(tl.float32)).to(out_ptr.dtype.element_ty),
             mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim of a 2-D or 3-D tensor whose last dim is contiguous; returns a new tensor."""
    assert x.stride(-1) == 1 and x.dim() in (2, 3)
    n = x.shape[-1]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return out
    if x.dim() == 2:
        groups, per_group, sx, so = x.shape[0], 1, (x.stride(0), 0), (out.stride(0), 0)
    else:
        groups, per_group, sx, so = x.shape[0], x.shape[1], (x.stride(0), x.stride(1)), (out.stride(0), out.stride(1))
    _rms_norm_kernel[(groups * per_group,)](x, weight, out, per_group, sx[0], sx[1], so[0], so[1], eps, N=n,
                                             BLOCK=triton.next_power_of_2(n), num_warps=4 if n >= 1024 else 1)
    return out


def qk_norm_rope(x: torch.Tensor, norm_weight: torch.Tensor | None, eps: float, cos: torch.Tensor, sin: torch.Tensor,
                 positions: torch.Tensor) -> torch.Tensor:
    """x [tokens, heads, head_dim] (rows contiguous) -> contiguous RoPE(RMSNorm(x)) (RMSNorm skipped without weight)."""
    tokens, heads, head_dim = x.shape
    assert x.stride(-1) == 1 and head_dim % 2 == 0 and cos.is_contiguous() and sin.is_contiguous()
    half = head_dim // 2
    assert half == triton.next_power_of_2(half), "fused RoPE needs a power-of-two half head dim"
    out = torch.empty(tokens, heads, head_dim, dtype=x.dtype, device=x.device)
    if tokens == 0:
        return out
    weight = norm_weight if norm_weight is not None else x  # unused without HAS_NORM
    _qk_norm_rope_kernel[(tokens * heads,)](x, weight, cos, sin, positions, out, heads, x.stride(0), x.stride(1), eps,
                                            HALF=half, HAS_NORM=norm_weight is not None, num_warps=1)
    return out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [tokens, 2 * n] = [gate | up] -> silu(gate) * up, [tokens, n]."""
    assert x.dim() == 2 and x.stride(-1) == 1 and x.shape[1] % 2 == 0
    tokens, n = x.shape[0], x.shape[1] // 2
    out = torch.empty(tokens, n, dtype=x.dtype, device=x.device)
    if tokens == 0:
        return out
    block = min(1024, triton.next_power_of_2(n))
    _silu_and_mul_kernel[(tokens, triton.cdiv(n, block))](x, out, x.stride(0), out.stride(0), n, BLOCK=block,
                                                         num_warps=4)
    return out


def fusable(model: Any) -> bool:
    """The fused ops cover SiLU MLPs, default-scaled RoPE tables and power-of-two head dims."""
    from slime.engine.models.decoder import MLP, Attention

    for module in model.modules():
        if isinstance(module, MLP) and module.act is not torch.nn.functional.silu:
            return False
        if isinstance(module, Attention):
            half = module.head_dim // 2
            if module.head_dim % 2 or half != triton.next_power_of_2(half):
                return False
            if module.rotary.cos.dtype != torch.float32 or not module.rotary.cos.is_contiguous():
                return False
    return True
