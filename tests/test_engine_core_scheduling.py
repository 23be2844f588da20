"""The engine core's scheduler end to end: continuous batching, preemption, prefix sharing, seeds,
stop conditions, aborts, memory release.

    cd /work/main && python -m pytest -q tests/test_engine_core_scheduling.py
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_engine_core_checkpoint import ENGINE_PROMPTS

from slime.engine import EngineConfig, LLMEngine, SamplingParams

PROMPTS = ENGINE_PROMPTS
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=24)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_dir(sharp_tiny_dir) -> Path:
    return sharp_tiny_dir


def make_engine(path: Path, **kwargs) -> LLMEngine:
    kwargs.setdefault("kv_cache_tokens", 4096)
    return LLMEngine(EngineConfig(str(path), **kwargs))


def one_at_a_time(path: Path, prompts: list[list[int]], params: list[SamplingParams]) -> list[dict]:
    engine = make_engine(path)
    return [engine.generate([prompt], p)[0] for prompt, p in zip(prompts, params)]


def mixed_params() -> list[SamplingParams]:
    """Greedy and seeded sampling, so batching bugs show up in both paths."""
    return [GREEDY if i % 2 == 0 else SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=24, seed=100 + i)
            for i in range(len(PROMPTS))]


def run_to_completion(engine: LLMEngine) -> dict[str, dict]:
    results: dict[str, dict] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            entry = results.setdefault(out.request_id, {"token_ids": [], "logprobs": [], "finish_reason": None})
            entry["token_ids"] += out.token_ids
            entry["logprobs"] += out.logprobs
            if out.finished:
                entry["finish_reason"] = out.finish_reason
    return results


def test_requests_joining_a_running_batch_match_one_at_a_time(model_dir):
    params = mixed_params()
    expected = one_at_a_time(model_dir, PROMPTS, params)
    engine = make_engine(model_dir)
    results: dict[str, dict] = {}
    first_token_step: dict[str, int] = {}
    finished_step: dict[str, int] = {}
    pending = list(enumerate(zip(PROMPTS, params)))
    step = 0
    while pending or engine.has_unfinished_requests():
        if pending and step % 3 == 0:  # a new request every third step, while the others decode
            i, (prompt, p) = pending.pop(0)
            engine.add_request(f"r{i}", prompt, p)
        for out in engine.step():
            entry = results.setdefault(out.request_id, {"token_ids": [], "logprobs": []})
            entry["token_ids"] += out.token_ids
            entry["logprobs"] += out.logprobs
            first_token_step.setdefault(out.request_id, step)
            if out.finished:
                finished_step[out.request_id] = step
        step += 1
    assert first_token_step["r1"] < finished_step["r0"]  # r1 really joined while r0 was running
    for i, exp in enumerate(expected):
        assert results[f"r{i}"]["token_ids"] == exp["token_ids"]
        torch.testing.assert_close(torch.tensor(results[f"r{i}"]["logprobs"]), torch.tensor(exp["logprobs"]),
                                   atol=1e-4, rtol=0)


def test_tiny_kv_budget_preempts_and_outputs_stay_the_same(model_dir):
    params = [SamplingParams(temperature=p.temperature, top_p=p.top_p, max_new_tokens=p.max_new_tokens, seed=p.seed,
                             ignore_eos=True) for p in mixed_params()]
    expected = one_at_a_time(model_dir, PROMPTS, params)
    engine = make_engine(model_dir, kv_cache_tokens=64, block_size=8)
    results = engine.generate(PROMPTS, params)
    assert engine.num_preemptions > 0
    assert [r["token_ids"] for r in results] == [e["token_ids"] for e in expected]
    for r, e in zip(results, expected):
        torch.testing.assert_close(torch.tensor(r["logprobs"]), torch.tensor(e["logprobs"]), atol=1e-4, rtol=0)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_group_samples_share_the_prompt_blocks(model_dir):
    prompt = list(range(20, 60))  # 40 tokens: 4 full blocks of 8 can be shared, the 5th holds the last token
    params = [SamplingParams(temperature=1.0, max_new_tokens=10, seed=s, ignore_eos=True) for s in range(4)]
    engine = make_engine(model_dir, block_size=8)
    for i, p in enumerate(params):
        engine.add_request(f"s{i}", prompt, p)
    outputs = engine.step()  # one prefill of the whole group
    assert [o.cached_tokens for o in outputs] == [0, 32, 32, 32]
    tables = [engine.requests[f"s{i}"].block_table for i in range(4)]
    assert all(t[:4] == tables[0][:4] for t in tables)
    assert len({t[4] for t in tables}) == 4
    assert [engine.block_manager.blocks[b].ref_count for b in tables[0][:4]] == [4, 4, 4, 4]
    used = engine.block_manager.num_blocks - engine.block_manager.num_free_blocks
    assert used == 4 + 4  # instead of 4 * 5 without sharing
    results = run_to_completion(engine)
    expected = one_at_a_time(model_dir, [prompt] * 4, params)
    for i, exp in enumerate(expected):
        assert [outputs[i].token_ids[0]] + results[f"s{i}"]["token_ids"] == exp["token_ids"]
    assert len({tuple(e["token_ids"]) for e in expected}) > 1  # different seeds, different samples


def test_same_seed_same_tokens_whatever_the_batch(model_dir):
    params = SamplingParams(temperature=1.0, top_k=40, max_new_tokens=16, seed=1234, ignore_eos=True)
    alone = make_engine(model_dir).generate([PROMPTS[2]], params)[0]
    mates = [SamplingParams(temperature=0.8, max_new_tokens=n, seed=n, ignore_eos=True) for n in (3, 9, 20, 5)]
    engine = make_engine(model_dir)
    batched = engine.generate(PROMPTS[:2] + [PROMPTS[2]] + PROMPTS[3:], mates[:2] + [params] + mates[2:])[2]
    assert batched["token_ids"] == alone["token_ids"]
    other_seed = SamplingParams(temperature=1.0, top_k=40, max_new_tokens=16, seed=4321, ignore_eos=True)
    assert make_engine(model_dir).generate([PROMPTS[2]], other_seed)[0]["token_ids"] != alone["token_ids"]
    unseeded = SamplingParams(temperature=1.0, max_new_tokens=16, ignore_eos=True)
    first, second = make_engine(model_dir).generate([PROMPTS[2]] * 2, unseeded)
    assert first["token_ids"] != second["token_ids"]  # the engine generator gives each request its own seed


def test_top_k_one_is_greedy(model_dir):
    engine = make_engine(model_dir)
    greedy = engine.generate(PROMPTS, GREEDY)
    top1 = engine.generate(PROMPTS, [SamplingParams(temperature=1.3, top_k=1, max_new_tokens=24, seed=i)
                                     for i in range(len(PROMPTS))])
    assert [r["token_ids"] for r in top1] == [r["token_ids"] for r in greedy]


def test_eos_stop_ids_ignore_eos_and_max_new_tokens(model_dir):
    engine = make_engine(model_dir)
    results = engine.generate(PROMPTS, GREEDY)
    stopped = [(p, r) for p, r in zip(PROMPTS, results) if r["finish_reason"]["type"] == "stop"]
    assert stopped, "the checkpoint should end at least one greedy answer with EOS"
    prompt, result = stopped[0]
    eos = result["token_ids"][-1]
    assert eos in engine.eos_token_ids and result["finish_reason"] == {"type": "stop", "matched": eos}

    [ignored] = engine.generate([prompt], SamplingParams(temperature=0.0, max_new_tokens=24, ignore_eos=True))
    assert ignored["token_ids"][:len(result["token_ids"])] == result["token_ids"]
    assert len(ignored["token_ids"]) == 24 and ignored["finish_reason"] == {"type": "length", "length": 24}

    [short] = engine.generate([prompt], SamplingParams(temperature=0.0, max_new_tokens=1))
    assert short["token_ids"] == result["token_ids"][:1]

    [empty] = engine.generate([prompt], SamplingParams(max_new_tokens=0))
    assert empty == {"token_ids": [], "logprobs": [], "finish_reason": {"type": "length", "length": 0}}


def test_context_length_finishes_with_length(model_dir):
    engine = make_engine(model_dir, context_length=16)
    [result] = engine.generate([list(range(50, 60))], SamplingParams(temperature=0.0, max_new_tokens=20, ignore_eos=True))
    assert len(result["token_ids"]) == 6 and result["finish_reason"] == {"type": "length", "length": 6}
    with pytest.raises(ValueError, match="context length of 16"):
        engine.add_request("too-long", list(range(16)), GREEDY)
    small_cache = make_engine(model_dir, kv_cache_tokens=32, block_size=8)
    with pytest.raises(ValueError, match="KV cache capacity of 32"):
        small_cache.add_request("too-long", list(range(40)), GREEDY)


def test_abort_one_and_all(model_dir):
    params = SamplingParams(temperature=0.0, max_new_tokens=20, ignore_eos=True)
    expected = make_engine(model_dir).generate(PROMPTS[:3], params)
    engine = make_engine(model_dir)
    for i, prompt in enumerate(PROMPTS[:3]):
        engine.add_request(f"r{i}", prompt, params)
    for _ in range(3):
        engine.step()
    assert engine.abort_request("r1") is True
    assert engine.abort_request("r1") is False and engine.abort_request("nope") is False
    outputs = engine.step()
    abort = [o for o in outputs if o.request_id == "r1"]
    assert len(abort) == 1 and abort[0].finished and abort[0].token_ids == []
    assert abort[0].finish_reason["type"] == "abort" and abort[0].completion_tokens == 3
    rest = run_to_completion(engine)
    assert "r1" not in rest
    assert rest["r0"]["token_ids"] == expected[0]["token_ids"][4:]  # 3 steps + the abort step advanced r0 by 4
    assert rest["r2"]["token_ids"] == expected[2]["token_ids"][4:]

    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"b{i}", prompt, params)
    engine.step()
    engine.add_request("queued", PROMPTS[0], params)  # still waiting when aborted
    assert sorted(engine.abort_all()) == sorted([f"b{i}" for i in range(len(PROMPTS))] + ["queued"])
    outputs = engine.step()
    assert {o.request_id for o in outputs} == {f"b{i}" for i in range(len(PROMPTS))} | {"queued"}
    assert all(o.finished and o.finish_reason["type"] == "abort" for o in outputs)
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_release_and_resume_memory(model_dir):
    engine = make_engine(model_dir)
    before = engine.generate(PROMPTS, GREEDY)
    engine.add_request("busy", PROMPTS[0], GREEDY)
    with pytest.raises(RuntimeError, match="unfinished requests"):
        engine.release_memory(["kv_cache"])
    engine.abort_all()
    engine.step()
    engine.release_memory(["kv_cache", "weights"])
    assert engine.runner.kv_cache is None
    with pytest.raises(RuntimeError, match="resume_memory"):
        engine.add_request("while-released", PROMPTS[0], GREEDY)
    with pytest.raises(ValueError, match="memory tags"):
        engine.resume_memory(["kv"])
    engine.resume_memory(None)
    assert [r["token_ids"] for r in engine.generate(PROMPTS, GREEDY)] == [r["token_ids"] for r in before]
    assert engine.flush_cache() is True
    engine.add_request("busy", PROMPTS[0], GREEDY)
    assert engine.flush_cache() is False


def test_bad_requests_give_clear_errors(model_dir):
    engine = make_engine(model_dir)
    engine.add_request("a", PROMPTS[0], GREEDY)
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("a", PROMPTS[0], GREEDY)
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("b", [], GREEDY)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.add_request("c", [1, 320], GREEDY)
    for bad, field in [(dict(temperature=-1), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_k=0), "top_k"),
                       (dict(min_p=2.0), "min_p"), (dict(max_new_tokens=-1), "max_new_tokens"),
                       (dict(stop_token_ids=[-3]), "stop_token_ids")]:
        with pytest.raises(ValueError, match=field):
            SamplingParams(**bad)


def test_quiet_requests_report_once_with_every_token_and_aborts_keep_theirs(model_dir):
    params = SamplingParams(temperature=0.8, max_new_tokens=12, seed=3, ignore_eos=True)
    loud = make_engine(model_dir).generate([PROMPTS[0]], params)[0]
    engine = make_engine(model_dir)
    engine.add_request("quiet", PROMPTS[0], params, quiet=True)
    engine.add_request("cut", PROMPTS[1], SamplingParams(temperature=0.8, max_new_tokens=50, seed=4), quiet=True)
    reports = []
    while "quiet" in engine.requests:
        reports += engine.step()
    assert [r.request_id for r in reports] == ["quiet"]  # nothing per step, one report at the end
    (done,) = reports
    assert done.finished and done.token_ids == loud["token_ids"]  # seeded: the same tokens in any batch
    assert done.logprobs == pytest.approx(loud["logprobs"], abs=1e-4)  # batched with "cut": float noise only
    assert done.completion_tokens == 12
    made = engine.requests["cut"].num_output_tokens
    assert made > 0
    engine.abort_request("cut")
    (cut,) = engine.step()
    assert cut.finish_reason["type"] == "abort" and len(cut.token_ids) == len(cut.logprobs) == made
