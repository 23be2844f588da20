"""Checkpoints with informative weights for the engine-core tests, and a check that they are.

    cd /work/main && python -m pytest -q tests/test_engine_core_checkpoint.py

`tools/make_tiny_model.py` initialises like HF (std 0.02), so its greedy output just repeats the last
prompt token — any engine would "match". `sharpened_checkpoint` redraws every weight at a
scale where logits are peaked but not one-hot, so token choices depend on the whole context.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

# prompts of different lengths (1 to 19 tokens) shared by the engine tests
ENGINE_PROMPTS = [[40, 41, 42, 43], [5, 6, 7], [100, 3, 200, 17, 9, 250, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23],
                  [77], [300, 301, 302, 303, 304, 305, 306, 307, 308]]


def sharpen_(model: torch.nn.Module, seed: int) -> None:
    """Redraw every weight in place at informative scales (fan-in scaled, gain 2; sharp Qwen3 attention)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith(("q_norm.weight", "k_norm.weight")):  # Qwen3: sharper attention
                param.copy_(3.0 + 0.2 * noise)
            elif name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                param.copy_(0.2 * noise)
            elif "embed_tokens" in name or name == "lm_head.weight":
                param.copy_(0.35 * noise)
            else:
                param.copy_(2.0 * noise / math.sqrt(param.shape[-1]))


def sharpened_checkpoint(source: Path, output: Path, seed: int = 0, max_shard_size: str | None = None) -> Path:
    """Copy `source` (config, tokenizer) to `output` with weights redrawn at informative scales."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32)
    sharpen_(model, seed)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(output), safe_serialization=True, **kwargs)
    AutoTokenizer.from_pretrained(str(source)).save_pretrained(str(output))
    GenerationConfig.from_pretrained(str(source)).save_pretrained(str(output))
    return output


def tiny_moe_checkpoint(output: Path, seed: int = 0) -> Path:
    """A Qwen3-MoE checkpoint (4 experts, top-2, one dense layer) with sharpened weights; no tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "qwen3_moe", hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=320, num_experts=4,
        num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[1], norm_topk_prob=True,
        tie_word_embeddings=False, max_position_embeddings=512, eos_token_id=2, bos_token_id=0, pad_token_id=0,
        architectures=["Qwen3MoeForCausalLM"])
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    sharpen_(model, seed)
    model.save_pretrained(str(output), safe_serialization=True)
    return output


def hf_greedy(path: Path, prompt: list[int], max_new_tokens: int) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new_tokens)
    return out[0, len(prompt):].tolist()


def test_sharpened_checkpoint_is_not_degenerate(tiny_model_dir, tmp_path):
    path = sharpened_checkpoint(tiny_model_dir, tmp_path / "sharp")
    tokens = hf_greedy(path, [40, 41, 42, 43], 24)
    assert len(set(tokens)) >= 8, tokens  # not a repeat of the last prompt token
