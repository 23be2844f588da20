"""The default rollout's grouped path: a group's samples go out as ONE batched /generate request.

    python -m pytest -q tests/test_rollout_grouped.py

Unit tests (a fake `post`): the request shape, one request per distinct sampling params, n=1 in the single
form, failures, the --rollout-group-requests decision. Against the real built-in engine: seeded samples equal
those of the per-sample path, an engine 500 fails the whole group once, an abort mid-flight, and the batch
form through the real sglang-router.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from types import SimpleNamespace

import httpx
import pytest
import test_rollout_sglang
from test_rollout_sglang import PoisonProxy, free_port, poisoned_rollout, rollout_args, server_state

import slime.rollout.sglang_rollout as rollout
from slime.data.data_source import RolloutDataSourceWithBuffer
from slime.rollout.generate import base_sampling_params
from slime.rollout.sglang_rollout import (
    GenerateState,
    abort,
    generate_and_rm_group,
    generate_rollout,
    group_requests_enabled,
)
from slime.utils.types import Sample

engine = test_rollout_sglang.engine  # the module-scoped engine server fixture

PARAMS = {"max_new_tokens": 4, "temperature": 1.0, "top_p": 1.0, "top_k": -1}


def fake_args(**kw) -> SimpleNamespace:
    base = {"sglang_router_ip": "127.0.0.1", "sglang_router_port": 1, "hf_checkpoint": None, "rm_type": "random",
            "group_rm": False, "sglang_server_concurrency": 8, "rollout_max_retries": 1}
    base.update(kw)
    return SimpleNamespace(**base)


def answer(ids: list[int], reason: str = "length") -> dict:
    return {"text": "x" * len(ids), "output_ids": ids,
            "meta_info": {"finish_reason": {"type": reason}, "weight_version": "3",
                          "output_token_logprobs": [[-0.5, t, None] for t in ids]}}


@pytest.fixture()
def fake_post(monkeypatch):
    """Record each /generate body; answer every prompt with [prompt length, 7] (or the `reply` override)."""
    calls: list[dict] = []
    reply: dict = {}

    async def post(url, body, max_retries=1, **_):
        calls.append(json.loads(json.dumps(body)))
        if "fn" in reply:
            return reply["fn"](body)
        ids = body["input_ids"]
        if ids and isinstance(ids[0], list):
            return [answer([len(p), 7]) for p in ids]
        return answer([len(ids), 7])

    monkeypatch.setattr(rollout, "post", post)
    return SimpleNamespace(calls=calls, reply=reply)


def make_group(prompts: list[list[int]]) -> list[Sample]:
    return [Sample(index=i, group_index=0, prompt="p", tokens=list(p)) for i, p in enumerate(prompts)]


def run_group(args, group, params=PARAMS):
    GenerateState(args).reset()
    return asyncio.run(generate_and_rm_group(args, group, dict(params)))


# ---- unit: request shape and splitting ---------------------------------------------------------

def test_a_group_is_one_batched_request_split_back_in_order(fake_post):
    group = make_group([[1, 2, 3], [4, 5], [6]])
    out = run_group(fake_args(), group)
    assert len(fake_post.calls) == 1
    body = fake_post.calls[0]
    assert body["input_ids"] == [[1, 2, 3], [4, 5], [6]] and body["return_logprob"] is True
    assert body["sampling_params"] == PARAMS  # one object for all: sglang-router 0.3.x rejects a list
    for sample, plen in zip(out, (3, 2, 1)):
        assert sample.tokens[plen:] == [plen, 7] and sample.response_length == 2
        assert sample.loss_mask == [1, 1] and sample.rollout_log_probs == [-0.5, -0.5]
        assert sample.status == Sample.Status.TRUNCATED and sample.weight_versions == ["3"]


def test_n1_uses_the_single_request_form(fake_post):
    (sample,) = run_group(fake_args(), make_group([[1, 2]]))
    assert fake_post.calls == [{"input_ids": [1, 2], "sampling_params": PARAMS, "return_logprob": True}]
    assert sample.tokens == [1, 2, 2, 7] and sample.status == Sample.Status.TRUNCATED


def test_samples_with_different_budgets_go_in_separate_requests(fake_post):
    group = make_group([[1, 2], [3, 4], [5, 6]])
    # sample 1 is a partial-rollout continuation: 2 tokens done, so 2 of the 4 are left
    group[1].tokens, group[1].response_length, group[1].status = [3, 4, 8, 9], 2, Sample.Status.ABORTED
    group[1].loss_mask, group[1].rollout_log_probs = [1, 1], [-1.0, -1.0]
    # sample 2 already finished in an earlier step: not sent
    group[2].status, group[2].tokens, group[2].response_length = Sample.Status.COMPLETED, [5, 6, 1], 1
    group[2].reward = 1.0
    out = run_group(fake_args(), group)
    bodies = sorted(fake_post.calls, key=lambda b: b["sampling_params"]["max_new_tokens"])
    assert [b["sampling_params"]["max_new_tokens"] for b in bodies] == [2, 4]
    assert bodies[0]["input_ids"] == [3, 4, 8, 9] and bodies[1]["input_ids"] == [1, 2]
    assert out[1].tokens == [3, 4, 8, 9, 4, 7] and out[1].rollout_log_probs == [-1.0, -1.0, -0.5, -0.5]
    assert out[2].tokens == [5, 6, 1] and out[2].status == Sample.Status.COMPLETED and out[2].reward == 1.0


def test_a_failed_request_fails_every_sample_of_the_batch(fake_post):
    def boom(body):
        raise RuntimeError("POST failed after 1 attempts: HTTP 500")

    fake_post.reply["fn"] = boom
    out = run_group(fake_args(), make_group([[1], [2]]))
    assert all(s.status == Sample.Status.FAILED for s in out)
    assert all("HTTP 500" in s.metadata["failure_reason"] for s in out)


def test_a_short_answer_fails_the_batch(fake_post):
    fake_post.reply["fn"] = lambda body: [answer([1])]  # one answer for two prompts
    out = run_group(fake_args(), make_group([[1], [2]]))
    assert all(s.status == Sample.Status.FAILED for s in out)
    assert "for a batch of 2 prompts" in out[0].metadata["failure_reason"]


def test_an_aborted_rollout_sends_nothing(fake_post):
    args = fake_args()
    state = GenerateState(args)
    state.reset()

    async def go():
        state.aborted = True
        return await rollout._generate_and_rm_batched(args, make_group([[1], [2]]), dict(PARAMS), False, None)

    out = asyncio.run(go())
    state.aborted = False
    assert fake_post.calls == [] and all(s.status == Sample.Status.ABORTED for s in out)


def test_group_holds_one_concurrency_slot_per_sample(monkeypatch):
    args = fake_args(sglang_server_concurrency=4)
    in_flight, peak = [0], [0]

    async def post(url, body, **_):
        in_flight[0] += len(body["input_ids"])
        peak[0] = max(peak[0], in_flight[0])
        await asyncio.sleep(0.01)
        in_flight[0] -= len(body["input_ids"])
        return [answer([1]) for _ in body["input_ids"]]

    monkeypatch.setattr(rollout, "post", post)

    async def go():
        GenerateState(args).reset()
        groups = [make_group([[1], [2], [3]]) for _ in range(5)]
        return await asyncio.gather(*(generate_and_rm_group(args, g, dict(PARAMS)) for g in groups))

    results = asyncio.run(go())
    assert peak[0] == 3  # a second group of 3 would exceed the 4 slots, so groups run one after another
    assert all(s.status == Sample.Status.TRUNCATED for g in results for s in g)


def test_rollout_seed_gives_each_request_a_sampling_seed(fake_post):
    from slime.rollout.generate import sampling_seed

    args = fake_args(rollout_seed=42)
    group = make_group([[1], [2], [3]])
    for i, sample in enumerate(group):
        sample.index = 10 + i
    expected = sampling_seed(args, group[0])
    run_group(args, group)
    (body,) = fake_post.calls
    assert body["sampling_params"]["sampling_seed"] == expected  # the server adds k for its k-th prompt
    seeds = {sampling_seed(args, Sample(index=i)) for i in range(100)}
    assert len(seeds) == 100 and all(0 <= s < 2**62 for s in seeds)
    assert sampling_seed(fake_args(rollout_seed=43), Sample(index=10)) != expected
    half_done = Sample(index=10, response_length=5)  # a partial-rollout continuation draws a fresh stream
    assert sampling_seed(args, half_done) != expected
    fake_post.calls.clear()
    run_group(fake_args(rollout_seed=42), make_group([[1]]), dict(PARAMS, sampling_seed=7))  # the caller's wins
    assert fake_post.calls[0]["sampling_params"]["sampling_seed"] == 7
    assert sampling_seed(fake_args(rollout_seed=42, rollout_backend="sglang"), Sample(index=10)) is None
    assert sampling_seed(fake_args(), Sample(index=10)) is None


def test_the_flag_decides_and_custom_generate_stays_per_sample():
    group = make_group([[1]])
    assert group_requests_enabled(fake_args(), group)  # auto, builtin
    assert not group_requests_enabled(fake_args(rollout_backend="sglang"), group)
    assert not group_requests_enabled(fake_args(rollout_external_engine_addrs=["h:1"]), group)
    assert group_requests_enabled(fake_args(rollout_backend="sglang", rollout_group_requests="on"), group)
    assert not group_requests_enabled(fake_args(rollout_group_requests="off"), group)
    assert not group_requests_enabled(fake_args(rollout_group_requests="on", custom_generate_function_path="m.f"), group)


# ---- the real engine ---------------------------------------------------------------------------

def test_grouped_equals_per_sample_with_seeded_sampling(engine, tiny_model_dir):
    proxy = PoisonProxy(engine.url)
    try:
        args = rollout_args(tiny_model_dir, proxy.port, rollout_max_response_len=12, rm_type="random")
        params = dict(base_sampling_params(args), sampling_seed=1234)
        prompts = ["1+1=", "Say hi.", "Name a color.", "7*6="]
        results = {}
        args.rollout_group_requests = "off"  # one request per sample, seeded 1234 + i: what the batch's k-th gets
        before = len(proxy.bodies)
        results["off"] = [run_group(args, [Sample(index=i, prompt=p)], dict(params, sampling_seed=1234 + i))[0]
                          for i, p in enumerate(prompts)]
        results["off_requests"] = len(proxy.bodies) - before
        args.rollout_group_requests = "on"
        before = len(proxy.bodies)
        results["on"] = run_group(args, [Sample(index=i, prompt=p) for i, p in enumerate(prompts)], params)
        results["on_requests"] = len(proxy.bodies) - before
        assert results["off_requests"] == 4 and results["on_requests"] == 1
        for a, b in zip(results["off"], results["on"]):
            assert a.tokens == b.tokens and a.response == b.response and a.status == b.status
            assert a.loss_mask == b.loss_mask and a.response_length == b.response_length > 0
            assert a.rollout_log_probs == pytest.approx(b.rollout_log_probs, abs=1e-4)
            assert a.weight_versions == b.weight_versions and b.reward is not None
    finally:
        proxy.close()


@pytest.mark.parametrize("grouped", ["on", "off"])
def test_the_same_rollout_seed_draws_the_same_samples(engine, tiny_model_dir, grouped):
    def draw(rollout_seed: int) -> list[list[int]]:
        args = rollout_args(tiny_model_dir, engine.port, rollout_max_response_len=12, rollout_temperature=1.0,
                            rollout_group_requests=grouped, rollout_seed=rollout_seed)
        group = [Sample(index=20 + i, group_index=5, prompt="Count to three.") for i in range(4)]
        return [s.tokens for s in run_group(args, group, base_sampling_params(args))]

    first, again, other = draw(42), draw(42), draw(7)
    assert first == again  # whatever else the engine was doing meanwhile
    assert len({tuple(t) for t in first}) > 1  # the group's samples differ from each other
    assert first != other


def test_engine_500_fails_the_group_with_one_request_per_attempt(engine, tiny_model_dir, tmp_path):
    proxy, args = poisoned_rollout(tiny_model_dir, engine.url, tmp_path)
    try:
        output = generate_rollout(args, 0, RolloutDataSourceWithBuffer(args))
        kept = [g[0].group_index for g in output.samples]
        assert kept[:2] == [0, 2] and kept[2] in (3, 4, 5)
        assert output.metrics["rollout/failed_samples"] == 2 and output.metrics["rollout/drop/failed_sample"] == 1
        assert proxy.poisoned_calls == 2  # one batched request for the group, tried twice
        assert all(len(b["input_ids"]) == 2 and isinstance(b["input_ids"][0], list) for b in proxy.bodies)
    finally:
        proxy.close()


def test_eval_sends_whole_prompts_together_and_keeps_prompt_order(engine, tiny_model_dir, tmp_path):
    proxy = PoisonProxy(engine.url)
    try:
        data = tmp_path / "eval.jsonl"
        data.write_text("".join(json.dumps({"input": f"{i}+1=", "label": str(i + 1)}) + "\n" for i in range(5)))
        args = rollout_args(tiny_model_dir, proxy.port, rm_type="math", n_samples_per_eval_prompt=3,
                            eval_max_response_len=3, eval_datasets=[{"name": "arith", "path": str(data)}])
        output = generate_rollout(args, 0, None, evaluation=True)
        samples = output.data["arith"]["samples"]
        assert [s.group_index for s in samples] == [p for p in range(5) for _ in range(3)]
        assert [s.index for s in samples] == list(range(15))
        assert all(s.status in (Sample.Status.COMPLETED, Sample.Status.TRUNCATED) for s in samples)
        # EVAL_SAMPLES_PER_REQUEST = 8 holds two prompts of 3 samples: requests of 6, 6 and 3 prompts
        sizes = sorted(len(b["input_ids"]) for b in proxy.bodies)
        assert sizes == [3, 6, 6]
        assert output.metrics["eval/arith/failed"] == 0
    finally:
        proxy.close()


def test_abort_mid_flight_returns_partial_samples(engine, tiny_model_dir):
    args = rollout_args(tiny_model_dir, engine.port, rollout_max_response_len=1500, partial_rollout=True)
    params = dict(base_sampling_params(args), ignore_eos=True)
    group = [Sample(index=i, group_index=0, prompt="Count to three.") for i in range(3)]

    async def go():
        state = GenerateState(args)
        state.reset()
        task = asyncio.ensure_future(generate_and_rm_group(args, group, params))
        state.pendings.add(task)
        start = time.monotonic()
        while server_state(engine.url)["num_running_requests"] < 3 and time.monotonic() - start < 30:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        leftovers = await abort(args, 5)
        return task.result(), leftovers

    out, leftovers = asyncio.run(go())
    assert leftovers == [out]  # --partial-rollout: the half-done group goes back to the buffer
    for s in out:
        assert s.status == Sample.Status.ABORTED and s.reward is None
        assert 0 < s.response_length < 1500
        assert len(s.loss_mask) == len(s.rollout_log_probs) == s.response_length
        assert s.metadata["start_rollout_id"] == 5
    assert server_state(engine.url)["num_running_requests"] == 0


def test_batch_form_through_the_real_sglang_router(engine, tiny_model_dir):
    pytest.importorskip("sglang_router")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1",
                             "--port", str(port), "--policy", "round_robin", "--log-level", "warn",
                             "--worker-urls", engine.url], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                workers = httpx.get(f"http://127.0.0.1:{port}/workers", timeout=2).json()["workers"]
                if workers and all(w["is_healthy"] for w in workers):
                    break
            except (httpx.TransportError, ValueError, KeyError):
                pass
            assert time.monotonic() < deadline, "sglang-router did not become ready"
            time.sleep(0.3)
        args = rollout_args(tiny_model_dir, port, rollout_max_response_len=5, rollout_group_requests="on")
        out = run_group(args, [Sample(index=i, prompt=p) for i, p in enumerate(["1+1=", "Say hi.", "9-4="])],
                        base_sampling_params(args))
        for s in out:
            assert s.status in (Sample.Status.COMPLETED, Sample.Status.TRUNCATED) and s.response_length > 0
            assert len(s.rollout_log_probs) == len(s.loss_mask) == s.response_length
    finally:
        proc.terminate()
        proc.wait(30)
