"""The engine HTTP server over real HTTP: a `python -m slime.engine.server` subprocess on the tiny model.

    python -m pytest -q tests/test_engine_server.py
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT_S = 180.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m slime.engine.server` in a subprocess, logging to a temp file."""

    def __init__(self, model_path: Path | str, *extra_args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix="engine-server-", suffix=".log", delete=False)
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "slime.engine.server", "--model-path", str(model_path), "--port", str(self.port),
             "--log-level", "warning", *extra_args],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)

    def output(self) -> str:
        return Path(self.log.name).read_text()

    def wait_healthy(self, timeout: float = STARTUP_TIMEOUT_S) -> "ServerProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"engine server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"engine server not healthy after {timeout}s:\n{self.output()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()
        os.unlink(self.log.name)


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    proc = ServerProcess(tiny_model_dir, "--context-length", "256").wait_healthy()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


def post(server: ServerProcess, path: str, payload=None, **kw) -> httpx.Response:
    return httpx.post(server.url + path, json=payload, timeout=kw.pop("timeout", 120), **kw)


def generate(server: ServerProcess, payload: dict) -> dict | list:
    response = post(server, "/generate", payload)
    assert response.status_code == 200, response.text
    return response.json()


GREEDY = {"temperature": 0, "max_new_tokens": 6}


# ----- info endpoints ---------------------------------------------------------------------------------
def test_health_and_info_endpoints(server, tiny_model_dir):
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/health_generate", timeout=60).status_code == 200
    info = httpx.get(server.url + "/get_model_info").json()
    assert info["model_path"] == str(tiny_model_dir) and info["is_generation"] is True
    assert info["weight_version"] == "default" and info["model_type"] == "qwen3"
    server_info = httpx.get(server.url + "/get_server_info").json()
    assert server_info["port"] == server.port and server_info["context_length"] == 256
    assert server_info["internal_states"][0]["max_context_len"] == 256
    assert httpx.get(server.url + "/get_weight_version").json() == {"weight_version": "default"}
    assert "ready at " + server.url in server.output()


def test_flush_cache(server):
    response = post(server, "/flush_cache")
    assert response.status_code == 200 and "flushed" in response.text


# ----- /generate ---------------------------------------------------------------------------------------
def test_text_and_ids_give_the_same_greedy_answer(server, tokenizer):
    by_text = generate(server, {"text": "hello world", "sampling_params": GREEDY})
    ids = tokenizer.encode("hello world")
    by_ids = generate(server, {"input_ids": ids, "sampling_params": GREEDY})
    assert by_text["output_ids"] == by_ids["output_ids"] and len(by_text["output_ids"]) > 0
    assert by_text["text"] == tokenizer.decode(by_text["output_ids"], skip_special_tokens=True)
    meta = by_ids["meta_info"]
    assert meta["prompt_tokens"] == len(ids) and meta["completion_tokens"] == len(by_ids["output_ids"])
    assert meta["weight_version"] == "default" and meta["e2e_latency"] > 0
    assert meta["finish_reason"]["type"] in ("length", "stop")
    assert "output_token_logprobs" not in meta


def test_batch_with_per_prompt_params_and_rids(server):
    out = generate(server, {
        "text": ["abc", "hello there", "x"],
        "sampling_params": [{"temperature": 0, "max_new_tokens": 2, "ignore_eos": True},
                            {"temperature": 0, "max_new_tokens": 5, "ignore_eos": True},
                            {"temperature": 0.8, "max_new_tokens": 3, "ignore_eos": True, "sampling_seed": 3}],
        "rid": ["b-0", "b-1", "b-2"],
    })
    assert isinstance(out, list) and [o["meta_info"]["id"] for o in out] == ["b-0", "b-1", "b-2"]
    assert [len(o["output_ids"]) for o in out] == [2, 5, 3]
    assert [o["meta_info"]["finish_reason"] for o in out] == [
        {"type": "length", "length": 2}, {"type": "length", "length": 5}, {"type": "length", "length": 3}]
    single = generate(server, {"text": "hello there", "sampling_params": {"temperature": 0, "max_new_tokens": 5,
                                                                          "ignore_eos": True}})
    assert single["output_ids"] == out[1]["output_ids"]


