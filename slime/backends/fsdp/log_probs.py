"""Token log-probs and entropy from hidden states, projected to the vocabulary a chunk of tokens at a time.

    from slime.backends.fsdp.log_probs import chunked_log_probs_and_entropy

Only `chunk_size` rows of full-vocabulary fp32 logits exist at once. With autograd on, each chunk
is recomputed in backward (activation checkpointing), so the saved activations are the hidden
states, not the logits. Logits are divided by the sampling temperature first, as the engine does.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint


def _chunk_log_probs(hidden: torch.Tensor, targets: torch.Tensor, project: Callable[[torch.Tensor], torch.Tensor],
                     temperature: float, with_entropy: bool, entropy_grad: bool = True
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    logits = project(hidden).float()
    if temperature != 1.0:
        logits = logits / temperature
    log_norm = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - log_norm
    if not with_entropy:
        return picked, torch.zeros_like(picked)
    if not entropy_grad:  # a metric only: no [N, V] tensors kept for backward
        with torch.no_grad():
            return picked, log_norm.detach() - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    probs = torch.softmax(logits, dim=-1)
    entropy = log_norm - (probs * logits).sum(-1)
    return picked, entropy


def chunked_log_probs_and_entropy(hidden: torch.Tensor, targets: torch.Tensor,
                                  project: Callable[[torch.Tensor], torch.Tensor], *, temperature: float = 1.0,
                                  chunk_size: int = -1, with_entropy: bool = True, entropy_grad: bool = True
                                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [N, H], targets [N] -> (log_probs [N], entropy [N]) in fp32; chunk_size <= 0 means one chunk.
    entropy_grad=False: the entropy carries no gradient (cheaper when it is only reported)."""
    assert hidden.shape[0] == targets.shape[0]
    if temperature <= 0:
        raise ValueError(f"--rollout-temperature must be > 0, got {temperature}")
    n = hidden.shape[0]
    if n == 0:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, empty.clone()
    size = n if chunk_size is None or chunk_size <= 0 else chunk_size
    recompute = torch.is_grad_enabled() and hidden.requires_grad and size < n
    log_probs, entropies = [], []
    for start in range(0, n, size):
        h, t = hidden[start:start + size], targets[start:start + size]
        if recompute:
            lp, ent = checkpoint(_chunk_log_probs, h, t, project, temperature, with_entropy, entropy_grad,
                                 use_reentrant=False)
        else:
            lp, ent = _chunk_log_probs(h, t, project, temperature, with_entropy, entropy_grad)
        log_probs.append(lp)
        entropies.append(ent)
    return torch.cat(log_probs), torch.cat(entropies)
