"""Tokenizer for rollout functions, loaded once per checkpoint (`args.hf_checkpoint`).

    from slime.rollout.tokenization import get_tokenizer; tok = get_tokenizer("/tmp/tiny-qwen3")
"""

from __future__ import annotations

import functools
import os

from .errors import RolloutConfigError


@functools.lru_cache(maxsize=8)
def get_tokenizer(path: str):
    if not path:
        raise RolloutConfigError("--hf-checkpoint is required: the rollout needs the model's tokenizer")
    if not os.path.isdir(path):
        raise RolloutConfigError(f"--hf-checkpoint {path!r} is not a directory with a Hugging Face tokenizer")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=True)


def render_chat(tokenizer, messages: list[dict], *, add_generation_prompt: bool = False, tools=None, **kwargs) -> str:
    """The chat template applied as text (transformers v5: tokenize=False keeps it a string)."""
    extra = dict(kwargs)
    if tools:
        extra["tools"] = tools
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt, **extra)


def encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
