"""torch.compile each HF decoder layer in place, before FSDP2 shards it (opt-in: SLIME_FSDP_COMPILE=layer).

    from slime.backends.fsdp.layer_compile import compile_mode, compile_decoder_layers
    if compile_mode() == "layer":
        compile_decoder_layers(hf_model, device)   # then fully_shard each layer as usual

The eager HF layer plus FSDP2 issues a few hundred small ops per layer and direction, so at
4k-token micro-batches the step waits on the host. Compiling the whole layer (norms, projections,
rotary, attention, MLP, residuals) gives inductor one graph to fuse: far fewer launches.

How it fits the rest of the trainer:
- `nn.Module.compile()` compiles the module's call in place: no wrapper module, so state-dict
  names, checkpoints, HF export and weight sync see the same names as eager.
- It runs before `fully_shard`; FSDP2's unshard/reshard hooks are dynamo-disabled, so they stay
  eager around the compiled graph.
- HF gradient checkpointing (`--recompute-granularity full`) wraps the layer call, so the
  recomputation re-runs the compiled graph.
- Packed rows change length every micro-batch: on CUDA the length (and the sample count of
  `cu_seq_lens`) is symbolic from the first call, so one graph serves every length and an SFT stage's
  compile serves the RL run after it from the inductor cache (SLIME_FSDP_COMPILE_DYNAMIC=0: dynamo's
  automatic dynamic shapes, static first and symbolic at the first change, the CPU default). The packed varlen
  attention is a torch custom op (`torch.nn.attention.varlen`), which dynamo traces; the per-sample
  CPU fallback traces too (a new sample count is a recompile).
- All layers share one code object, so the recompile limits are raised to cover every layer, grad
  and no-grad modes and a few shapes; past them dynamo runs the layer eagerly (slower, still correct).

Backend: inductor on CUDA, `aot_eager` on CPU (SLIME_FSDP_COMPILE_BACKEND overrides both).
"""

from __future__ import annotations

import logging
import os

from torch import nn

logger = logging.getLogger(__name__)

MODES = ("0", "1", "layer")


def compile_mode() -> str:
    """SLIME_FSDP_COMPILE: "0" eager (default), "1" compiled elementwise ops (fused_ops.py), "layer" this file."""
    mode = os.environ.get("SLIME_FSDP_COMPILE", "0").strip() or "0"
    if mode not in MODES:
        raise ValueError(f"SLIME_FSDP_COMPILE={mode!r}: expected one of {', '.join(MODES)}")
    return mode


def compile_backend(device: str) -> str:
    return os.environ.get("SLIME_FSDP_COMPILE_BACKEND") or ("inductor" if device == "cuda" else "aot_eager")


def compile_dynamic(device: str) -> bool | None:
    """SLIME_FSDP_COMPILE_DYNAMIC: "1" symbolic lengths from the first call, "0" dynamo's automatic dynamic
    shapes (static first, symbolic at the first new length: two compiles). Unset: "1" on CUDA (one compile per
    run, which the inductor cache then serves to the next run with any lengths; 4B training within 1% of
    static), "0" on CPU."""
    value = os.environ.get("SLIME_FSDP_COMPILE_DYNAMIC", "").strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"SLIME_FSDP_COMPILE_DYNAMIC={value!r}: expected 0 or 1")
    if value == "":
        value = "1" if str(device).startswith("cuda") else "0"
    return True if value == "1" else None


def _raise_recompile_limits(num_layers: int) -> None:
    import torch._dynamo

    config = torch._dynamo.config
    wanted = 4 * num_layers + 16
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), wanted))
            break
    for name in ("accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), 4 * wanted))
            break


def compile_decoder_layers(hf_model: nn.Module, device: str) -> int:
    """Compile every `hf_model.model.layers[i]` in place; returns how many. Call before fully_shard."""
    from slime.backends.fsdp.model import decoder_layers

    layers = decoder_layers(hf_model)
    backend = compile_backend(device)
    dynamic = compile_dynamic(device)
    _raise_recompile_limits(len(layers))
    for layer in layers:
        layer.compile(backend=backend, dynamic=dynamic)
    logger.info("compiled %d decoder layers (backend %s, dynamic %s)", len(layers), backend, dynamic)
    return len(layers)


def compiled_layer_count(model: nn.Module) -> int:
    """How many sub-modules of `model` carry an in-place compiled call (for reports)."""
    return sum(getattr(m, "_compiled_call_impl", None) is not None for m in model.modules())


def reset_compile_caches() -> None:
    """Forget compiled graphs (tests that build eager and compiled models in one process)."""
    import torch._dynamo

    torch._dynamo.reset()
