"""Settings of the built-in engine, one object per engine process.

    from slime.engine.config import EngineConfig
    config = EngineConfig("/path/to/hf-checkpoint", device="cpu", kv_cache_tokens=4096)

The server maps `--sglang-<flag>` / `--<flag>` options onto these fields (`--mem-fraction-static`,
`--context-length`, `--dtype`, `--max-running-requests` -> `max_num_seqs`, ...).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "half": torch.float16, "fp16": torch.float16,
}

DEFAULT_CPU_KV_CACHE_TOKENS = 32768
DEFAULT_CPU_KV_CACHE_BYTES = 2 * 2**30  # the CPU default shrinks for big models to stay within this


@dataclass
class EngineConfig:
    model_path: str
    dtype: str | None = None  # None / "auto": float32 on CPU; on GPU the checkpoint's, bf16 for an fp32 one
    device: str = "cpu"
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    block_size: int = 16
    kv_cache_tokens: int | None = None  # CPU default 32768 (at most 2 GiB); GPU: from mem_fraction_static
    mem_fraction_static: float = 0.85
    context_length: int | None = None  # default: the checkpoint's max_position_embeddings
    seed: int = 0
    enforce_eager: bool = False
    tp_size: int = 1
    # enqueue decode step N+1 before step N's tokens reach the host (overlap.py); None: on for CUDA at tp 1
    overlap_schedule: bool | None = None

    def __post_init__(self) -> None:
        if not os.path.isdir(self.model_path):
            raise ValueError(f"--model-path {self.model_path!r} is not a directory holding a Hugging Face checkpoint")
        if not os.path.isfile(os.path.join(self.model_path, "config.json")):
            raise ValueError(f"--model-path {self.model_path!r} has no config.json")
        if self.dtype is not None and self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"--dtype {self.dtype!r} is not supported; choose auto or one of {sorted(DTYPES)}")
        positive = {"max_num_seqs": "--max-running-requests", "max_num_batched_tokens": "--max-prefill-tokens",
                    "block_size": "--page-size"}
        for name, flag in positive.items():
            if getattr(self, name) < 1:
                raise ValueError(f"{flag} must be >= 1, got {getattr(self, name)}")
        if self.kv_cache_tokens is not None and self.kv_cache_tokens < self.block_size:
            raise ValueError(f"--max-total-tokens (kv_cache_tokens) must be >= the block size {self.block_size}, got {self.kv_cache_tokens}")
        if not 0.0 < self.mem_fraction_static < 1.0:
            raise ValueError(f"--mem-fraction-static must be in (0, 1), got {self.mem_fraction_static}")
        if self.context_length is not None and self.context_length < 2:
            raise ValueError(f"--context-length must be >= 2, got {self.context_length}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"--device {self.device!r} must be cpu or cuda[:N]")
        from slime.engine.parallel import check_tp_size

        check_tp_size(self.model_path, self.tp_size, self.device)
        if self.overlap_schedule and self.tp_size != 1:
            raise ValueError("--enable-overlap-schedule needs --tp-size 1 (the tensor-parallel workers take their "
                             "input tokens from the host)")

    @property
    def uses_overlap_schedule(self) -> bool:
        """Explicit on/off wins; by default on where it pays (a CUDA device waits on the host between steps;
        verified equal to the step-by-step engine on H200), off on CPU and with tensor parallelism."""
        if self.overlap_schedule is not None:
            return self.overlap_schedule
        return self.device.startswith("cuda") and self.tp_size == 1

    def resolve_dtype(self, checkpoint_dtype: str | torch.dtype | None) -> torch.dtype:
        """Explicit --dtype wins; otherwise float32 on CPU (exact), and on GPU the checkpoint's dtype except
        float32, which decodes in bfloat16 (SGLang and vLLM also never run `auto` in fp32: an fp32 decode step
        of Qwen3-0.6B at batch 256 took 14 ms against 3.9 ms in bf16 on an H200). `--dtype float32` keeps fp32."""
        if self.dtype not in (None, "auto"):
            return DTYPES[self.dtype]
        if self.device == "cpu":
            return torch.float32
        resolved = torch.bfloat16
        if isinstance(checkpoint_dtype, torch.dtype):
            resolved = checkpoint_dtype
        elif isinstance(checkpoint_dtype, str) and checkpoint_dtype.replace("torch.", "") in DTYPES:
            resolved = DTYPES[checkpoint_dtype.replace("torch.", "")]
        return torch.bfloat16 if resolved == torch.float32 else resolved
