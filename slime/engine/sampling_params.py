"""Per-request sampling settings, in SGLang's names and meanings.

    from slime.engine.sampling_params import SamplingParams
    SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=64, seed=1)

`temperature < 1e-6` (e.g. 0) is greedy. `top_k == -1` disables top-k. `seed` makes sampling reproducible
(same seed, same tokens, whatever else is in the batch). `ignore_eos` disables stopping on EOS
ids *and* on `stop_token_ids`, as SGLang does. Stop strings are handled by the HTTP server.

`min_new_tokens`: until a request has that many output tokens, its EOS ids and `stop_token_ids` get
-inf logits (whatever `ignore_eos` says, as SGLang's min-new-tokens penalizer does), so it cannot stop
on them; the HTTP server likewise ignores stop strings completed within those tokens. As in SGLang,
the reported log-probs are those of the distribution actually sampled from, i.e. with the stop ids
masked (renormalised over the other tokens); `max_new_tokens` still wins if it is smaller.
"""

from __future__ import annotations

from dataclasses import dataclass, field

GREEDY_TEMPERATURE = 1e-6  # below this, sample greedily (log-probs then use T = 1), as SGLang does


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    max_new_tokens: int = 128
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None
    min_new_tokens: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0.0:
            raise ValueError(f"sampling_params.temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"sampling_params.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k != -1 and self.top_k < 1:
            raise ValueError(f"sampling_params.top_k must be -1 (off) or >= 1, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"sampling_params.min_p must be in [0, 1], got {self.min_p}")
        if self.max_new_tokens < 0:
            raise ValueError(f"sampling_params.max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.min_new_tokens < 0:
            raise ValueError(f"sampling_params.min_new_tokens must be >= 0, got {self.min_new_tokens}")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise ValueError(f"sampling_params.stop_token_ids must be non-negative ints, got {self.stop_token_ids}")
        self.stop_token_ids = list(self.stop_token_ids)

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE
