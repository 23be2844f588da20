"""`min_new_tokens`: stop ids masked in the sampler, stop conditions held back, stop strings ignored early.

    cd /work/main && python -m pytest -q tests/test_engine_polish_min_new_tokens.py

Log-probs follow SGLang: the min-new-tokens penalty is applied to the logits before sampling, so the
reported log-prob is that of the masked distribution (stop ids at -inf, the rest renormalised).
"""

from __future__ import annotations

import random
from pathlib import Path

import httpx
import pytest
import torch
from test_engine_server import ServerProcess

from slime.engine import EngineConfig, LLMEngine, SamplingParams
from slime.engine.protocol import GenerateItem, ProtocolError, StopStringWatcher, output_text, validate_sampling_params
from slime.engine.sampler import Sampler, SamplingTensors


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_dir(sharp_tiny_dir) -> Path:
    return sharp_tiny_dir


@pytest.fixture(scope="module")
def engine(model_dir) -> LLMEngine:
    return LLMEngine(EngineConfig(str(model_dir), kv_cache_tokens=8192, block_size=4))


@pytest.fixture(scope="module")
def eos_first_prompts(engine) -> list[list[int]]:
    """Prompts whose greedy answer is EOS at once."""
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 320) for _ in range(3)] for _ in range(1000)]
    results = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=1))
    found = [p for p, r in zip(prompts, results) if r["token_ids"][0] in engine.eos_token_ids]
    assert len(found) >= 2, "the sharpened checkpoint should answer some prompt with EOS at once"
    return found


def hf_logits(model_dir: Path, prompt: list[int], response: list[int]) -> torch.Tensor:
    """Float32 next-token logits at each response position."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0].float()
    return logits[len(prompt) - 1:len(prompt) + len(response) - 1]


def test_greedy_eos_prompt_still_makes_min_new_tokens(engine, eos_first_prompts, model_dir):
    prompt = eos_first_prompts[0]
    [plain] = engine.generate([prompt], SamplingParams(temperature=0.0, max_new_tokens=12))
    assert plain["finish_reason"]["type"] == "stop" and len(plain["token_ids"]) == 1
    [held] = engine.generate([prompt], SamplingParams(temperature=0.0, max_new_tokens=12, min_new_tokens=6))
    tokens = held["token_ids"]
    assert len(tokens) >= 6 and not set(tokens[:6]) & set(engine.eos_token_ids)
    if held["finish_reason"]["type"] == "stop":
        assert tokens[-1] in engine.eos_token_ids and len(tokens) > 6
    else:
        assert held["finish_reason"] == {"type": "length", "length": 12}

    logits = hf_logits(model_dir, prompt, tokens)
    masked = logits.clone()
    masked[:6, engine.eos_token_ids] = float("-inf")  # the first 6 positions are held back
    assert tokens == masked.argmax(-1).tolist()  # greedy = best non-stop token, then free again
    expected = torch.log_softmax(masked, -1).gather(-1, torch.tensor(tokens)[:, None]).squeeze(-1)
    torch.testing.assert_close(torch.tensor(held["logprobs"]), expected, atol=1e-4, rtol=0)
    unmasked_first = torch.log_softmax(logits[0], -1)[tokens[0]].item()
    assert held["logprobs"][0] > unmasked_first + 1e-3  # renormalised without EOS: SGLang's report


def test_stop_token_ids_are_held_back_too_and_neighbours_are_unaffected(engine):
    prompts = [[40, 41, 42, 43], [5, 6, 7]]
    free = [SamplingParams(temperature=1.0, max_new_tokens=10, seed=5, ignore_eos=True),
            SamplingParams(temperature=0.8, max_new_tokens=10, seed=6, ignore_eos=True)]
    reference = engine.generate(prompts, free)
    stop_id = reference[0]["token_ids"][2]
    first = reference[0]["token_ids"].index(stop_id)
    [stopped] = engine.generate(prompts[:1], [SamplingParams(temperature=1.0, max_new_tokens=10, seed=5,
                                                             stop_token_ids=[stop_id])])
    assert stopped["finish_reason"] == {"type": "stop", "matched": stop_id} and len(stopped["token_ids"]) == first + 1
    held = SamplingParams(temperature=1.0, max_new_tokens=10, seed=5, stop_token_ids=[stop_id],
                          min_new_tokens=first + 2)
    batch = engine.generate(prompts, [held, free[1]])
    assert len(batch[0]["token_ids"]) >= first + 2 and stop_id not in batch[0]["token_ids"][:first + 2]
    assert batch[0]["token_ids"][:first] == reference[0]["token_ids"][:first]  # same seed until the masked step
    assert batch[1] == reference[1]  # a request without min_new_tokens is untouched by its neighbour's mask
    [capped] = engine.generate(prompts[:1], [SamplingParams(temperature=0.0, max_new_tokens=3, min_new_tokens=50)])
    assert capped["finish_reason"] == {"type": "length", "length": 3}  # max_new_tokens wins


def test_sampler_masks_only_rows_short_of_min_new_tokens():
    vocab = 40
    logits = torch.zeros(4, vocab)
    logits[:, 2] = 40.0  # EOS would always win
    logits[:, 7] = 30.0  # then the stop token id
    params = [SamplingParams(temperature=1.0, min_new_tokens=3, stop_token_ids=[7], seed=s) for s in range(4)]
    t = SamplingTensors.build(params, [0, 1, 2, 3], [0, 2, 3, 5], vocab, "cpu", eos_token_ids=[2, 99])
    assert t.suppressed_ids is not None and t.suppressed_ids.shape == (4, 2)  # 99 is outside the vocabulary
    tokens, logprobs = Sampler()(logits, t)
    assert tokens[:2].tolist() != [2, 2] and not set(tokens[:2].tolist()) & {2, 7}
    assert tokens[2:].tolist() == [2, 2]  # positions 3 and 5: free again
    expected = torch.log_softmax(logits[0].index_fill(0, torch.tensor([2, 7]), float("-inf")), -1)[tokens[0]]
    torch.testing.assert_close(logprobs[0], expected)
    greedy = [SamplingParams(temperature=0.0, min_new_tokens=1)]
    g = SamplingTensors.build(greedy, [0], [0], vocab, "cpu", eos_token_ids=[2])
    assert Sampler()(logits[:1], g)[0].tolist() == [7]
    none = SamplingTensors.build([SamplingParams(temperature=0.0)], [0], [0], vocab, "cpu", eos_token_ids=[2])
    assert none.suppressed_ids is None


def test_bad_min_new_tokens_give_clear_errors(engine):
    with pytest.raises(ValueError, match="min_new_tokens must be >= 0"):
        SamplingParams(min_new_tokens=-1)
    with pytest.raises(ProtocolError, match="min_new_tokens must be >= 0"):
        validate_sampling_params({"min_new_tokens": -2})
    with pytest.raises(ProtocolError, match="min_new_tokens must be an integer"):
        validate_sampling_params({"min_new_tokens": 1.5})
    assert validate_sampling_params({"min_new_tokens": 4})["min_new_tokens"] == 4
    with pytest.raises(ValueError, match="whole vocabulary"):
        engine.add_request("all-stop", [5, 6], SamplingParams(min_new_tokens=1, stop_token_ids=list(range(320))))


class _CharTokenizer:
    """One character per token id (id = ord), enough for the stop-string watcher."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids)


