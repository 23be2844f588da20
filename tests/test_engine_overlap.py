"""Overlap scheduling (`--enable-overlap-schedule`) gives the step-by-step engine's outputs, on CPU.

    cd /work/main && python -m pytest -q tests/test_engine_overlap.py

Each test drives two engines over the same checkpoint, one with `overlap_schedule=True`, through the same
requests and events (requests joining a running batch, aborts, a weight update mid-generation) and compares
tokens, log-probs and finish reasons. Seeded sampling is batch-independent, so a step that carries a sequence
which already stopped (the overlap engine's extra row) must change nothing.
"""

from __future__ import annotations

import random

import pytest
import torch

from slime.engine import EngineConfig, LLMEngine, SamplingParams
from slime.engine.overlap import PENDING


def _engines(model_dir, **kw) -> tuple[LLMEngine, LLMEngine]:
    return tuple(LLMEngine(EngineConfig(str(model_dir), device="cpu", kv_cache_tokens=kw.pop("kv", 8192),
                                        overlap_schedule=overlap, **kw)) for overlap in (False, True))


def _requests(seed: int, count: int, eos_hint: list[int]) -> list[tuple[list[int], SamplingParams]]:
    rng = random.Random(seed)
    out = []
    for i in range(count):
        prompt = [rng.randrange(3, 250) for _ in range(rng.randrange(1, 40))]
        kind = i % 5
        if kind == 0:
            params = SamplingParams(temperature=0.0, max_new_tokens=rng.randrange(1, 50))
        elif kind == 1:
            params = SamplingParams(temperature=1.0, max_new_tokens=40, seed=i, ignore_eos=True)
        elif kind == 2:  # stop ids that sampled text really contains end some of these early
            params = SamplingParams(temperature=1.2, max_new_tokens=60, seed=i, stop_token_ids=eos_hint)
        elif kind == 3:
            params = SamplingParams(temperature=0.8, top_k=20, max_new_tokens=30, seed=i, min_new_tokens=5,
                                    stop_token_ids=eos_hint)
        else:
            params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=rng.randrange(1, 70), seed=i)
        out.append((prompt, params))
    return out


def _assert_same(a: list[dict], b: list[dict]) -> None:
    assert [x["token_ids"] for x in a] == [x["token_ids"] for x in b]
    assert [x["finish_reason"] for x in a] == [x["finish_reason"] for x in b]
    for x, y in zip(a, b):
        torch.testing.assert_close(torch.tensor(x["logprobs"]), torch.tensor(y["logprobs"]), atol=1e-5, rtol=0)


def _frequent_tokens(engine: LLMEngine) -> list[int]:
    """Tokens the tiny model samples often: as stop ids they end sequences at scattered steps."""
    counts: dict[int, int] = {}
    for result in engine.generate([[5, 6, 7]] * 4, SamplingParams(temperature=1.2, max_new_tokens=40, seed=3)):
        for token in result["token_ids"]:
            counts[token] = counts.get(token, 0) + 1
    return sorted(counts, key=lambda t: -counts[t])[:3]


def test_generate_matches_the_step_by_step_engine(tiny_model_dir):
    plain, overlapped = _engines(tiny_model_dir)
    stops = _frequent_tokens(plain)
    requests = _requests(0, 40, stops)
    prompts, params = [p for p, _ in requests], [s for _, s in requests]
    expected = plain.generate(prompts, params)
    assert any(r["finish_reason"]["type"] == "stop" for r in expected), "some requests must stop on a stop id"
    assert len({len(r["token_ids"]) for r in expected}) > 5, "requests must end at many different steps"
    _assert_same(expected, overlapped.generate(prompts, params))
    quiet = _drive(overlapped, requests, {0: ("add",)})  # the server's form: every token in one output at the end
    assert [quiet[f"r{i}"]["token_ids"] for i in range(len(requests))] == [r["token_ids"] for r in expected]
    # nothing of the placeholders leaks into the prefix cache or the running state
    assert all(PENDING not in block.token_ids for block in overlapped.block_manager.blocks)
    assert not overlapped.scheduler.running and overlapped.block_manager.num_free_blocks == plain.block_manager.num_free_blocks


def test_context_length_and_a_small_kv_cache_end_sequences_the_same_way(tiny_model_dir):
    plain, overlapped = _engines(tiny_model_dir, context_length=48, kv=512)  # 512 tokens: prefills queue up
    requests = _requests(1, 24, [])
    prompts, params = [p for p, _ in requests], [s for _, s in requests]
    expected = plain.generate(prompts, params)
    assert any(r["finish_reason"] == {"type": "length", "length": len(r["token_ids"])} and
               len(r["token_ids"]) < p.max_new_tokens for r, p in zip(expected, params)), "the context must end some"
    _assert_same(expected, overlapped.generate(prompts, params))