def test_batched_input_ids_and_shared_params(server):
    out = generate(server, {"input_ids": [[10, 11, 12], [20, 21]], "sampling_params": {**GREEDY, "ignore_eos": True}})
    assert len(out) == 2 and all(len(o["output_ids"]) == 6 for o in out)
    assert out[1]["meta_info"]["prompt_tokens"] == 2


def test_logprobs_shape_and_seeded_sampling(server):
    payload = {"text": "sample me", "return_logprob": True,
               "sampling_params": {"temperature": 1.0, "max_new_tokens": 8, "ignore_eos": True, "sampling_seed": 11}}
    first, second = generate(server, payload), generate(server, payload)
    logprobs = first["meta_info"]["output_token_logprobs"]
    assert len(logprobs) == len(first["output_ids"]) == 8
    assert all(len(entry) == 3 and entry[2] is None and entry[0] <= 0.0 for entry in logprobs)
    assert [entry[1] for entry in logprobs] == first["output_ids"]
    assert second["output_ids"] == first["output_ids"]
    assert [e[0] for e in second["meta_info"]["output_token_logprobs"]] == pytest.approx([e[0] for e in logprobs])


def test_n_samples_per_prompt(server):
    out = generate(server, {"text": "n test", "rid": "nn",
                            "sampling_params": {"n": 3, "max_new_tokens": 4, "ignore_eos": True, "sampling_seed": 5}})
    assert isinstance(out, list) and [o["meta_info"]["id"] for o in out] == ["nn-0", "nn-1", "nn-2"]
    assert all(len(o["output_ids"]) == 4 for o in out)


def test_stop_strings_trim_and_no_stop_trim(server, tokenizer):
    base = {"temperature": 1.0, "max_new_tokens": 24, "ignore_eos": True, "sampling_seed": 1234,
            "skip_special_tokens": False}
    full = generate(server, {"text": "stop test", "sampling_params": base})
    text = full["text"]
    assert len(text) >= 8, text
    stop = text[4:6]
    cut = text.find(stop)
    trimmed = generate(server, {"text": "stop test", "sampling_params": {**base, "stop": [stop, "NEVER-SEEN"]}})
    assert trimmed["text"] == text[:cut]
    assert trimmed["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert trimmed["output_ids"] == full["output_ids"][:len(trimmed["output_ids"])]
    assert len(trimmed["output_ids"]) < len(full["output_ids"])
    kept = generate(server, {"text": "stop test", "sampling_params": {**base, "stop": stop, "no_stop_trim": True}})
    # untrimmed text runs to the end of the token that completed the stop string
    assert kept["text"].startswith(text[:cut + len(stop)])
    assert kept["text"] == tokenizer.decode(kept["output_ids"], skip_special_tokens=False)
    assert kept["output_ids"] == trimmed["output_ids"]


def test_stop_strings_under_concurrency_never_report_abort(server):
    """A stop string aborts the request inside the engine; the engine's own abort output must not win the race."""
    base = {"temperature": 1.0, "max_new_tokens": 32, "ignore_eos": True, "stop": ["a", "e", "o", "1", " "]}
    payload = {"text": [f"race {i}" for i in range(40)],
               "sampling_params": base}
    results = generate(server, payload)
    reasons = [r["meta_info"]["finish_reason"]["type"] for r in results]
    assert "abort" not in reasons, reasons
    assert reasons.count("stop") >= 10, reasons


def test_stop_token_ids(server, tokenizer):
    base = {"temperature": 1.0, "max_new_tokens": 16, "sampling_seed": 77, "ignore_eos": False}
    full = generate(server, {"input_ids": [30, 31, 32], "sampling_params": {**base, "ignore_eos": True}})
    stop_id = full["output_ids"][3]
    first = full["output_ids"].index(stop_id)
    out = generate(server, {"input_ids": [30, 31, 32], "sampling_params": {**base, "stop_token_ids": [stop_id]}})
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop_id}
    assert out["output_ids"] == full["output_ids"][:first + 1]
    assert out["text"] == tokenizer.decode(full["output_ids"][:first], skip_special_tokens=True)


