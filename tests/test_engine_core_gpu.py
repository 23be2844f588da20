"""The engine core on CUDA: HF parity in float32, bf16 from the checkpoint, KV sizing, memory release.

    cd /work/main && python -m pytest -q tests/test_engine_core_gpu.py   # skips without CUDA
"""

from __future__ import annotations

import pytest
import torch
from test_engine_core_checkpoint import sharpened_checkpoint

from slime.engine import EngineConfig, LLMEngine, SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
PROMPTS = [[40, 41, 42, 43], [5, 6, 7], list(range(100, 140)), [77]]


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir, tmp_path_factory):
    return sharpened_checkpoint(tiny_model_dir, tmp_path_factory.mktemp("sharp-gpu"), seed=1)


def test_cuda_float32_matches_hf(model_dir):
    from transformers import AutoModelForCausalLM

    engine = LLMEngine(EngineConfig(str(model_dir), device="cuda", dtype="float32", kv_cache_tokens=4096))
    results = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=16))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).cuda().eval()
    for prompt, result in zip(PROMPTS, results):
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt], device="cuda"), do_sample=False, max_new_tokens=16)
            expected = out[0, len(prompt):].tolist()
            logits = model(torch.tensor([prompt + expected], device="cuda")).logits[0].float()
        assert result["token_ids"] == expected
        reference = torch.log_softmax(logits, -1)[torch.arange(len(prompt) - 1, len(out[0]) - 1), torch.tensor(expected)]
        torch.testing.assert_close(torch.tensor(result["logprobs"]), reference.cpu(), atol=2e-3, rtol=0)  # TF32 matmuls


def test_cuda_bfloat16_sizing_and_memory_release(model_dir):
    engine = LLMEngine(EngineConfig(str(model_dir), device="cuda", dtype="bfloat16", mem_fraction_static=0.3))
    assert engine.runner.dtype == torch.bfloat16 and engine.runner.num_blocks > 1000  # sized from device memory
    params = [SamplingParams(temperature=1.0, max_new_tokens=16, seed=i, ignore_eos=True) for i in range(len(PROMPTS))]
    before = engine.generate(PROMPTS, params)
    assert all(len(r["token_ids"]) == 16 for r in before)
    allocated = torch.cuda.memory_allocated()
    engine.release_memory(None)
    assert torch.cuda.memory_allocated() < allocated / 2
    engine.resume_memory(["weights"])
    engine.resume_memory(["kv_cache"])
    after = engine.generate(PROMPTS, params)
    assert [r["token_ids"] for r in after] == [r["token_ids"] for r in before]


def test_cuda_graphs_and_triton_match_the_eager_reference(model_dir):
    from slime.engine.attention import TorchPagedAttention
    from slime.engine.sampler import Sampler

    params = [SamplingParams(temperature=0.0, max_new_tokens=20), SamplingParams(temperature=0.9, max_new_tokens=20,
                                                                                 seed=5, ignore_eos=True),
              SamplingParams(temperature=1.0, top_p=0.8, max_new_tokens=20, seed=6, ignore_eos=True),
              SamplingParams(temperature=0.0, max_new_tokens=20)]
    fast = LLMEngine(EngineConfig(str(model_dir), device="cuda", dtype="float32", kv_cache_tokens=4096, max_num_seqs=8))
    fast_results = fast.generate(PROMPTS, params)
    if fast.runner.decode_graphs is None:
        pytest.skip("Triton is not installed: the engine runs the reference path on CUDA")
    assert fast.runner.decode_graphs.captured
    eager = LLMEngine(EngineConfig(str(model_dir), device="cuda", dtype="float32", kv_cache_tokens=4096,
                                   enforce_eager=True))
    for layer in eager.runner.model.attention_layers():
        layer.backend = TorchPagedAttention()
    eager.runner.sampler = Sampler()
    for fast_result, eager_result in zip(fast_results, eager.generate(PROMPTS, params)):
        assert fast_result["token_ids"] == eager_result["token_ids"]
        torch.testing.assert_close(torch.tensor(fast_result["logprobs"]), torch.tensor(eager_result["logprobs"]),
                                   atol=2e-3, rtol=0)
