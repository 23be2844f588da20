"""One long-lived asyncio loop (in a daemon thread) for rollout coroutines, callable from sync or async code.

    from slime.rollout.async_runner import run; result = run(some_coroutine())

A persistent loop keeps HTTP connection pools and semaphores valid across rollout steps, and works
even when the caller already runs an event loop (a Ray async actor).
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Coroutine, TypeVar

T = TypeVar("T")

_loop: asyncio.AbstractEventLoop | None = None
_lock = threading.Lock()


def get_loop() -> asyncio.AbstractEventLoop:
    global _loop
    with _lock:
        if _loop is None or _loop.is_closed():
            _loop = asyncio.new_event_loop()
            threading.Thread(target=_loop.run_forever, name="slime-rollout-loop", daemon=True).start()
        return _loop


def run(coro: Coroutine[Any, Any, T]) -> T:
    loop = get_loop()
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        raise RuntimeError("slime.rollout.async_runner.run() called from inside the rollout loop; await instead")
    return asyncio.run_coroutine_threadsafe(coro, loop).result()