def test_max_new_tokens_zero_and_clipped_to_context(server):
    zero = generate(server, {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 0}})
    assert zero["output_ids"] == [] and zero["meta_info"]["finish_reason"] == {"type": "length", "length": 0}
    near_limit = generate(server, {"input_ids": [40] * 250, "sampling_params": {"max_new_tokens": 100,
                                                                                 "ignore_eos": True}})
    assert len(near_limit["output_ids"]) == 6  # context 256 - prompt 250


def test_streaming_sse(server):
    chunks = []
    with httpx.stream("POST", server.url + "/generate", timeout=60, json={
            "text": "stream", "stream": True, "sampling_params": {**GREEDY, "ignore_eos": True}}) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                chunks.append(line[len("data: "):])
    assert chunks[-1] == "[DONE]"
    parsed = [json.loads(c) for c in chunks[:-1]]
    assert parsed[-1]["meta_info"]["finish_reason"] == {"type": "length", "length": 6}
    assert all(p["meta_info"]["finish_reason"] is None for p in parsed[:-1])
    lengths = [len(p["output_ids"]) for p in parsed]
    assert lengths == sorted(lengths) and lengths[-1] == 6


# ----- client errors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("payload, message", [
    ('{"text": "hi",', "malformed JSON"),
    ({"text": "hi", "sampling_params": {"temprature": 0.5}}, "unknown sampling parameter 'temprature'"),
    ({"text": "hi", "sampling_params": {"top_p": 0}}, "top_p"),
    ({"text": "hi", "sampling_params": {"max_new_tokens": "ten"}}, "max_new_tokens"),
    ({"text": "hi", "sampling_params": {"frequency_penalty": 0.5}}, "frequency_penalty"),
    ({"text": "hi", "sampling_params": {"regex": "a+"}}, "regex"),
    ({"input_ids": [1] * 300}, "longer than the context length 256"),
    ({"text": "hi", "input_ids": [1]}, "exactly one of"),
    ({"input_ids": [1, 99999]}, "outside the vocabulary"),
    ({"input_ids": []}, "empty"),
    ({"text": "hi", "return_logprobs": True}, "unknown request field 'return_logprobs'"),
    ({"text": ["a", "b"], "sampling_params": [{}]}, "has 1 entries but the batch has 2"),
    ([1, 2], "JSON object"),
])
def test_bad_generate_requests_get_400_with_message(server, payload, message):
    if isinstance(payload, str):
        response = httpx.post(server.url + "/generate", content=payload, timeout=30,
                              headers={"content-type": "application/json"})
    else:
        response = post(server, "/generate", payload)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]["message"]


