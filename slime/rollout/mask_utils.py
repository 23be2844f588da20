"""Token ids + loss mask for chat conversations: 1 on assistant turns only (`--loss-mask-type qwen|qwen3|distill_qwen`).

    gen = MultiTurnLossMaskGenerator(tokenizer, tokenizer_type="qwen")
    token_ids, loss_mask = gen.get_loss_mask(messages)     # same length; the assistant header is 0

- qwen: the conversation is rendered once per prefix and each message is the text it adds; the
  template must be prefix-stable (Qwen2.5 and plain ChatML are).
- qwen3: each message is rendered after a fixed user message, so templates that rewrite earlier
  turns (Qwen3 drops `<think>` of past assistant turns) still give every turn its own tokens.
- distill_qwen: all but the last message with the generation prompt, then the raw text of the last
  (assistant) message; only that text is trained.
A message with `"step_loss_mask": 0` is kept in the tokens but masked out.
"""

from __future__ import annotations

from typing import Any

from .tokenization import encode, render_chat

LOSS_MASK_TYPES = ("qwen", "qwen3", "distill_qwen")
_ANCHOR = {"role": "user", "content": "FOR CALCULATING LOSS MASK ONLY"}


def get_response_lengths(loss_masks: list[list[int]]) -> list[int]:
    """Tokens from the first trained token to the end, per mask (0 when nothing is trained)."""
    return [len(mask) - mask.index(1) if 1 in mask else 0 for mask in loss_masks]


class MultiTurnLossMaskGenerator:
    def __init__(self, tokenizer, tokenizer_type: str = "qwen"):
        if tokenizer_type not in LOSS_MASK_TYPES:
            raise ValueError(f"--loss-mask-type {tokenizer_type!r} is not one of {', '.join(LOSS_MASK_TYPES)}")
        self.tokenizer = tokenizer
        self.tokenizer_type = tokenizer_type
        anchored = render_chat(tokenizer, [_ANCHOR])
        self.assistant_header = render_chat(tokenizer, [_ANCHOR], add_generation_prompt=True)[len(anchored) :]

    def get_response_lengths(self, loss_masks: list[list[int]]) -> list[int]:
        return get_response_lengths(loss_masks)

    def get_loss_mask(self, messages: list[dict[str, Any]], tools: list[dict] | None = None) -> tuple[list[int], list[int]]:
        _check_messages(messages)
        if self.tokenizer_type == "distill_qwen":
            return self._distill_qwen(messages, tools)
        segments = self._segments_by_prefix(messages, tools) if self.tokenizer_type == "qwen" else (
            self._segments_anchored(messages, tools)
        )
        token_ids: list[int] = []
        loss_mask: list[int] = []
        for message, text in zip(messages, segments):
            trained = message["role"] == "assistant" and message.get("step_loss_mask", 1) == 1
            header = self.assistant_header if trained and text.startswith(self.assistant_header) else ""
            header_ids = encode(self.tokenizer, header) if header else []
            body_ids = encode(self.tokenizer, text[len(header) :])
            token_ids += header_ids + body_ids
            loss_mask += [0] * len(header_ids) + [1 if trained else 0] * len(body_ids)
        return token_ids, loss_mask

    def _segments_by_prefix(self, messages: list[dict], tools) -> list[str]:
        segments, previous = [], ""
        for i in range(len(messages)):
            rendered = render_chat(self.tokenizer, messages[: i + 1], tools=tools)
            if not rendered.startswith(previous):
                raise ValueError(
                    "the chat template rewrites earlier turns (not prefix-stable); use --loss-mask-type qwen3"
                )
            segments.append(rendered[len(previous) :])
            previous = rendered
        return segments

    def _segments_anchored(self, messages: list[dict], tools) -> list[str]:
        anchored = render_chat(self.tokenizer, [_ANCHOR], tools=tools)
        segments = []
        for i, message in enumerate(messages):
            if i == 0:
                segments.append(render_chat(self.tokenizer, [message], tools=tools))
                continue
            rendered = render_chat(self.tokenizer, [_ANCHOR, message], tools=tools)
            assert rendered.startswith(anchored), "the chat template changed the anchor message"
            segments.append(rendered[len(anchored) :])
        return segments

    def _distill_qwen(self, messages: list[dict], tools) -> tuple[list[int], list[int]]:
        if len(messages) < 2 or messages[-1]["role"] != "assistant":
            raise ValueError("--loss-mask-type distill_qwen needs [prompt message, ..., assistant message]")
        prompt_ids = encode(self.tokenizer, render_chat(self.tokenizer, messages[:-1], add_generation_prompt=True, tools=tools))
        response_ids = encode(self.tokenizer, messages[-1]["content"])
        trained = 1 if messages[-1].get("step_loss_mask", 1) == 1 else 0
        return prompt_ids + response_ids, [0] * len(prompt_ids) + [trained] * len(response_ids)

    def get_text_from_loss_mask(self, token_ids: list[int], loss_mask: list[int]) -> list[str]:
        """The decoded runs of trained tokens (one string per assistant turn)."""
        runs: list[list[int]] = []
        for token, mask in zip(token_ids, loss_mask):
            if mask:
                if not runs or runs[-1] is None:
                    runs.append([])
                runs[-1].append(token)
            elif runs and runs[-1] is not None:
                runs.append(None)  # type: ignore[arg-type]
        return [self.tokenizer.decode(run) for run in runs if run is not None]


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"expected a non-empty list of chat messages, got {type(messages).__name__}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"chat message {i} must be a dict with 'role' and 'content', got {message!r:.100}")
