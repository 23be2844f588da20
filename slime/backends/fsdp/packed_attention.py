"""Causal attention over a packed row (several samples in one sequence) without cross-sample leakage.

    from slime.backends.fsdp.packed_attention import PACKED_ATTENTION, register, packed_attention_kwargs

Registered with transformers' `AttentionInterface` under the name `PACKED_ATTENTION`; a model built
with `attn_implementation=PACKED_ATTENTION` gets no dense mask from transformers (custom attention
names have no mask function), and each decoder layer's attention receives the kwargs of
`packed_attention_kwargs(seq_lengths, device)`, which `PolicyModel` / `ValueModel` pass to the HF
model's forward. Two kernels:

- CUDA with `torch.nn.attention.varlen.varlen_attn` (torch >= 2.9): one flash-attention varlen
  call per layer over the whole row, driven by `cu_seq_lens`.
- Otherwise (CPU, older torch): one causal `scaled_dot_product_attention` per sample (no TxT mask).

Used on CUDA when the flash_attn package is missing (`model.attention_implementation`).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

PACKED_ATTENTION = "slime_packed"
SEQ_LENGTHS_KEY = "slime_seq_lengths"


def _load_varlen() -> tuple[Callable | None, frozenset[str]]:
    """torch's varlen_attn and its keyword names (they changed between torch 2.9 and 2.11+)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, frozenset()
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


# resolved once at import: the attention runs inside compiled decoder layers (layer_compile.py), where
# plain module globals trace cleanly
_VARLEN_FN, _VARLEN_PARAMS = _load_varlen()


def has_varlen_kernel() -> bool:
    return _VARLEN_FN is not None


def _use_varlen(query: torch.Tensor) -> bool:
    return query.is_cuda and _VARLEN_FN is not None


def packed_attention_kwargs(seq_lengths: Sequence[int], device: torch.device | str) -> dict[str, Any]:
    """Keyword arguments for the HF model forward that describe the row's samples (lengths sum to the row).

    The Python list of lengths goes only where the per-sample fallback needs it: the varlen kernel reads
    `cu_seq_lens`, and a list input would make compiled layers recompile for every new sample count."""
    lengths = [int(n) for n in seq_lengths]
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    cu = torch.tensor(bounds, dtype=torch.int32)
    if torch.device(device).type == "cuda":
        cu = cu.pin_memory().to(device, non_blocking=True)
    longest = max(lengths) if lengths else 0
    kwargs: dict[str, Any] = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest,
                              "max_length_k": longest}
    if not (torch.device(device).type == "cuda" and has_varlen_kernel()):
        kwargs[SEQ_LENGTHS_KEY] = lengths
    return kwargs


def _repeat_heads(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, longest: int,
                      scale: float) -> torch.Tensor:
    """q [T, H, D], k/v [T, Hkv, D] -> [T, H, D] with one varlen flash call."""
    fn, params = _VARLEN_FN, _VARLEN_PARAMS
    assert fn is not None
    kwargs: dict[str, Any] = {}
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    if "is_causal" in params:  # torch 2.9
        kwargs["is_causal"] = True
    else:
        kwargs["window_size"] = (-1, 0)
    if "scale" in params:
        kwargs["scale"] = scale
    elif abs(scale - q.shape[-1] ** -0.5) > 1e-12:
        raise ValueError(f"attention scale {scale} needs torch varlen_attn with a `scale` argument")
    return fn(q, k, v, cu, cu, longest, longest, **kwargs)


def _per_sample_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: Sequence[int],
                          scale: float) -> torch.Tensor:
    """q [1, H, T, D], k/v [1, Hkv, T, D] -> [1, H, T, D], one causal sdpa per sample."""
    groups = q.shape[1] // k.shape[1]
    outs = []
    for qs, ks, vs in zip(q.split(list(lengths), dim=2), k.split(list(lengths), dim=2), v.split(list(lengths), dim=2)):
        outs.append(F.scaled_dot_product_attention(qs, _repeat_heads(ks, groups), _repeat_heads(vs, groups),
                                                   is_causal=True, scale=scale))
    return torch.cat(outs, dim=2)


def packed_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                             **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention-interface signature: q [1, H, T, D], k/v [1, Hkv, T, D] -> ([1, T, H, D], None)."""
    if query.shape[0] != 1:
        raise ValueError(f"{PACKED_ATTENTION} attention takes one packed row (batch 1), got batch {query.shape[0]}")
    if dropout:
        raise ValueError(f"{PACKED_ATTENTION} attention does not support attention dropout")
    total = query.shape[2]
    lengths = kwargs.get(SEQ_LENGTHS_KEY)
    if lengths is not None and sum(lengths) != total:
        raise ValueError(f"packed row has {total} tokens but its sample lengths sum to {sum(lengths)}")
    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    if _use_varlen(query):
        cu = kwargs.get("cu_seq_lens_q")
        if cu is None:
            cu = torch.tensor([0, total], dtype=torch.int32, device=query.device)
        longest = kwargs.get("max_length_q")  # an int, symbolic inside a compiled layer: no int() here
        if longest is None:
            longest = max(lengths) if lengths else total
        out = _varlen_attention(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1), cu,
                                longest, scale)
        return out.unsqueeze(0), None
    out = _per_sample_attention(query, key, value, lengths or [total], scale)
    return out.transpose(1, 2).contiguous(), None


_registered = False


def register() -> str:
    """Register the packed attention with transformers (idempotent); returns its attn_implementation name."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(PACKED_ATTENTION, packed_attention_forward)
        _registered = True
    return PACKED_ATTENTION