def _watch(text: str, stop: list[str], min_new_tokens: int, chunk: int) -> tuple[str, int] | None:
    item = GenerateItem(rid="r", prompt_ids=[1], engine_params={"min_new_tokens": min_new_tokens}, stop=stop)
    watcher = StopStringWatcher(_CharTokenizer(), item)
    ids = [ord(c) for c in text]
    for end in range(chunk, len(ids) + chunk, chunk):
        hit = watcher.check(ids[:end])
        if hit is not None:
            return hit
    return None


@pytest.mark.parametrize("chunk", [1, 3, 50])
def test_stop_strings_complete_within_min_new_tokens_are_ignored(chunk):
    text = "ab.cd.efgh.ij"
    assert _watch(text, ["."], 0, chunk) == (".", 3)
    assert _watch(text, ["."], 3, chunk) == (".", 3)  # the 3rd token completes it: allowed
    assert _watch(text, ["."], 4, chunk) == (".", 6)
    assert _watch(text, ["d.e"], 5, chunk) == ("d.e", 7)  # straddles the boundary: counts
    assert _watch(text, ["ab"], 5, chunk) is None
    assert _watch(text, ["cd", "gh"], 6, chunk) == ("gh", 10)
    item = GenerateItem(rid="r", prompt_ids=[1], engine_params={"min_new_tokens": 4}, stop=["."])
    from slime.engine.async_engine import RequestState

    state = RequestState(request_id="r")
    state.output_ids = [ord(c) for c in text[:6]]
    state.finished, state.finish_reason = True, {"type": "stop", "matched": "."}
    assert output_text(_CharTokenizer(), item, state) == "ab.cd"  # trimmed at the stop that ended it


def test_server_accepts_min_new_tokens_and_holds_stop_strings(model_dir, eos_first_prompts):
    server = ServerProcess(model_dir, "--context-length", "256").wait_healthy()
    try:
        url = server.url + "/generate"
        prompt = eos_first_prompts[1]
        plain = httpx.post(url, json={"input_ids": prompt, "sampling_params": {"temperature": 0, "max_new_tokens": 8}},
                           timeout=60).json()
        assert plain["meta_info"]["completion_tokens"] == 1
        body = {"input_ids": prompt, "return_logprob": True,
                "sampling_params": {"temperature": 0, "max_new_tokens": 8, "min_new_tokens": 5,
                                    "skip_special_tokens": False}}
        held = httpx.post(url, json=body, timeout=60).json()
        assert held["meta_info"]["completion_tokens"] >= 5
        text = held["text"]
        stop = text[1]  # a character the answer has early on
        body["sampling_params"] = {**body["sampling_params"], "stop": [stop], "ignore_eos": True}
        stopped = httpx.post(url, json=body, timeout=60).json()
        ids = stopped["output_ids"]
        assert stopped["meta_info"]["finish_reason"] in ({"type": "stop", "matched": stop},
                                                        {"type": "length", "length": 8})
        assert len(ids) >= 5 and ids == held["output_ids"][:len(ids)]
        from transformers import AutoTokenizer

        early_text = AutoTokenizer.from_pretrained(str(model_dir)).decode(ids[:2], skip_special_tokens=False)
        assert stop in early_text  # the same tokens would have stopped at token 2 without min_new_tokens
        bad = httpx.post(url, json={"input_ids": prompt, "sampling_params": {"min_new_tokens": -1}}, timeout=60)
        assert bad.status_code == 400 and "min_new_tokens" in bad.text
    finally:
        server.stop()
