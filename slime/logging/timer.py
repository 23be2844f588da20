"""Wall-clock timers for the phases of one RL step (rollout, train, weight sync, save, eval).

    from slime.logging.timer import PhaseTimer
    timer = PhaseTimer()
    with timer("rollout"):
        ...
    timer.pop_metrics()   # {"time/rollout": 1.23}
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator


class PhaseTimer:
    """Accumulates seconds per phase name until `pop_metrics()` hands them out and resets."""

    def __init__(self) -> None:
        self._seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(phase, time.perf_counter() - start)

    def add(self, phase: str, seconds: float) -> None:
        self._seconds[phase] = self._seconds.get(phase, 0.0) + seconds

    def seconds(self, phase: str) -> float:
        return self._seconds.get(phase, 0.0)

    def pop_metrics(self) -> dict[str, float]:
        metrics = {f"time/{phase}": value for phase, value in self._seconds.items()}
        self._seconds = {}
        return metrics