@pytest.mark.parametrize("path, payload, message", [
    ("/abort_request", {"rid": 5}, "wrong type"),
    ("/abort_request", {}, "needs 'rid'"),
    ("/pause_generation", {"mode": "sideways"}, "pause mode"),
    ("/release_memory_occupation", {"tags": ["gpu"]}, "unknown memory tag 'gpu'"),
    ("/update_weights_from_disk", {}, "needs the field 'model_path'"),
    ("/update_weights_from_disk", {"model_path": "/x", "bogus": 1}, "unknown field 'bogus'"),
    ("/update_weights_from_tensor", {"serialized_named_tensors": []}, "non-empty list"),
    ("/update_weights_from_distributed", {"names": ["a"], "dtypes": ["float32"], "shapes": [[1]],
                                          "group_name": "nope"}, "no weight update group 'nope'"),
    ("/update_weights_from_distributed", {"names": ["a"], "dtypes": ["complex7"], "shapes": [[1]]},
     "unknown dtype 'complex7'"),
    ("/update_weights_from_distributed", {"names": ["a", "b"], "dtypes": ["float32"], "shapes": [[1]]},
     "differ in length"),
    ("/update_weights_from_distributed", {"names": ["a"], "dtypes": ["float32"], "shapes": [[1]],
                                          "load_format": "zstd_bucket"}, "load_format 'zstd_bucket'"),
    ("/init_weights_update_group", {"master_address": "127.0.0.1", "master_port": 1, "world_size": 2,
                                    "rank_offset": 5}, "outside world_size"),
])
def test_bad_control_requests_get_400(server, path, payload, message):
    response = post(server, path, payload)
    assert response.status_code == 400, response.text
    assert message in response.text


def test_update_from_missing_disk_path_fails_cleanly(server):
    response = post(server, "/update_weights_from_disk", {"model_path": "/nonexistent/ckpt"})
    assert response.status_code == 400 and response.json()["success"] is False
    assert "/nonexistent/ckpt" in response.json()["message"]
    assert httpx.get(server.url + "/get_weight_version").json()["weight_version"] == "default"


# ----- abort, pause, memory --------------------------------------------------------------------------------
def _wait_running(server: ServerProcess, count: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if httpx.get(server.url + "/get_server_info").json()["internal_states"][0]["num_running_requests"] >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"{count} requests never showed up as running")


async def _generate_async(client: httpx.AsyncClient, server: ServerProcess, payload: dict) -> dict:
    response = await client.post(server.url + "/generate", json=payload, timeout=300)
    assert response.status_code == 200, response.text
    return response.json()


def test_pause_holds_requests_and_abort_ends_them(server):
    long_params = {"max_new_tokens": 1000, "ignore_eos": True}

    async def scenario():
        async with httpx.AsyncClient() as client:
            assert (await client.post(server.url + "/pause_generation", json={})).status_code == 200
            steps_before = (await client.get(server.url + "/get_server_info")).json()["internal_states"][0]["num_steps"]
            tasks = [asyncio.create_task(_generate_async(client, server, {"text": f"long {i}", "rid": f"long-{i}",
                                                                          "sampling_params": long_params}))
                     for i in range(3)]
            await asyncio.to_thread(_wait_running, server, 3)
            await asyncio.sleep(0.3)
            state = (await client.get(server.url + "/get_server_info")).json()["internal_states"][0]
            assert state["paused"] and state["num_steps"] == steps_before  # nothing scheduled while paused
            assert not any(t.done() for t in tasks)
            aborted = (await client.post(server.url + "/abort_request", json={"rid": "long-0"})).json()
            assert aborted["aborted"] == ["long-0"]
            first = await tasks[0]
            assert first["meta_info"]["finish_reason"]["type"] == "abort"
            assert (await client.post(server.url + "/continue_generation", json={})).status_code == 200
            for _ in range(600):  # a few steps after the resume, far from the 1000 tokens
                info = (await client.get(server.url + "/get_server_info")).json()["internal_states"][0]
                if info["num_steps"] >= steps_before + 3:
                    break
                await asyncio.sleep(0.01)
            await client.post(server.url + "/abort_request", json={"abort_all": True})
            rest = await asyncio.gather(*tasks[1:])
            assert [r["meta_info"]["finish_reason"]["type"] for r in rest] == ["abort", "abort"]
            assert all(0 < len(r["output_ids"]) < 1000 for r in rest)

    asyncio.run(scenario())
    assert generate(server, {"text": "after", "sampling_params": GREEDY})["meta_info"]["finish_reason"]


