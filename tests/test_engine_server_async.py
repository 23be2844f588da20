"""AsyncEngine in-process on the real tiny engine, plus server start-up failures and the `slime engine` entry.

    python -m pytest -q tests/test_engine_server_async.py
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import threading
import time
from typing import Iterator

import httpx
import pytest

from slime.engine import EngineConfig, LLMEngine, SamplingParams
from slime.engine.async_engine import AsyncEngine, EngineNotReady
from slime.engine.server import create_app
from test_engine_server import free_port

GREEDY = dict(temperature=0.0, max_new_tokens=5, ignore_eos=True)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


def test_streams_match_direct_engine(tiny_model_dir):
    prompts = [[3, 4, 5], [9, 8, 7, 6]]
    expected = LLMEngine(EngineConfig(str(tiny_model_dir))).generate(prompts, SamplingParams(**GREEDY))

    async def scenario():
        engine = AsyncEngine(lambda: LLMEngine(EngineConfig(str(tiny_model_dir))), weight_version="w1")
        engine.start()
        await engine.wait_ready()
        streams = await engine.add_requests([(f"r{i}", p, SamplingParams(**GREEDY)) for i, p in enumerate(prompts)])
        seen_lengths = []
        async for state in streams[0]:
            seen_lengths.append(len(state.output_ids))
        final = [streams[0].state, await streams[1].final()]
        with pytest.raises(ValueError, match="already in use"):
            await engine.add_requests([("dup", [1], SamplingParams(**GREEDY)), ("dup", [2], SamplingParams(**GREEDY))])
        await engine.shutdown()
        return final, seen_lengths, engine

    final, seen_lengths, engine = run(scenario())
    assert [s.output_ids for s in final] == [e["token_ids"] for e in expected]
    assert [s.logprobs for s in final] == [pytest.approx(e["logprobs"], abs=1e-5) for e in expected]
    assert all(s.finish_reason == {"type": "length", "length": 5} and s.weight_version == "w1" for s in final)
    assert seen_lengths == sorted(seen_lengths) and seen_lengths[-1] == 5
    assert engine.num_requests_total == 2 and not engine.alive


def test_engine_errors_reach_the_caller_and_the_engine_recovers(tiny_model_dir):
    class FailingOnce(LLMEngine):
        failures = 1

        def step(self):
            if self.failures and self.requests:
                self.failures -= 1
                raise RuntimeError("simulated kernel failure")
            return super().step()

    async def scenario():
        engine = AsyncEngine(lambda: FailingOnce(EngineConfig(str(tiny_model_dir))))
        engine.start()
        await engine.wait_ready()
        with pytest.raises(ValueError, match="vocabulary"):
            await engine.add_request("bad", [10**6], SamplingParams(**GREEDY))
        assert engine.running_request_ids == []
        failed = await (await engine.add_request("a", [1, 2], SamplingParams(**GREEDY))).final()
        ok = await (await engine.add_request("b", [1, 2], SamplingParams(**GREEDY))).final()
        await engine.shutdown()
        return failed, ok, engine

    failed, ok, engine = run(scenario())
    assert failed.finish_reason["type"] == "abort" and "simulated kernel failure" in failed.finish_reason["message"]
    assert ok.finish_reason == {"type": "length", "length": 5}
    assert "simulated kernel failure" in engine.last_step_error


def test_load_failure_is_reported(tmp_path):
    async def scenario():
        def broken():
            raise OSError("disk on fire")

        engine = AsyncEngine(broken)
        engine.start()
        with pytest.raises(EngineNotReady, match="disk on fire"):
            await engine.wait_ready()
        with pytest.raises(EngineNotReady):
            await engine.call(lambda e: None)

    run(scenario())


def test_server_exits_nonzero_when_weights_cannot_load(tiny_model_dir, tmp_path, capsys):
    from slime.engine.server import run_server

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    assert run_server(["--model-path", str(broken), "--port", str(free_port()), "--log-level", "error"]) == 1
    assert "ready at" not in capsys.readouterr().out


def test_slime_engine_command_dispatches_to_the_server(capsys):
    from slime.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["engine", "--model-path", "/x", "--bogus-flag"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--bogus-flag" in err and "not understood by the built-in engine" in err


@contextlib.contextmanager
def serve_in_thread(app) -> Iterator[tuple[str, "uvicorn.Server"]]:
    """Run an app with uvicorn on a free port in a daemon thread (cheaper than a subprocess)."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{server.config.port}", server
    finally:
        server.should_exit = True
        thread.join(30)


def test_health_is_503_until_the_model_is_loaded(tiny_model_dir):
    from transformers import AutoTokenizer

    release = threading.Event()
    ready_calls: list[bool] = []

    def slow_engine():
        release.wait(60)
        return LLMEngine(EngineConfig(str(tiny_model_dir)))

    app = create_app(AsyncEngine(slow_engine), AutoTokenizer.from_pretrained(str(tiny_model_dir)),
                     model_path=str(tiny_model_dir), on_ready=ready_calls.append)
    try:
        with serve_in_thread(app) as (url, _):
            loading = httpx.get(url + "/health")
            assert loading.status_code == 503 and "loading" in loading.text
            assert httpx.post(url + "/generate", json={"text": "hi"}).status_code == 503
            release.set()
            deadline = time.monotonic() + 60
            while httpx.get(url + "/health").status_code != 200 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert ready_calls == [True]
            out = httpx.post(url + "/generate", json={"text": "hi", "sampling_params": {"max_new_tokens": 2}},
                             timeout=60)
            assert out.status_code == 200 and len(out.json()["output_ids"]) == 2
    finally:
        release.set()


def test_skip_tokenizer_init_serves_ids_only(tiny_model_dir):
    app = create_app(AsyncEngine(lambda: LLMEngine(EngineConfig(str(tiny_model_dir)))), None,
                     model_path=str(tiny_model_dir))
    with serve_in_thread(app) as (url, _):
        deadline = time.monotonic() + 60
        while httpx.get(url + "/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        by_text = httpx.post(url + "/generate", json={"text": "hi"})
        assert by_text.status_code == 400 and "--skip-tokenizer-init" in by_text.text
        by_ids = httpx.post(url + "/generate", timeout=60, json={
            "input_ids": [4, 5], "sampling_params": {"max_new_tokens": 3, "ignore_eos": True, "stop": "x"}})
        assert by_ids.status_code == 200
        assert by_ids.json()["text"] == "" and len(by_ids.json()["output_ids"]) == 3
