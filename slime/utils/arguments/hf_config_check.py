"""Megatron model-architecture flags vs the HF config: `check_architecture(args, given_flags)`, run by
`parse_args` under --train-backend fsdp when --hf-checkpoint is set.

Value flags are checked when given. The boolean flags (--swiglu, --untie-embeddings-and-output-weights,
--add-qkv-bias, --qk-layernorm) are checked when given, and also when absent once the flags describe
a model (--num-layers or --hidden-size given), because Megatron would then build the model without
them. --vocab-size may be larger than the HF vocab_size (Megatron pads the vocabulary).
config.json is read directly (transformers v5 moves rope_theta into rope_parameters).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from typing import Any

QK_LAYERNORM_MODEL_TYPES = ("qwen3", "qwen3_moe", "qwen3_next", "glm4_moe", "olmo2")
QKV_BIAS_MODEL_TYPES = ("qwen2", "qwen2_moe")
GATED_SILU_ACTS = ("silu", "swish")

VALUE_DESTS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
    "vocab_size", "max_position_embeddings", "rotary_base", "norm_epsilon", "num_experts", "moe_router_topk",
    "moe_ffn_hidden_size",
)
BOOLEAN_DESTS = ("untie_embeddings_and_output_weights", "add_qkv_bias", "qk_layernorm", "swiglu")

_MISSING = object()


def load_hf_config(hf_checkpoint: str) -> tuple[dict[str, Any], str]:
    path = os.path.join(hf_checkpoint, "config.json")
    try:
        with open(path) as f:
            config = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"--hf-checkpoint {hf_checkpoint} has no config.json") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"--hf-checkpoint: {path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if isinstance(config.get("text_config"), dict):
        config = {**config, **config["text_config"]}
    return config, path


def _first(config: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        if config.get(key) is not None:
            return key, config[key]
    return keys[0], _MISSING


def _rope_theta(config: dict[str, Any]) -> tuple[str, Any]:
    if config.get("rope_theta") is not None:
        return "rope_theta", config["rope_theta"]
    for holder in ("rope_parameters", "rope_scaling"):
        nested = config.get(holder)
        if isinstance(nested, dict) and nested.get("rope_theta") is not None:
            return f"{holder}.rope_theta", nested["rope_theta"]
    return "rope_theta", _MISSING


def _hf_values(config: dict[str, Any]) -> dict[str, tuple[str, Any]]:
    """Megatron dest -> (HF key, HF value) for the value flags."""
    heads_key, heads = _first(config, "num_attention_heads")
    hidden = config.get("hidden_size")
    head_dim = _first(config, "head_dim")
    if head_dim[1] is _MISSING and isinstance(hidden, int) and isinstance(heads, int) and heads:
        head_dim = ("head_dim (hidden_size / num_attention_heads)", hidden // heads)
    kv_heads = _first(config, "num_key_value_heads")
    if kv_heads[1] is _MISSING and heads is not _MISSING:
        kv_heads = ("num_key_value_heads (= num_attention_heads)", heads)
    return {
        "num_layers": _first(config, "num_hidden_layers", "num_layers"),
        "hidden_size": _first(config, "hidden_size"),
        "ffn_hidden_size": _first(config, "intermediate_size"),
        "num_attention_heads": (heads_key, heads),
        "num_query_groups": kv_heads,
        "kv_channels": head_dim,
        "vocab_size": _first(config, "vocab_size"),
        "max_position_embeddings": _first(config, "max_position_embeddings"),
        "rotary_base": _rope_theta(config),
        "norm_epsilon": _first(config, "rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon"),
        "num_experts": _first(config, "num_experts", "num_local_experts", "n_routed_experts"),
        "moe_router_topk": _first(config, "num_experts_per_tok"),
        "moe_ffn_hidden_size": _first(config, "moe_intermediate_size"),
    }


def _same(dest: str, flag_value: Any, hf_value: Any) -> bool:
    if dest == "vocab_size":
        return flag_value >= hf_value
    if isinstance(flag_value, float) or isinstance(hf_value, float):
        return math.isclose(float(flag_value), float(hf_value), rel_tol=1e-6)
    return flag_value == hf_value


def _hf_booleans(config: dict[str, Any]) -> dict[str, tuple[str, Any]]:
    """Megatron boolean dest -> (HF description, expected flag value), when the config decides it."""
    model_type = config.get("model_type", "")
    booleans: dict[str, tuple[str, Any]] = {}
    if "tie_word_embeddings" in config:
        tie = config["tie_word_embeddings"]
        booleans["untie_embeddings_and_output_weights"] = (f"tie_word_embeddings {json.dumps(tie)}", not tie)
    if model_type in QKV_BIAS_MODEL_TYPES:
        booleans["add_qkv_bias"] = (f"model_type {model_type} (q/k/v biases)", True)
    elif "attention_bias" in config:
        booleans["add_qkv_bias"] = (f"attention_bias {json.dumps(config['attention_bias'])}", bool(config["attention_bias"]))
    if model_type:
        has_qk_norm = model_type in QK_LAYERNORM_MODEL_TYPES
        booleans["qk_layernorm"] = (f"model_type {model_type} ({'with' if has_qk_norm else 'no'} q/k norm)", has_qk_norm)
    if "hidden_act" in config:
        booleans["swiglu"] = (f"hidden_act {config['hidden_act']}", config["hidden_act"] in GATED_SILU_ACTS)
    return booleans


def check_architecture(args: argparse.Namespace, given: set[str]) -> None:
    """Raise ValueError on the first architecture flag in `given` (dests) that disagrees with config.json."""
    if args.train_backend != "fsdp" or args.hf_checkpoint is None:
        return
    value_dests = [dest for dest in VALUE_DESTS if dest in given and getattr(args, dest) is not None]
    describes_model = "num_layers" in given or "hidden_size" in given
    checked_bools = [dest for dest in BOOLEAN_DESTS if dest in given or describes_model]
    if not value_dests and not checked_bools and "normalization" not in given:
        return
    config, path = load_hf_config(args.hf_checkpoint)
    hf_values = _hf_values(config)
    for dest in value_dests:
        key, hf_value = hf_values[dest]
        flag_value = getattr(args, dest)
        if hf_value is _MISSING:
            raise ValueError(f"--{dest.replace('_', '-')} {_show(flag_value)} is given but {path} has no {key}")
        if not _same(dest, flag_value, hf_value):
            relation = " (must be >= it)" if dest == "vocab_size" else ""
            raise ValueError(
                f"--{dest.replace('_', '-')} {_show(flag_value)} does not match {key} {_show(hf_value)} in {path}{relation}"
            )
    hf_booleans = _hf_booleans(config)
    for dest in checked_bools:
        if dest not in hf_booleans:
            continue
        described, expected = hf_booleans[dest]
        if bool(getattr(args, dest)) != expected:
            state = "is set" if getattr(args, dest) else "is not set"
            raise ValueError(f"--{dest.replace('_', '-')} {state}, which does not match {described} in {path}")
    if "normalization" in given and args.normalization is not None:
        is_rms = "rms_norm_eps" in config
        if (args.normalization == "RMSNorm") != is_rms:
            hf_norm = "rms_norm_eps (RMSNorm)" if is_rms else "no rms_norm_eps (LayerNorm)"
            raise ValueError(f"--normalization {args.normalization} does not match {hf_norm} in {path}")


def _show(value: Any) -> str:
    if isinstance(value, float) and value == int(value) and abs(value) >= 1:
        return str(int(value))
    return str(value)
