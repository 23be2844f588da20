"""GPU kernels of the built-in engine (Triton): paged attention, KV stores and on-GPU sampling.

    from slime.engine.kernels import triton_available
    if triton_available(device): from slime.engine.kernels.paged_attention import TritonPagedAttention

Everything here is optional: without Triton (CPU-only installs) the engine keeps its torch reference
paths. `TRITON_INTERPRET=1` runs the kernels on CPU tensors (slow; tests only).
"""

from __future__ import annotations

import importlib.util
import os

import torch


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_available(device: torch.device | str) -> bool:
    """True where the Triton kernels can run on tensors of `device` (CUDA, or CPU under the interpreter)."""
    if not triton_installed():
        return False
    if torch.device(device).type == "cuda":
        return torch.cuda.is_available()
    return os.environ.get("TRITON_INTERPRET") == "1"
