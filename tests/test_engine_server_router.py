"""The real `sglang-router` in front of two built-in engine servers spreads /generate over both.

    python -m pytest -q tests/test_engine_server_router.py
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from test_engine_server import ServerProcess, free_port

pytest.importorskip("sglang_router")


@pytest.fixture(scope="module")
def engines(tiny_model_dir):
    servers = [ServerProcess(tiny_model_dir), ServerProcess(tiny_model_dir)]
    try:
        yield [s.wait_healthy() for s in servers]
    finally:
        for s in servers:
            s.stop()


@pytest.fixture(scope="module")
def router(engines):
    port = free_port()
    log = tempfile.NamedTemporaryFile("w+", prefix="router-", suffix=".log", delete=False)
    proc = subprocess.Popen(
        [sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1", "--port", str(port),
         "--policy", "round_robin", "--log-level", "warn", "--worker-urls", *[e.url for e in engines]],
        stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"router exited with {proc.returncode}:\n{Path(log.name).read_text()}")
            try:
                workers = httpx.get(url + "/workers", timeout=2).json()["workers"]
                if len(workers) == 2 and all(w["is_healthy"] for w in workers):
                    break
            except (httpx.TransportError, ValueError, KeyError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"router not ready:\n{Path(log.name).read_text()}")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
        os.unlink(log.name)


def _served_counts(engines) -> list[int]:
    return [httpx.get(e.url + "/get_server_info").json()["num_generate_requests"] for e in engines]


def test_router_spreads_generate_over_both_engines(engines, router):
    before = _served_counts(engines)

    async def send_all():
        async with httpx.AsyncClient(timeout=120) as client:
            responses = await asyncio.gather(*(
                client.post(router + "/generate", json={"text": f"prompt {i}", "return_logprob": True,
                                                        "sampling_params": {"max_new_tokens": 3, "ignore_eos": True}})
                for i in range(20)))
        return responses

    responses = asyncio.run(send_all())
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    bodies = [r.json() for r in responses]
    assert all(len(b["output_ids"]) == 3 and len(b["meta_info"]["output_token_logprobs"]) == 3 for b in bodies)
    served = [after - b for after, b in zip(_served_counts(engines), before)]
    assert sum(served) == 20 and min(served) >= 5, served


def test_router_passes_client_errors_through(router):
    # the router re-serialises requests (dropping fields it does not model), so use a bad value it keeps
    response = httpx.post(router + "/generate", json={"text": "x", "sampling_params": {"top_p": 5.0}}, timeout=60)
    assert response.status_code == 400 and "top_p must be in (0, 1]" in response.text


def test_rollout_finds_every_engine_behind_the_real_router(engines, router):
    """Aborts must reach each engine: the rollout lists them through sglang-router's GET /workers."""
    from types import SimpleNamespace

    from slime.rollout.sglang_rollout import worker_urls

    host, port = router.removeprefix("http://").split(":")
    args = SimpleNamespace(sglang_router_ip=host, sglang_router_port=int(port))
    found = asyncio.run(worker_urls(args))
    assert sorted(u.rstrip("/") for u in found) == sorted(e.url.rstrip("/") for e in engines)
