"""State of one request inside the engine: its tokens, sampled log-probs, KV blocks and status.

    from slime.engine.sequence import Sequence
    seq = Sequence("req-1", [1, 2, 3], SamplingParams(), sampling_seed=7)
"""

from __future__ import annotations

from enum import Enum, auto
from typing import Any

from slime.engine.sampling_params import SamplingParams


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, sampling_seed: int,
                 quiet: bool = False) -> None:
        self.request_id = request_id
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.output_logprobs: list[float] = []
        self.params = params
        self.sampling_seed = sampling_seed
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []  # chained hashes of the leading full blocks, registered for sharing
        self.cache_epoch = -1  # block-manager epoch at allocation; registration stops after a cache flush
        self.num_computed_tokens = 0  # tokens whose K/V are in the cache
        self.cached_tokens: int | None = None  # prompt tokens found in the prefix cache at first admission
        self.num_preemptions = 0
        self.finish_reason: dict[str, Any] | None = None
        self.quiet = quiet  # reported once, when finished, with every output token (LLMEngine.add_request)
        self.num_pending = 0  # trailing placeholder tokens of decode steps still in flight (overlap scheduling)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def append_token(self, token_id: int, logprob: float) -> None:
        self.token_ids.append(token_id)
        self.output_logprobs.append(logprob)

    def block_tokens(self, index: int, block_size: int) -> tuple[int, ...]:
        return tuple(self.token_ids[index * block_size:(index + 1) * block_size])