def _drive(engine: LLMEngine, requests, events: dict[int, tuple]) -> dict[str, dict]:
    """Add the first half of `requests`, step, apply `events[call]` ("add" the rest, "abort" an id, "weights"),
    until every request has finished; the outputs gathered from `step()`."""
    results: dict[str, dict] = {}

    def add(start: int, stop: int) -> None:
        for i in range(start, stop):
            prompt, params = requests[i]
            engine.add_request(f"r{i}", prompt, params, quiet=i % 2 == 1)  # quiet: one output, at the end
            results[f"r{i}"] = {"token_ids": [], "logprobs": [], "finish_reason": None}

    add(0, len(requests) // 2)
    call = 0
    while engine.has_unfinished_requests() or call in events:
        event = events.get(call)
        if event == ("add",):
            add(len(requests) // 2, len(requests))
        elif event and event[0] == "abort":
            engine.abort_request(event[1])
        elif event and event[0] == "weights":
            engine.load_weights(event[1])
        for out in engine.step():
            results[out.request_id]["token_ids"] += out.token_ids
            results[out.request_id]["logprobs"] += out.logprobs
            if out.finished:
                results[out.request_id]["finish_reason"] = out.finish_reason
        call += 1
    return results


def test_requests_joining_and_aborts_mid_generation(tiny_model_dir):
    plain, overlapped = _engines(tiny_model_dir)
    requests = _requests(2, 16, _frequent_tokens(plain))
    events = {4: ("add",), 9: ("abort", "r1"), 15: ("abort", "r12")}
    expected, got = _drive(plain, requests, events), _drive(overlapped, requests, events)
    aborted = {rid for rid in expected if "abort" in (expected[rid]["finish_reason"]["type"],
                                                      got[rid]["finish_reason"]["type"])}
    assert "r1" in aborted and len(aborted) < len(expected) - 8
    # a join costs the overlap engine one extra call (it applies the step in flight before the prefill), so an
    # abort after it cuts one token earlier there; a request may even finish before it in one engine only
    for rid in aborted:
        shorter, longer = sorted((expected[rid]["token_ids"], got[rid]["token_ids"]), key=len)
        assert longer[:len(shorter)] == shorter and len(longer) - len(shorter) <= 1, rid
    for rid in set(expected) - aborted:
        assert expected[rid]["token_ids"] == got[rid]["token_ids"], rid
        assert expected[rid]["finish_reason"] == got[rid]["finish_reason"], rid


def test_a_weight_update_between_steps_applies_the_step_in_flight_first(tiny_model_dir):
    plain, overlapped = _engines(tiny_model_dir)
    update = [(name, param.detach().clone() * 1.05) for name, param in plain.runner.model.named_parameters()
              if name.endswith("mlp.down_proj.weight")]
    assert update, "the tiny model must expose its MLP weights"
    requests = [(p, SamplingParams(temperature=1.0, max_new_tokens=30, seed=i, ignore_eos=True))
                for i, (p, _) in enumerate(_requests(3, 8, []))]
    events = {6: ("weights", update)}
    expected, got = _drive(plain, requests, events), _drive(overlapped, requests, events)
    for rid in expected:
        assert expected[rid]["token_ids"] == got[rid]["token_ids"], rid
        torch.testing.assert_close(torch.tensor(expected[rid]["logprobs"]), torch.tensor(got[rid]["logprobs"]),
                                   atol=1e-5, rtol=0)


def test_overlap_needs_tp_size_one_and_the_server_flag_turns_it_on(tiny_model_dir):
    from slime.engine.server_args import engine_config_kwargs, parse_server_args

    with pytest.raises(ValueError, match="--enable-overlap-schedule needs --tp-size 1"):
        EngineConfig(str(tiny_model_dir), device="cpu", overlap_schedule=True, tp_size=2)
    args = parse_server_args(["--model-path", str(tiny_model_dir), "--device", "cpu", "--enable-overlap-schedule"])
    assert engine_config_kwargs(args)["overlap_schedule"] is True
    assert "overlap_schedule" not in engine_config_kwargs(parse_server_args(["--model-path", str(tiny_model_dir)]))
    off = parse_server_args(["--model-path", str(tiny_model_dir), "--disable-overlap-schedule"])
    assert engine_config_kwargs(off)["overlap_schedule"] is False
    both = parse_server_args(["--model-path", str(tiny_model_dir), "--disable-overlap-schedule",
                              "--enable-overlap-schedule"])
    with pytest.raises(ValueError, match="contradict"):
        engine_config_kwargs(both)
    # unset: on for CUDA at tp 1 only (the GPU test compares it with the step-by-step engine there)
    assert not EngineConfig(str(tiny_model_dir), device="cpu").uses_overlap_schedule
    assert EngineConfig(str(tiny_model_dir), device="cpu", overlap_schedule=True).uses_overlap_schedule
