"""Token log-probs and entropy from hidden states, projected to the vocabulary a chunk of tokens at a time.

    from slime.backends.fsdp.log_probs import chunked_log_probs_and_entropy

Only `chunk_size` rows of full-vocabulary fp32 logits exist at once. With autograd on, each chunk
is recomputed in backward (activation checkpointing), so the saved activations are the hidden
states, not the logits. Logits are divided by the sampling temperature first, as the engine does.
"""

from __future__ import annotations

import os
from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = logits.float()
    return logits / temperature if temperature != 1.0 else logits


def _picked_log_probs(logits: torch.Tensor, targets: torch.Tensor, temperature: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-prob of each target, log of the softmax normaliser) from [N, V] logits in any float dtype."""
    scaled = _scaled(logits, temperature)
    log_norm = torch.logsumexp(scaled, dim=-1)
    return scaled.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - log_norm, log_norm


def _entropy(logits: torch.Tensor, log_norm: torch.Tensor, temperature: float) -> torch.Tensor:
    scaled = _scaled(logits, temperature)
    return log_norm - (torch.softmax(scaled, dim=-1) * scaled).sum(-1)


_FUSED: dict[str, Callable] = {}


def fused_head_enabled(device: torch.device | str) -> bool:
    """SLIME_FSDP_COMPILE_HEAD=1: the per-token statistics over the vocabulary (fp32 cast, logsumexp, gather,
    entropy and their backward) run as compiled kernels that read the bf16 logits a few times instead of
    materialising fp32 [N, V] tensors at every step (the projection itself stays a plain matmul)."""
    return os.environ.get("SLIME_FSDP_COMPILE_HEAD", "0") == "1" and torch.device(device).type == "cuda"


def _fused_functions() -> tuple[Callable, Callable]:
    if not _FUSED:
        from slime.backends.fsdp.layer_compile import compile_backend

        backend = compile_backend("cuda")  # the head is compiled on CUDA only (fused_head_enabled)
        _FUSED["picked"] = torch.compile(_picked_log_probs, dynamic=True, backend=backend)
        _FUSED["entropy"] = torch.compile(_entropy, dynamic=True, backend=backend)
    return _FUSED["picked"], _FUSED["entropy"]


def _chunk_log_probs(hidden: torch.Tensor, targets: torch.Tensor, project: Callable[[torch.Tensor], torch.Tensor],
                     temperature: float, with_entropy: bool, entropy_grad: bool = True, fused: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    if fused:  # the compiled kernels cast the matmul's bf16 logits and divide by the temperature as they read
        picked_fn, entropy_fn = _fused_functions()
        logits, scale = project(hidden), float(temperature)
    else:  # one fp32 copy, already divided, that both statistics read
        picked_fn, entropy_fn = _picked_log_probs, _entropy
        logits, scale = _scaled(project(hidden), temperature), 1.0
    picked, log_norm = picked_fn(logits, targets, scale)
    if not with_entropy:
        return picked, torch.zeros_like(picked)
    if not entropy_grad:  # a metric only: no [N, V] tensors kept for backward
        with torch.no_grad():
            return picked, entropy_fn(logits.detach(), log_norm.detach(), scale)
    return picked, entropy_fn(logits, log_norm, scale)


def chunked_log_probs_and_entropy(hidden: torch.Tensor, targets: torch.Tensor,
                                  project: Callable[[torch.Tensor], torch.Tensor], *, temperature: float = 1.0,
                                  chunk_size: int = -1, with_entropy: bool = True, entropy_grad: bool = True,
                                  fused: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [N, H], targets [N] -> (log_probs [N], entropy [N]) in fp32; chunk_size <= 0 means one chunk.
    entropy_grad=False: the entropy carries no gradient (cheaper when it is only reported). fused: compiled
    vocabulary statistics (default: `fused_head_enabled`)."""
    assert hidden.shape[0] == targets.shape[0]
    if temperature <= 0:
        raise ValueError(f"--rollout-temperature must be > 0, got {temperature}")
    n = hidden.shape[0]
    if n == 0:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, empty.clone()
    fused = fused_head_enabled(hidden.device) if fused is None else fused
    size = n if chunk_size is None or chunk_size <= 0 else chunk_size
    recompute = torch.is_grad_enabled() and hidden.requires_grad and size < n
    log_probs, entropies = [], []
    for start in range(0, n, size):
        h, t = hidden[start:start + size], targets[start:start + size]
        if recompute:
            lp, ent = checkpoint(_chunk_log_probs, h, t, project, temperature, with_entropy, entropy_grad, fused,
                                 use_reentrant=False)
        else:
            lp, ent = _chunk_log_probs(h, t, project, temperature, with_entropy, entropy_grad, fused)
        log_probs.append(lp)
        entropies.append(ent)
    return torch.cat(log_probs), torch.cat(entropies)
