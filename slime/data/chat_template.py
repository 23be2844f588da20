"""Chat templates and prompt token counts through the Hugging Face tokenizer (transformers v5 API).

    python -c "from slime.data.chat_template import load_tokenizer, render_chat; \
t = load_tokenizer('/tmp/tiny-qwen3'); print(render_chat(t, [{'role': 'user', 'content': '1+1='}]))"
"""

from __future__ import annotations

from typing import Any

Messages = list[dict[str, Any]]


def load_tokenizer(path: str | None, *, flag: str = "--hf-checkpoint"):
    """AutoTokenizer for a local checkpoint folder; a clear error when the flag is missing or wrong."""
    if not path:
        raise ValueError(f"{flag} is required to load the tokenizer (chat template / prompt length filter)")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"{flag} {path}: cannot load a tokenizer from it ({e})") from None


def as_messages(prompt: str | Messages) -> Messages:
    """A plain-text prompt becomes one user turn; chat messages pass through."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return prompt


def render_chat(
    tokenizer: Any,
    messages: Messages,
    *,
    tools: list[dict[str, Any]] | None = None,
    template_kwargs: dict[str, Any] | None = None,
) -> str:
    """The templated prompt text, ending with the assistant generation prompt (kwargs may override)."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("--apply-chat-template: the tokenizer of --hf-checkpoint has no chat template")
    kwargs: dict[str, Any] = {"add_generation_prompt": True}
    kwargs.update(template_kwargs or {})
    kwargs["tokenize"] = False
    if tools is not None:
        kwargs["tools"] = tools
    text = tokenizer.apply_chat_template(messages, **kwargs)
    assert isinstance(text, str), f"apply_chat_template(tokenize=False) returned {type(text).__name__}"
    return text


def count_prompt_tokens(tokenizer: Any, prompt: str | Messages, *, tools: list[dict[str, Any]] | None = None,
                        template_kwargs: dict[str, Any] | None = None) -> int:
    """Tokens the engine will see for this prompt: text as is, chat messages through the template."""
    text = prompt if isinstance(prompt, str) else render_chat(
        tokenizer, prompt, tools=tools, template_kwargs=template_kwargs)
    return len(tokenizer.encode(text, add_special_tokens=False))
