"""Host-overhead cuts on the HTTP path: final-only streams, deferred prefills, sharded HTTP clients, the benchmark.

    python -m pytest -q tests/test_engine_server_overhead.py
"""

from __future__ import annotations

import asyncio
import json

import pytest

from slime.engine import EngineConfig, LLMEngine, SamplingParams
from slime.engine.async_engine import AsyncEngine

GREEDY = {"temperature": 0.0, "max_new_tokens": 6, "ignore_eos": True}


def test_final_only_stream_wakes_once_and_matches_a_per_step_stream(tiny_model_dir):
    async def scenario():
        engine = AsyncEngine(lambda: LLMEngine(EngineConfig(str(tiny_model_dir))))
        engine.start()
        await engine.wait_ready()
        quiet, loud = await engine.add_requests([("quiet", [3, 4, 5], SamplingParams(**GREEDY)),
                                                 ("loud", [3, 4, 5], SamplingParams(**GREEDY))], final_only={"quiet"})
        quiet_seen = [len(s.output_ids) async for s in quiet]
        loud_seen = [len(s.output_ids) async for s in loud]
        await engine.shutdown()
        return quiet, loud, quiet_seen, loud_seen

    quiet, loud, quiet_seen, loud_seen = asyncio.run(asyncio.wait_for(scenario(), 120))
    assert quiet_seen == [6] and quiet.state.finished
    assert loud_seen[-1] == 6
    assert quiet.state.output_ids == loud.state.output_ids
    assert quiet.state.logprobs == pytest.approx(loud.state.logprobs, abs=1e-5)


def test_deferred_prefills_wait_for_company_or_the_step_limit(tiny_model_dir):
    engine = LLMEngine(EngineConfig(str(tiny_model_dir), kv_cache_tokens=4096))
    engine.scheduler.defer_prefills(1.0, 3)
    params = SamplingParams(**{**GREEDY, "max_new_tokens": 20})
    for i in range(2):
        engine.add_request(f"a{i}", [3, 4, 5 + i], params)
    engine.step()  # admits both
    engine.add_request("late", [7, 8, 9], params)
    joined = None
    for step in range(1, 6):
        outputs = engine.step()
        if any(o.request_id == "late" for o in outputs):
            joined = step
            break
    assert joined == 4  # held back for 3 decode steps (1 waiting < 1.0 x 2 running), then admitted

    engine = LLMEngine(EngineConfig(str(tiny_model_dir), kv_cache_tokens=4096))
    engine.scheduler.defer_prefills(1.0, 8)
    engine.add_request("a", [3, 4, 5], params)
    engine.step()
    engine.add_request("b", [7, 8, 9], params)  # 1 waiting >= 1.0 x 1 running: admitted at once
    assert any(o.request_id == "b" for o in engine.step())
    with pytest.raises(ValueError, match="wait_ratio"):
        engine.scheduler.defer_prefills(-1, 0)


def test_deferred_prefills_keep_the_outputs(tiny_model_dir):
    prompts = [[3, 4, 5], [9, 8, 7, 6], [5, 5, 5], [11, 12]]
    params = [SamplingParams(temperature=1.0, max_new_tokens=8, seed=10 + i, ignore_eos=True) for i in range(4)]
    expected = LLMEngine(EngineConfig(str(tiny_model_dir))).generate(prompts, params)
    engine = LLMEngine(EngineConfig(str(tiny_model_dir)))
    engine.scheduler.defer_prefills(2.0, 2)
    tokens: dict[str, list[int]] = {}
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        engine.add_request(f"r{i}", prompt, p)
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
    assert [tokens[f"r{i}"] for i in range(4)] == [e["token_ids"] for e in expected]


def test_http_clients_are_sharded_per_loop():
    from slime.utils import http_utils

    async def pick() -> list[int]:
        clients = [http_utils._shared_client() for _ in range(2 * http_utils.ShardedAsyncClient.SHARDS)]
        for client in set(clients):
            await client.aclose()
        return [id(c) for c in clients]

    ids = asyncio.run(pick())
    assert len(set(ids)) == http_utils.ShardedAsyncClient.SHARDS


@pytest.mark.parametrize("grouped", [False, True])
def test_server_overhead_benchmark_runs(tiny_model_dir, tmp_path, grouped):
    from benchmarks.server_overhead import main

    out = tmp_path / "overhead.json"
    result = main(["--model", str(tiny_model_dir), "--num-prompts", "4", "--samples", "2", "--max-new-tokens", "4",
                   "--repeats", "1", "--via-router", "--out", str(out)] + (["--grouped"] if grouped else []))
    assert json.loads(out.read_text()) == result
    assert result["grouped"] is grouped
    # every sample answered with exactly --max-new-tokens tokens (EOS ignored), batched or not
    assert result["server_tokens_per_s"] * result["server_seconds"] == pytest.approx(32, rel=0.01)
    assert result["requests"] == 8 and result["server_seconds"] > 0 and result["router_seconds"] > 0
    assert result["offline_steps"] >= 4 and result["server_steps"] >= 4