def test_pause_in_abort_mode_ends_running_requests(server):
    async def scenario():
        async with httpx.AsyncClient() as client:
            task = asyncio.create_task(_generate_async(client, server, {
                "text": "to abort", "sampling_params": {"max_new_tokens": 1000, "ignore_eos": True}}))
            await asyncio.to_thread(_wait_running, server, 1)
            paused = await client.post(server.url + "/pause_generation", json={"mode": "abort"})
            result = await task
            resumed = await client.post(server.url + "/continue_generation", json={})
            return paused, result, resumed

    paused, result, resumed = asyncio.run(scenario())
    assert paused.status_code == 200 and resumed.status_code == 200
    assert result["meta_info"]["finish_reason"]["type"] == "abort"
    assert generate(server, {"text": "after", "sampling_params": GREEDY})["meta_info"]["finish_reason"]


def test_release_and_resume_memory(server):
    before = generate(server, {"text": "memory", "sampling_params": GREEDY})
    response = post(server, "/release_memory_occupation", {"tags": ["kv_cache", "weights"]})
    assert response.status_code == 200 and response.json()["success"]
    assert httpx.get(server.url + "/get_server_info").json()["internal_states"][0]["memory_released"] is True
    blocked = post(server, "/generate", {"text": "memory", "sampling_params": GREEDY})
    assert blocked.status_code == 503 and "resume" in blocked.text
    assert httpx.get(server.url + "/health").status_code == 200
    response = post(server, "/resume_memory_occupation", {})
    assert response.status_code == 200 and response.json()["success"]
    after = generate(server, {"text": "memory", "sampling_params": GREEDY})
    assert after["output_ids"] == before["output_ids"]


def test_512_concurrent_requests(server):
    import aiohttp

    async def scenario():
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:
            async def one(i: int) -> tuple[int, dict]:
                payload = {"input_ids": [1 + i % 200, 7, 9], "sampling_params": {"max_new_tokens": 2, "ignore_eos": True}}
                async with session.post(server.url + "/generate", json=payload) as response:
                    return response.status, await response.json()

            return await asyncio.gather(*(one(i) for i in range(512)))

    started = time.monotonic()
    results = asyncio.run(scenario())
    assert [status for status, _ in results] == [200] * 512
    assert all(r["meta_info"]["finish_reason"] == {"type": "length", "length": 2} for _, r in results)
    assert len({r["meta_info"]["id"] for _, r in results}) == 512
    print(f"512 requests in {time.monotonic() - started:.1f}s")


# ----- command line ------------------------------------------------------------------------------------------
def test_unknown_flag_exits_2_naming_it(capsys):
    from slime.engine.server import parse_server_args

    with pytest.raises(SystemExit) as exc:
        parse_server_args(["--model-path", "/x", "--enable-fancy-thing", "3"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--enable-fancy-thing" in err and "not understood by the built-in engine" in err


def test_bad_model_path_exits_2(capsys, tmp_path):
    from slime.engine.server import run_server

    assert run_server(["--model-path", str(tmp_path / "missing")]) == 2
    assert "--model-path" in capsys.readouterr().err


def test_flags_map_onto_engine_config(tiny_model_dir):
    from slime.engine.server import engine_config_kwargs, parse_server_args

    args = parse_server_args(["--model-path", str(tiny_model_dir), "--max-running-requests", "8", "--page-size", "32",
                              "--max-total-tokens", "4096", "--chunked-prefill-size", "512", "--random-seed", "3",
                              "--disable-cuda-graph", "--dtype", "bfloat16", "--device", "cpu",
                              "--skip-server-warmup"])
    assert args.skip_server_warmup is True  # a server-start switch (GPU warm-up), not an engine setting
    assert engine_config_kwargs(args) == {
        "model_path": str(tiny_model_dir), "dtype": "bfloat16", "device": "cpu", "max_num_seqs": 8,
        "kv_cache_tokens": 4096, "max_num_batched_tokens": 512, "block_size": 32, "seed": 3, "enforce_eager": True,
        "tp_size": 1}
