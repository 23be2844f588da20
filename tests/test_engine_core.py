"""The engine core against Hugging Face: greedy tokens, log-probs, model families, weight loading.

    cd /work/main && python -m pytest -q tests/test_engine_core.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_engine_core_checkpoint import ENGINE_PROMPTS, sharpened_checkpoint, tiny_moe_checkpoint

from slime.engine import EngineConfig, LLMEngine, SamplingParams

PROMPTS = ENGINE_PROMPTS


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def qwen3_dir(sharp_tiny_dir) -> Path:
    return sharp_tiny_dir


def hf_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new_tokens)
    return out[0, len(prompt):].tolist()


def hf_logprobs(model, prompt: list[int], response: list[int], temperature: float) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0].float()
    logprobs = torch.log_softmax(logits / temperature, dim=-1)
    positions = torch.arange(len(prompt) - 1, len(prompt) + len(response) - 1)
    return logprobs[positions, torch.tensor(response)]


def assert_greedy_matches_hf(path: Path, max_new_tokens: int = 24) -> None:
    engine = LLMEngine(EngineConfig(str(path), kv_cache_tokens=4096))
    results = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens))
    model = hf_model(path)
    for prompt, result in zip(PROMPTS, results):
        expected = hf_greedy(model, prompt, max_new_tokens)
        assert result["token_ids"] == expected, prompt
        reference = hf_logprobs(model, prompt, result["token_ids"], 1.0)
        torch.testing.assert_close(torch.tensor(result["logprobs"]), reference, atol=1e-4, rtol=0)
    generated = [t for r in results for t in r["token_ids"]]
    assert len(set(generated)) > 10 and len(generated) > 2 * max_new_tokens  # informative, not one repeated token


def test_greedy_tokens_and_logprobs_match_hf_qwen3(qwen3_dir):
    assert_greedy_matches_hf(qwen3_dir)


@pytest.mark.parametrize("preset", ["tiny-qwen2", "tiny-llama"])
def test_greedy_matches_hf_other_families(preset, tiny_model_factory, tmp_path):
    assert_greedy_matches_hf(sharpened_checkpoint(tiny_model_factory(preset), tmp_path / preset, seed=2), 16)


def test_qwen3_moe_matches_hf_from_disk_and_from_a_trainer_state_dict(tmp_path):
    path = tiny_moe_checkpoint(tmp_path / "moe", seed=4)
    assert_greedy_matches_hf(path, 12)  # per-expert checkpoint names
    other = hf_model(tiny_moe_checkpoint(tmp_path / "moe-other", seed=5))
    assert any(name.endswith("mlp.experts.gate_up_proj") for name in other.state_dict())  # v5 stacked names
    engine = LLMEngine(EngineConfig(str(path), kv_cache_tokens=4096))
    engine.load_weights(other.state_dict().items())
    params = SamplingParams(temperature=0.0, max_new_tokens=12)
    fresh = LLMEngine(EngineConfig(str(tmp_path / "moe-other"), kv_cache_tokens=4096))
    assert [r["token_ids"] for r in engine.generate(PROMPTS, params)] == [
        r["token_ids"] for r in fresh.generate(PROMPTS, params)]


def test_llama3_rope_scaling_matches_hf(tiny_model_factory, tmp_path):
    path = sharpened_checkpoint(tiny_model_factory("tiny-llama"), tmp_path / "llama3", seed=3)
    config = json.loads((path / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    (path / "config.json").write_text(json.dumps(config))
    prompt = list(range(30, 130))  # positions past original_max_position_embeddings
    engine = LLMEngine(EngineConfig(str(path), kv_cache_tokens=4096))
    [result] = engine.generate([prompt], SamplingParams(temperature=0.0, max_new_tokens=12))
    assert result["token_ids"] == hf_greedy(hf_model(path), prompt, 12)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logprobs_match_hf_forward(qwen3_dir, temperature):
    engine = LLMEngine(EngineConfig(str(qwen3_dir), kv_cache_tokens=4096))
    params = [SamplingParams(temperature=temperature, top_p=0.9, top_k=50, max_new_tokens=20, seed=i, ignore_eos=True)
              for i in range(len(PROMPTS))]
    results = engine.generate(PROMPTS, params)
    model = hf_model(qwen3_dir)
    for prompt, result in zip(PROMPTS, results):
        assert len(result["token_ids"]) == 20
        reference = hf_logprobs(model, prompt, result["token_ids"], temperature)
        # Truncation (top-p/top-k) must not change the reported log-prob: it is the untruncated one.
        torch.testing.assert_close(torch.tensor(result["logprobs"]), reference, atol=1e-4, rtol=0)


def test_finish_reasons_match_sglang_shape(qwen3_dir):
    engine = LLMEngine(EngineConfig(str(qwen3_dir), kv_cache_tokens=4096))
    [result] = engine.generate([PROMPTS[0]], SamplingParams(temperature=0, max_new_tokens=5))
    assert result["finish_reason"] == {"type": "length", "length": 5}
    stop_at = result["token_ids"][2]
    [stopped] = engine.generate([PROMPTS[0]], SamplingParams(temperature=0, max_new_tokens=5, stop_token_ids=[stop_at]))
    first = result["token_ids"].index(stop_at)
    assert stopped["token_ids"] == result["token_ids"][:first + 1]  # the matched id is kept, as in SGLang
    assert stopped["finish_reason"] == {"type": "stop", "matched": stop_at}


def test_load_weights_from_other_state_dict_matches_fresh_engine(qwen3_dir, tiny_model_dir, tmp_path):
    other = sharpened_checkpoint(tiny_model_dir, tmp_path / "other", seed=7)
    params = SamplingParams(temperature=0.0, max_new_tokens=16)
    fresh = LLMEngine(EngineConfig(str(other), kv_cache_tokens=4096)).generate(PROMPTS, params)

    engine = LLMEngine(EngineConfig(str(qwen3_dir), kv_cache_tokens=4096))
    before = engine.generate(PROMPTS, params)
    assert [r["token_ids"] for r in before] != [r["token_ids"] for r in fresh]
    state = hf_model(other).state_dict()
    items = sorted(state.items())
    for start in range(0, len(items), 5):  # a few tensors at a time, like bucketed weight sync
        engine.load_weights(items[start:start + 5])
    after = engine.generate(PROMPTS, params)
    assert [r["token_ids"] for r in after] == [r["token_ids"] for r in fresh]
    for a, f in zip(after, fresh):
        torch.testing.assert_close(torch.tensor(a["logprobs"]), torch.tensor(f["logprobs"]), atol=1e-4, rtol=0)

    engine.load_weights_from_disk(str(qwen3_dir))
    assert [r["token_ids"] for r in engine.generate(PROMPTS, params)] == [r["token_ids"] for r in before]


def test_weight_update_flushes_prefix_cache(qwen3_dir, tiny_model_dir, tmp_path):
    other = sharpened_checkpoint(tiny_model_dir, tmp_path / "other", seed=8)
    prompt = list(range(10, 60))
    params = SamplingParams(temperature=0.0, max_new_tokens=8)
    engine = LLMEngine(EngineConfig(str(qwen3_dir), kv_cache_tokens=4096, block_size=8))
    engine.generate([prompt], params)
    engine.add_request("again", prompt, params)
    assert engine.step()[0].cached_tokens == 48  # the finished request's blocks are reused
    engine.abort_all()
    engine.step()
    engine.load_weights_from_disk(str(other))
    engine.add_request("after-update", prompt, params)
    out = engine.step()[0]
    assert out.cached_tokens == 0
    engine.abort_all()
    fresh = LLMEngine(EngineConfig(str(other), kv_cache_tokens=4096)).generate([prompt], params)[0]
    assert engine.generate([prompt], params)[0]["token_ids"] == fresh["token_ids"]


def test_warmup_leaves_no_request_cache_or_random_state_behind(qwen3_dir):
    prompt = list(range(10, 60))
    unseeded = SamplingParams(temperature=1.0, max_new_tokens=8)
    warmed = LLMEngine(EngineConfig(str(qwen3_dir), kv_cache_tokens=4096, block_size=8))
    warmed.warmup()
    assert not warmed.requests and not warmed.block_manager.free_cached  # nothing running, no prefix cached
    assert warmed.block_manager.num_free_blocks == warmed.runner.num_blocks
    small = LLMEngine(EngineConfig(str(qwen3_dir), kv_cache_tokens=24, block_size=8))
    small.warmup()  # its prompts are sized to the cache, whatever the model's context length
    assert not small.requests
    fresh = LLMEngine(EngineConfig(str(qwen3_dir), kv_cache_tokens=4096, block_size=8))
    # the engine's own generator (unseeded requests) is where a fresh engine's is
    assert warmed.generate([prompt], unseeded)[0]["token_ids"] == fresh.generate([prompt], unseeded)[0]["token_ids"]


def test_sharded_checkpoint_loads(qwen3_dir, tiny_model_dir, tmp_path):
    sharded = sharpened_checkpoint(tiny_model_dir, tmp_path / "sharded", seed=1, max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").exists()
    assert len(list(sharded.glob("*.safetensors"))) > 2
    params = SamplingParams(temperature=0.0, max_new_tokens=12)
    single = LLMEngine(EngineConfig(str(qwen3_dir), kv_cache_tokens=4096)).generate(PROMPTS, params)
    multi = LLMEngine(EngineConfig(str(sharded), kv_cache_tokens=4096)).generate(PROMPTS, params)
    assert [r["token_ids"] for r in multi] == [r["token_ids"] for r in single]


def test_bad_weights_and_checkpoints_give_clear_errors(qwen3_dir, tmp_path):
    engine = LLMEngine(EngineConfig(str(qwen3_dir), kv_cache_tokens=4096))
    with pytest.raises(ValueError, match="model.layers.9.mlp.up_proj.weight"):
        engine.load_weights([("model.layers.9.mlp.up_proj.weight", torch.zeros(128, 64))])
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.k_proj.weight.*\(8, 64\).*\[k\]"):
        engine.load_weights([("model.layers.0.self_attn.k_proj.weight", torch.zeros(8, 64))])
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        engine.load_weights_from_disk(str(tmp_path))
    with pytest.raises(ValueError, match="--model-path"):
        EngineConfig(str(tmp_path / "missing"))
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("config.json", "generation_config.json"):
        (partial / name).write_text((Path(qwen3_dir) / name).read_text())
    from safetensors.torch import save_file

    save_file({"model.norm.weight": torch.ones(64)}, str(partial / "model.safetensors"))
    with pytest.raises(ValueError, match="lacks weights"):
        LLMEngine(EngineConfig(str(partial)))
