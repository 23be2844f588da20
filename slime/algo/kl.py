"""Per-token KL estimators between two policies' log-probs (Schulman's k1/k2/k3).

    python -c "import torch; from slime.algo.kl import compute_approx_kl; print(compute_approx_kl(torch.tensor([-1.0]), torch.tensor([-2.0]), 'k3'))"

Used for the KL loss (`--use-kl-loss`, `--kl-loss-type`) and for KL reward shaping (`--kl-coef`).
With r = log_probs - ref_log_probs:
  k1 = r;  k2 = r**2 / 2;  k3 = exp(-r) - 1 + r;  low_var_kl = k3 clamped to [-10, 10].
"""

from __future__ import annotations

import torch
from torch import Tensor

KL_TYPES = ("k1", "k2", "k3", "low_var_kl")
LOW_VAR_KL_BOUND = 10.0


def compute_approx_kl(
    log_probs: Tensor,
    ref_log_probs: Tensor,
    kl_type: str,
    *,
    importance_ratio: Tensor | None = None,
) -> Tensor:
    """Elementwise KL(pi || ref) estimate in float32 (float64 stays float64).

    `importance_ratio` (pi / pi_old, as for `--use-unbiased-kl`) multiplies the estimate before the
    low_var_kl clamp, as in the original.
    """
    if kl_type not in KL_TYPES:
        raise ValueError(f"--kl-loss-type must be one of {', '.join(KL_TYPES)}, got {kl_type!r}")
    if log_probs.shape != ref_log_probs.shape:
        raise ValueError(
            f"log_probs {tuple(log_probs.shape)} and ref_log_probs {tuple(ref_log_probs.shape)} differ in shape"
        )
    dtype = torch.promote_types(torch.promote_types(log_probs.dtype, ref_log_probs.dtype), torch.float32)
    log_ratio = log_probs.to(dtype) - ref_log_probs.to(dtype)
    if kl_type == "k1":
        kl = log_ratio
    elif kl_type == "k2":
        kl = log_ratio.square() / 2.0
    else:
        kl = torch.expm1(-log_ratio) + log_ratio
    if importance_ratio is not None:
        kl = importance_ratio * kl
    if kl_type == "low_var_kl":
        kl = kl.clamp(min=-LOW_VAR_KL_BOUND, max=LOW_VAR_KL_BOUND)
    return kl
