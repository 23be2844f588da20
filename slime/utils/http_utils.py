"""Async HTTP helpers that plugins import (`from slime.utils.http_utils import post`).

    python -c "import asyncio; from slime.utils.http_utils import post; print(asyncio.run(post('http://127.0.0.1:30000/generate', {'text': 'hi'})))"
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httpx

logger = logging.getLogger(__name__)

class ShardedAsyncClient:
    """A few smaller httpx pools used in turn. httpcore's pool does O(connections^2) work every time a request
    starts or ends, which made 256 concurrent /generate calls through one client cost seconds of client CPU."""

    SHARDS = 16

    def __init__(self, timeout: float | None = None, shards: int = SHARDS) -> None:
        limits = httpx.Limits(max_connections=4096 // shards, max_keepalive_connections=1024 // shards)
        ssl_context = httpx.create_ssl_context()  # built once: loading the CA bundle takes ~20 ms
        self.clients = [httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(timeout), verify=ssl_context)
                        for _ in range(shards)]
        self._turn = 0

    def next(self) -> httpx.AsyncClient:
        self._turn = (self._turn + 1) % len(self.clients)
        return self.clients[self._turn]

    @property
    def is_closed(self) -> bool:
        return any(c.is_closed for c in self.clients)

    async def aclose(self) -> None:
        for client in self.clients:
            await client.aclose()


_sharded: ShardedAsyncClient | None = None
_client_loop: asyncio.AbstractEventLoop | None = None


def _shared_client() -> httpx.AsyncClient:
    """One of this event loop's pooled clients, in turn (httpx clients must not cross loops)."""
    global _sharded, _client_loop
    loop = asyncio.get_running_loop()
    if _sharded is None or _client_loop is not loop or _sharded.is_closed:
        _sharded = ShardedAsyncClient()
        _client_loop = loop
    return _sharded.next()


class HTTPStatusError(RuntimeError):
    def __init__(self, url: str, status_code: int, body: str):
        super().__init__(f"POST {url} answered HTTP {status_code}: {body[:500]}")
        self.status_code = status_code
        self.body = body


async def post(
    url: str,
    payload: dict[str, Any] | None = None,
    max_retries: int = 60,
    *,
    timeout: float | None = None,
    backoff: float = 0.5,
    max_backoff: float = 8.0,
) -> Any:
    """POST json and return the decoded json answer; retries connection errors and 5xx with back-off.

    4xx answers are the caller's fault and raise at once with the server's message.
    """
    client = _shared_client()
    delay = backoff
    last_error: Exception | None = None
    for attempt in range(max(1, max_retries)):
        try:
            response = await client.post(url, json=payload or {}, timeout=timeout)
            if response.status_code < 400:
                try:
                    return response.json()
                except ValueError:
                    return response.text
            error = HTTPStatusError(url, response.status_code, response.text)
            if response.status_code < 500:
                raise error
            last_error = error
        except (httpx.TransportError, httpx.TimeoutException) as e:
            last_error = e
        if attempt + 1 < max_retries:
            logger.debug("POST %s failed (%s); retry %d in %.1fs", url, last_error, attempt + 1, delay)
            await asyncio.sleep(delay)
            delay = min(max_backoff, delay * 2)
    raise RuntimeError(f"POST {url} failed after {max_retries} attempts: {last_error}") from last_error


async def get(url: str, *, timeout: float | None = 30.0) -> Any:
    client = _shared_client()
    response = await client.get(url, timeout=timeout)
    response.raise_for_status()
    try:
        return response.json()
    except ValueError:
        return response.text
