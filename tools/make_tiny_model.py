"""Write a Hugging Face checkpoint with random weights: tiny ones for tests, real shapes for benchmarks.

    python tools/make_tiny_model.py --preset tiny --output /tmp/tiny-qwen3 [--seed 0]

The tokenizer is byte-level BPE with no merges: 256 byte tokens plus Qwen-style special tokens and
a Qwen-style chat template, so any text round-trips and token ids stay small. Real-shape presets
keep the real vocabulary size in the config (ids past the tokenizer are valid model inputs).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<tool_call>", "</tool_call>"]

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_QWEN3_COMMON = dict(
    architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_act="silu", rms_norm_eps=1e-6,
    attention_bias=False, attention_dropout=0.0, tie_word_embeddings=True, use_cache=True,
)

PRESETS: dict[str, dict] = {
    # tests: ~100k parameters
    "tiny": dict(_QWEN3_COMMON, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=320, max_position_embeddings=2048, rope_theta=10000.0),
    # CPU quickstart: ~0.9M parameters
    "small": dict(_QWEN3_COMMON, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, vocab_size=320, max_position_embeddings=2048, rope_theta=10000.0),
    "qwen3-0.6b": dict(_QWEN3_COMMON, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                       max_position_embeddings=40960, rope_theta=1000000.0),
    "qwen3-4b": dict(_QWEN3_COMMON, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                     max_position_embeddings=40960, rope_theta=1000000.0),
    # the 4B shape's layers, half as many: its training fits one 80 GB GPU without recomputation (an MFU proxy)
    "qwen3-4b-18l": dict(_QWEN3_COMMON, hidden_size=2560, intermediate_size=9728, num_hidden_layers=18,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                         max_position_embeddings=40960, rope_theta=1000000.0),
    "qwen2.5-0.5b": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_act="silu", rms_norm_eps=1e-6,
                         tie_word_embeddings=True, use_cache=True, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                         max_position_embeddings=32768, rope_theta=1000000.0, attention_dropout=0.0),
    # tests of the Qwen2 / Llama loaders
    "tiny-qwen2": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_act="silu", rms_norm_eps=1e-6,
                       tie_word_embeddings=False, use_cache=True, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=320,
                       max_position_embeddings=2048, rope_theta=10000.0, attention_dropout=0.0),
    "tiny-llama": dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu", rms_norm_eps=1e-5,
                       tie_word_embeddings=False, use_cache=True, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=320,
                       max_position_embeddings=2048, rope_theta=10000.0, attention_bias=False, mlp_bias=False),
}


def build_tokenizer():
    """Byte-level BPE without merges: every byte is a token, specials come first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    return tokenizer


def save_tokenizer(output: Path) -> dict[str, int]:
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer(), eos_token="<|im_end|>", pad_token="<|endoftext|>",
        bos_token=None, unk_token=None, additional_special_tokens=SPECIAL_TOKENS[1:],
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(output))
    return {tok: fast.convert_tokens_to_ids(tok) for tok in SPECIAL_TOKENS}


def make_model(preset: str, output: str | os.PathLike, seed: int = 0, dtype: str = "float32", device: str = "cpu") -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    if preset not in PRESETS:
        raise ValueError(f"--preset {preset!r} is unknown; choose one of {sorted(PRESETS)}")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    special_ids = save_tokenizer(output)
    spec = dict(PRESETS[preset])
    spec.update(bos_token_id=special_ids["<|endoftext|>"], eos_token_id=special_ids["<|im_end|>"],
                pad_token_id=special_ids["<|endoftext|>"], dtype=dtype)
    model_type = spec.pop("model_type")
    config = AutoConfig.for_model(model_type, **spec)
    torch.manual_seed(seed)
    torch_dtype = getattr(torch, dtype)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=[special_ids["<|im_end|>"], special_ids["<|endoftext|>"]],
        pad_token_id=config.pad_token_id,
    )
    model.save_pretrained(str(output), safe_serialization=True)
    (output / "slime_preset.json").write_text(json.dumps({"preset": preset, "seed": seed, "dtype": dtype}))
    return output


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS))
    parser.add_argument("--output", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu", help="where to initialise the weights (cuda is much faster for 4B)")
    args = parser.parse_args(argv)
    path = make_model(args.preset, args.output, args.seed, args.dtype, args.device)
    print(path)


if __name__ == "__main__":
    main()
