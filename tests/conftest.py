"""Shared fixtures: tiny checkpoints made on the fly (no downloads).

    python -m pytest -q tests
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if not __import__("torch").cuda.is_available():
    # the Triton kernel tests run under Triton's interpreter on CPU; the mode must be on before anything
    # (torch.compile, FSDP, ...) touches Triton, or a later kernel test sees compiled-mode JIT functions
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A ~100k-parameter Qwen3 checkpoint with tokenizer and chat template."""
    from tools.make_tiny_model import make_model

    return make_model("tiny", tmp_path_factory.mktemp("tiny-qwen3"), seed=0)


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    """Make any preset once per session: `tiny_model_factory("tiny-llama")`."""
    from tools.make_tiny_model import make_model

    made: dict[tuple[str, int], Path] = {}

    def make(preset: str = "tiny", seed: int = 0) -> Path:
        key = (preset, seed)
        if key not in made:
            made[key] = make_model(preset, tmp_path_factory.mktemp(f"{preset}-{seed}"), seed=seed)
        return made[key]

    return make


@pytest.fixture(scope="session")
def sharp_tiny_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny checkpoint with informative weights (tests/test_engine_core_checkpoint.py), made once."""
    from test_engine_core_checkpoint import sharpened_checkpoint

    return sharpened_checkpoint(tiny_model_dir, tmp_path_factory.mktemp("sharp-tiny"), seed=1)


@pytest.fixture
def one_torch_thread():
    """Engine tests compare bits across runs: one intra-op thread keeps reductions in one order."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
