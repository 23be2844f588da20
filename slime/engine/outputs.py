"""What `LLMEngine.step()` reports for each request it advanced.

    from slime.engine.outputs import TokenOutput

`token_ids` / `logprobs` hold only the tokens produced in *this* step (usually one; none for an
abort or a `max_new_tokens=0` request); the server accumulates them. `finish_reason` is set once,
in SGLang's shape: {"type": "length", "length": n} | {"type": "stop", "matched": token_id} |
{"type": "abort", "message": str}.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class TokenOutput:
    request_id: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finished: bool = False
    finish_reason: dict[str, Any] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
