"""Seeded engine outputs pinned from before the CPU speed work: faster noise and prefill must not change them.

    cd /work/main && python -m pytest -q tests/test_engine_polish_pinned.py

The expected values were computed with the engine as committed in 00f2be3 (per-sequence prefill loop,
int64 hash noise), on the sharpened tiny Qwen3 checkpoint the core tests use.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from slime.engine import EngineConfig, LLMEngine, SamplingParams
from slime.engine.sampler import uniform_noise

PROMPTS = [[40, 41, 42, 43], [5, 6, 7], [100, 3, 200, 17, 9, 250, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23],
           [77]]
PARAMS = [SamplingParams(temperature=1.0, max_new_tokens=12, seed=11, ignore_eos=True),
          SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=12, seed=2**40 + 5, ignore_eos=True),
          SamplingParams(temperature=1.3, top_k=20, min_p=0.02, max_new_tokens=12, seed=3, ignore_eos=True),
          SamplingParams(temperature=0.0, max_new_tokens=12)]
PINNED_TOKENS = [[207, 23, 83, 305, 0, 42, 82, 311, 137, 259, 294, 59],
                 [277, 167, 186, 105, 80, 110, 296, 130, 41, 283, 167, 280],
                 [17, 266, 147, 159, 192, 192, 67, 52, 0, 285, 249, 144],
                 [80, 0]]
PINNED_FIRST_LOGPROBS = [[-1.16288, -1.46023, -1.50759], [-1.98214, -0.00748, -0.2509], [-1.667, -4.25379, -4.43355],
                         [-1.63378, -1.51595]]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_dir(sharp_tiny_dir) -> Path:
    return sharp_tiny_dir


def test_noise_bits_are_pinned():
    u = uniform_noise(torch.tensor([0, 7, 2**62 + 12345]), torch.tensor([0, 3, 100]), 320)
    bits = (u.double() * 2**24 - 0.5).round().long()
    assert torch.equal((bits.float() + 0.5) / float(1 << 24), u)  # u = (24 hash bits + 0.5) / 2**24 in float32
    assert bits[:, [0, 1, 17, 319]].tolist() == [[5525807, 3595162, 10673632, 6028285],
                                                [4558865, 5465698, 5330451, 2212019],
                                                [897401, 16165888, 3531264, 8270096]]
    assert int((bits * torch.arange(320)).sum()) == 1250018231494


def test_seeded_outputs_are_pinned(model_dir):
    engine = LLMEngine(EngineConfig(str(model_dir), kv_cache_tokens=1024, block_size=4))
    results = engine.generate(PROMPTS, PARAMS)
    assert [r["token_ids"] for r in results] == PINNED_TOKENS
    for result, pinned in zip(results, PINNED_FIRST_LOGPROBS):
        torch.testing.assert_close(torch.tensor(result["logprobs"][:3]), torch.tensor(pinned), atol=2e-5, rtol=0)


def test_pinned_outputs_hold_in_a_different_batch(model_dir):
    """Reversed order, chunked into separate prefills by a small token budget, and with extra neighbours."""
    engine = LLMEngine(EngineConfig(str(model_dir), kv_cache_tokens=1024, block_size=4, max_num_batched_tokens=8))
    extra = [SamplingParams(temperature=0.9, max_new_tokens=5, seed=99 + i) for i in range(3)]
    prompts = [[9, 8, 7, 6, 5]] * 3 + PROMPTS[::-1]
    results = engine.generate(prompts, extra + PARAMS[::-1])[3:][::-1]
    assert [r["token_ids"] for r in results] == PINNED_TOKENS
