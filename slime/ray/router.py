"""Fallback request router (used when the `sglang-router` package is not installed): balances /generate over engines.

    python -m slime.ray.router --host 127.0.0.1 --port 30000 --worker-urls http://127.0.0.1:30001 http://127.0.0.1:30002

Each /generate goes to the healthy worker with the fewest requests in flight; a worker that refuses
connections is marked unhealthy and the request is retried on another. `/abort_request` and
`/flush_cache` go to every worker. `GET /list_workers` -> {"urls": [...]}, `POST /add_worker?url=...`,
`POST /remove_worker?url=...`, `GET /health` (200 while at least one worker is healthy).
A background loop GETs each worker's /health every --health-check-interval seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from slime.utils.http_utils import ShardedAsyncClient

logger = logging.getLogger(__name__)

BROADCAST_PATHS = ("abort_request", "flush_cache")


class WorkerPool:
    def __init__(self, urls: list[str]) -> None:
        self.urls: list[str] = []
        self.in_flight: dict[str, int] = {}
        self.healthy: dict[str, bool] = {}
        self._turn = 0
        for url in urls:
            self.add(url)

    def add(self, url: str) -> None:
        url = url.rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"worker url {url!r} must start with http:// or https://")
        if url not in self.urls:
            self.urls.append(url)
            self.in_flight[url] = 0
            self.healthy[url] = True

    def remove(self, url: str) -> bool:
        url = url.rstrip("/")
        if url not in self.urls:
            return False
        self.urls.remove(url)
        self.healthy.pop(url, None)
        self.in_flight.pop(url, None)
        return True

    def pick(self, exclude: set[str]) -> str | None:
        candidates = [u for u in self.urls if self.healthy.get(u) and u not in exclude]
        if not candidates:
            return None
        # fewest in flight; ties go round-robin so sequential requests still spread
        self._turn += 1
        n = len(candidates)
        rotated = candidates[self._turn % n:] + candidates[:self._turn % n]
        return min(rotated, key=lambda u: self.in_flight[u])


def create_app(urls: list[str], health_check_interval: float = 10.0, request_timeout: float | None = None) -> FastAPI:
    pool = WorkerPool(urls)
    state: dict[str, Any] = {}

    async def check_health_forever() -> None:
        while True:
            await asyncio.sleep(health_check_interval)
            for url in list(pool.urls):
                try:
                    r = await state["clients"].next().get(f"{url}/health", timeout=5.0)
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                if pool.healthy.get(url) != ok and url in pool.urls:
                    logger.warning("worker %s is now %s", url, "healthy" if ok else "unhealthy")
                    pool.healthy[url] = ok

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        state["clients"] = ShardedAsyncClient(timeout=request_timeout)
        task = asyncio.create_task(check_health_forever()) if health_check_interval > 0 else None
        yield
        if task is not None:
            task.cancel()
        await state["clients"].aclose()

    app = FastAPI(lifespan=lifespan)
    app.state.pool = pool

    async def forward(url: str, path: str, body: bytes, method: str = "POST") -> Response:
        r = await state["clients"].next().request(method, f"{url}/{path}", content=body, headers={"content-type": "application/json"})
        return Response(content=r.content, status_code=r.status_code, media_type=r.headers.get("content-type"))

    @app.get("/health")
    async def health() -> Response:
        if any(pool.healthy.get(u) for u in pool.urls):
            return Response(status_code=200)
        return JSONResponse({"error": "no healthy worker"}, status_code=503)

    @app.get("/list_workers")
    async def list_workers() -> dict[str, Any]:
        return {"urls": list(pool.urls)}

    @app.post("/add_worker")
    async def add_worker(url: str) -> Response:
        try:
            pool.add(url)
        except ValueError as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        return JSONResponse({"urls": list(pool.urls)})

    @app.post("/remove_worker")
    async def remove_worker(url: str) -> Response:
        if not pool.remove(url):
            return JSONResponse({"error": f"unknown worker {url}"}, status_code=404)
        return JSONResponse({"urls": list(pool.urls)})

    @app.post("/{path:path}")
    async def proxy(path: str, request: Request) -> Response:
        body = await request.body()
        if path in BROADCAST_PATHS:
            results = await asyncio.gather(*(forward(u, path, body) for u in pool.urls), return_exceptions=True)
            failed = [str(r) for r in results if isinstance(r, Exception)]
            return JSONResponse({"workers": len(results), "failed": failed}, status_code=200 if not failed else 502)
        tried: set[str] = set()
        while True:
            url = pool.pick(tried)
            if url is None:
                return JSONResponse({"error": f"no healthy worker for /{path} (tried {sorted(tried)})"}, status_code=503)
            tried.add(url)
            pool.in_flight[url] += 1
            try:
                return await forward(url, path, body)
            except httpx.TransportError as e:
                logger.warning("worker %s failed (%s); marking unhealthy and retrying elsewhere", url, e)
                pool.healthy[url] = False
            finally:
                if url in pool.in_flight:
                    pool.in_flight[url] -= 1

    return app


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description="slime fallback router: balances /generate over engine servers")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--worker-urls", nargs="*", default=[])
    parser.add_argument("--health-check-interval", type=float, default=10.0, help="seconds; 0 turns checks off")
    parser.add_argument("--request-timeout-secs", type=float, default=None)
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    try:
        app = create_app(args.worker_urls, args.health_check_interval, args.request_timeout_secs)
    except ValueError as e:
        parser.error(str(e))
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()
