"""Routers in front of engine servers: slime's fallback balancer and the sglang-router package, over real HTTP.

    python -m pytest -q tests/test_ray_router.py
"""

from __future__ import annotations

import socket
import threading
import time
from argparse import Namespace

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Response

from slime.ray.engine_process import list_router_workers, router_add_worker, router_remove_worker, start_router, use_sglang_router


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Worker:
    """A real HTTP server answering the engine endpoints a router needs, tagging answers with its name."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.generate_calls = 0
        self.abort_calls = 0
        app = FastAPI()

        @app.get("/health")
        def health():
            return Response(status_code=200)

        @app.get("/get_server_info")
        def server_info():
            return {"model_path": "fake"}

        @app.get("/get_model_info")
        def model_info():
            return {"model_path": "fake", "is_generation": True}

        @app.post("/generate")
        def generate(body: dict):
            self.generate_calls += 1
            return {"text": self.name, "echo": body.get("text"), "meta_info": {"finish_reason": {"type": "stop"}}}

        @app.post("/abort_request")
        def abort(body: dict):
            self.abort_calls += 1
            return {"success": True}

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline, "worker did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def workers():
    ws = [Worker("a"), Worker("b")]
    yield ws
    for w in ws:
        w.stop()


def _args() -> Namespace:
    return Namespace(sglang_router_request_timeout_secs=60, rollout_health_check_interval=1)


@pytest.mark.parametrize("kind", ["builtin", "sglang"])
def test_router_balances_generate_and_lists_workers(workers, kind, monkeypatch):
    if kind == "sglang":
        pytest.importorskip("sglang_router")
    monkeypatch.setenv("SLIME_ROUTER", kind)
    router = start_router(_args(), [w.url for w in workers], timeout_s=60)
    try:
        answers = [httpx.post(f"{router.url}/generate", json={"text": f"q{i}"}, timeout=30).json() for i in range(8)]
        assert {a["text"] for a in answers} == {"a", "b"}, answers
        assert [a["echo"] for a in answers] == [f"q{i}" for i in range(8)]
        assert workers[0].generate_calls + workers[1].generate_calls == 8
        assert sorted(list_router_workers(router.url)) == sorted(w.url for w in workers)
        router_remove_worker(router.url, workers[1].url)
        deadline = time.time() + 20
        while list_router_workers(router.url) != [workers[0].url]:
            assert time.time() < deadline, list_router_workers(router.url)
            time.sleep(0.2)
        router_add_worker(router.url, workers[1].url)
        while sorted(list_router_workers(router.url)) != sorted(w.url for w in workers):
            assert time.time() < deadline, list_router_workers(router.url)
            time.sleep(0.2)
    finally:
        router.stop()
    assert not router.alive()


def test_fallback_router_survives_a_dead_worker_and_manages_workers(workers, monkeypatch):
    monkeypatch.setenv("SLIME_ROUTER", "builtin")
    router = start_router(_args(), [w.url for w in workers], timeout_s=60)
    try:
        workers[1].stop()
        answers = [httpx.post(f"{router.url}/generate", json={"text": "x"}, timeout=30).json()["text"] for _ in range(4)]
        assert answers == ["a"] * 4
        r = httpx.post(f"{router.url}/abort_request", json={"abort_all": True}, timeout=30)
        assert r.status_code == 502 and workers[0].abort_calls == 1  # the dead worker is reported, the live one reached

        assert httpx.post(f"{router.url}/remove_worker", params={"url": workers[1].url}, timeout=10).status_code == 200
        assert httpx.get(f"{router.url}/list_workers", timeout=10).json()["urls"] == [workers[0].url]
        assert httpx.post(f"{router.url}/add_worker", params={"url": "not-a-url"}, timeout=10).status_code == 400
        assert httpx.post(f"{router.url}/remove_worker", params={"url": "http://nowhere:1"}, timeout=10).status_code == 404

        workers[0].stop()
        r = httpx.post(f"{router.url}/generate", json={"text": "x"}, timeout=30)
        assert r.status_code == 503 and "no healthy worker" in r.text
        time.sleep(1.5)  # one health-check round marks the stopped worker unhealthy
        assert httpx.get(f"{router.url}/health", timeout=10).status_code == 503
    finally:
        router.stop()


def test_router_that_cannot_start_reports_its_log(monkeypatch):
    monkeypatch.setenv("SLIME_ROUTER", "builtin")
    with pytest.raises(RuntimeError, match="must start with http"):
        start_router(_args(), ["bad-url"], timeout_s=30)


def test_router_choice(monkeypatch):
    base = dict(partial_rollout=False, rollout_batch_size=4, over_sampling_batch_size=4)
    monkeypatch.setenv("SLIME_ROUTER", "builtin")
    assert not use_sglang_router(Namespace(**base))
    monkeypatch.setenv("SLIME_ROUTER", "auto")
    assert not use_sglang_router(Namespace(**{**base, "partial_rollout": True}))  # aborts must reach every engine
    assert not use_sglang_router(Namespace(**{**base, "over_sampling_batch_size": 8}))
    monkeypatch.setenv("SLIME_ROUTER", "nonsense")
    with pytest.raises(ValueError, match="SLIME_ROUTER"):
        use_sglang_router(Namespace(**base))
