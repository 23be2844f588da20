"""Maps a checkpoint's `architectures` entry to the engine model class and its variant.

    from slime.engine.models.registry import model_spec_for
    cls, variant = model_spec_for(hf_config)
"""

from __future__ import annotations

from typing import Any

from slime.engine.models.decoder import DecoderForCausalLM, DecoderVariant


def _qwen3(cfg: Any) -> DecoderVariant:
    bias = bool(getattr(cfg, "attention_bias", False))
    return DecoderVariant(qk_norm=True, qkv_bias=bias, o_bias=bias)


def _qwen3_moe(cfg: Any) -> DecoderVariant:
    bias = bool(getattr(cfg, "attention_bias", False))
    return DecoderVariant(qk_norm=True, qkv_bias=bias, o_bias=bias, moe=True)


def _qwen2(cfg: Any) -> DecoderVariant:
    return DecoderVariant(qkv_bias=True)


def _llama(cfg: Any) -> DecoderVariant:
    bias = bool(getattr(cfg, "attention_bias", False))
    return DecoderVariant(qkv_bias=bias, o_bias=bias, mlp_bias=bool(getattr(cfg, "mlp_bias", False)))


MODEL_REGISTRY = {
    "Qwen3ForCausalLM": (DecoderForCausalLM, _qwen3),
    "Qwen3MoeForCausalLM": (DecoderForCausalLM, _qwen3_moe),
    "Qwen2ForCausalLM": (DecoderForCausalLM, _qwen2),
    "LlamaForCausalLM": (DecoderForCausalLM, _llama),
}


def model_spec_for(hf_config: Any) -> tuple[type[DecoderForCausalLM], DecoderVariant]:
    architectures = getattr(hf_config, "architectures", None) or []
    if getattr(hf_config, "use_sliding_window", False):
        raise ValueError("config.json use_sliding_window=true is not supported by the built-in engine")
    for arch in architectures:
        if arch in MODEL_REGISTRY:
            cls, make_variant = MODEL_REGISTRY[arch]
            return cls, make_variant(hf_config)
    raise ValueError(f"config.json architectures {architectures} are not supported by the built-in engine; "
                     f"supported: {sorted(MODEL_REGISTRY)}")
