"""Fuzz the engine's HTTP API (hypothesis): no request body ever gets a 5xx or kills the server.

    python -m pytest -q tests/test_engine_fuzz.py          # about a minute on 2 CPU cores

A real `python -m slime.engine.server` subprocess on the tiny model (context length 48, so no answer
runs long) gets /generate bodies built from the SGLang request fields with values of every JSON type,
arbitrary JSON documents, and raw bytes (malformed JSON, invalid UTF-8); every control endpoint gets
bodies from its own field names. Each answer must be < 500, a 4xx must carry a JSON error message,
and a 200 from /generate must have the SGLang shape. Afterwards the server is still healthy and
answers a normal request. Control calls that change state (pause, release memory) are undone after
each example so later examples still see a serving engine.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from test_engine_server import ServerProcess

ROOT = Path(__file__).resolve().parents[1]
CONTEXT_LENGTH = 48
VOCAB_SIZE = 320  # the "tiny" preset
REQUEST_TIMEOUT_S = 60.0

EXAMPLES = int(os.environ.get("SLIME_FUZZ_EXAMPLES", "300"))


def fuzz_settings(max_examples: int) -> settings:
    return settings(max_examples=max_examples, deadline=None, database=None, print_blob=True,
                    suppress_health_check=list(HealthCheck))

GENERATE_FIELDS = ["text", "input_ids", "sampling_params", "rid", "return_logprob", "stream", "image_data",
                   "lora_path", "top_logprobs_num", "logprob_start_len", "return_text_in_logprobs", "session_params",
                   "custom_logit_processor", "bootstrap_host", "priority", "modalities"]
SAMPLING_FIELDS = ["max_new_tokens", "temperature", "top_p", "top_k", "min_p", "stop", "stop_token_ids",
                   "ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim",
                   "sampling_seed", "n", "frequency_penalty", "presence_penalty", "repetition_penalty",
                   "min_new_tokens", "json_schema", "regex", "logit_bias", "stream_interval"]
CONTROL_FIELDS: dict[str, list[str]] = {
    "/abort_request": ["rid", "abort_all", "abort_message"],
    "/pause_generation": ["mode"],
    "/continue_generation": [],
    "/flush_cache": [],
    "/release_memory_occupation": ["tags"],
    "/resume_memory_occupation": ["tags"],
    "/update_weights_from_disk": ["model_path", "load_format", "abort_all_requests", "weight_version", "is_async",
                                  "torch_empty_cache", "keep_pause", "flush_cache", "token_step"],
    "/update_weights_from_tensor": ["serialized_named_tensors", "load_format", "flush_cache", "abort_all_requests",
                                    "weight_version"],
    "/init_weights_update_group": ["master_address", "master_port", "rank_offset", "world_size", "group_name",
                                   "backend"],
    "/update_weights_from_distributed": ["names", "dtypes", "shapes", "group_name", "flush_cache",
                                         "abort_all_requests", "weight_version", "load_format"],
    "/destroy_weights_update_group": ["group_name"],
    "/update_weight_version": ["new_version", "abort_all_requests"],
}
ALL_POST_PATHS = ["/generate", *CONTROL_FIELDS]


# ---------------------------------------------------------------- strategies

scalars = (st.none() | st.booleans() | st.integers(min_value=-2 ** 63, max_value=2 ** 64)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
small_ints = st.integers(min_value=-3, max_value=VOCAB_SIZE + 3)
token_ids = st.lists(small_ints, max_size=CONTEXT_LENGTH + 4)
texts = st.text(max_size=CONTEXT_LENGTH + 8)

sampling_values: dict[str, st.SearchStrategy] = {
    "max_new_tokens": st.integers(min_value=-2, max_value=6) | st.just(10 ** 12) | json_values,
    "n": st.integers(min_value=-1, max_value=3) | json_values,
    "temperature": st.floats(min_value=-1, max_value=3) | json_values,
    "top_p": st.floats(min_value=-0.5, max_value=1.5) | json_values,
    "top_k": st.integers(min_value=-3, max_value=VOCAB_SIZE + 5) | json_values,
    "min_p": st.floats(min_value=-0.5, max_value=1.5) | json_values,
    "stop": texts | st.lists(texts, max_size=3) | json_values,
    "stop_token_ids": token_ids | json_values,
    "sampling_seed": st.integers(min_value=-2 ** 40, max_value=2 ** 70) | json_values,
}
sampling_params = st.dictionaries(st.sampled_from(SAMPLING_FIELDS) | st.text(max_size=6), json_values, max_size=6).flatmap(
    lambda base: st.fixed_dictionaries({}, optional={k: v for k, v in sampling_values.items()}).map(
        lambda typed: {**base, **typed}))
generate_values: dict[str, st.SearchStrategy] = {
    "text": texts | st.lists(texts, max_size=3) | json_values,
    "input_ids": token_ids | st.lists(token_ids, max_size=3) | json_values,
    "sampling_params": sampling_params | st.lists(sampling_params, max_size=3) | json_values,
    "rid": st.text(max_size=8) | st.lists(st.text(max_size=4), max_size=3) | json_values,
    "return_logprob": st.booleans() | st.lists(st.booleans(), max_size=3) | json_values,
    "stream": st.booleans() | json_values,
}
valid_sampling = st.fixed_dictionaries({}, optional={
    "max_new_tokens": st.integers(0, 6), "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1),
    "top_k": st.sampled_from([-1, 1, 5, VOCAB_SIZE]), "min_p": st.floats(0, 1),
    "stop": st.lists(st.text(min_size=1, max_size=3), max_size=2), "stop_token_ids": st.lists(st.integers(0, 319), max_size=3),
    "ignore_eos": st.booleans(), "skip_special_tokens": st.booleans(), "no_stop_trim": st.booleans(),
    "sampling_seed": st.integers(0, 2 ** 31), "n": st.integers(1, 3)})
valid_prompt = st.one_of(
    st.fixed_dictionaries({"text": st.text(min_size=1, max_size=20)}),
    st.fixed_dictionaries({"input_ids": st.lists(st.integers(0, VOCAB_SIZE - 1), min_size=1, max_size=30)}),
    st.fixed_dictionaries({"input_ids": st.lists(st.lists(st.integers(0, VOCAB_SIZE - 1), min_size=1, max_size=20),
                                                  min_size=1, max_size=3)}))
valid_generate_bodies = st.tuples(valid_prompt, st.fixed_dictionaries({}, optional={
    "sampling_params": valid_sampling, "return_logprob": st.booleans(), "stream": st.booleans(),
    "rid": st.text(min_size=1, max_size=8)})).map(lambda parts: {**parts[0], **parts[1]})
mutated_generate_bodies = st.tuples(valid_generate_bodies, st.sampled_from(GENERATE_FIELDS + SAMPLING_FIELDS),
                                    json_values).map(
    lambda t: ({**t[0], t[1]: t[2]} if t[1] in GENERATE_FIELDS
               else {**t[0], "sampling_params": {**t[0].get("sampling_params", {}), t[1]: t[2]}}))
generate_bodies = st.one_of(
    valid_generate_bodies,
    mutated_generate_bodies,
    st.fixed_dictionaries({}, optional=generate_values),
    st.dictionaries(st.sampled_from(GENERATE_FIELDS) | st.text(max_size=8), json_values, max_size=5),
    json_values,
)


def control_bodies(path: str) -> st.SearchStrategy:
    fields = CONTROL_FIELDS[path] + ["unknown_field"]
    return st.one_of(st.dictionaries(st.sampled_from(fields), json_values, max_size=len(fields)), json_values)


# ---------------------------------------------------------------- server

class EngineServerProcess(ServerProcess):
    """The shared test server (tests/test_engine_server.py) with a short context, a quiet log and one pooled client."""

    def __init__(self, model_path: Path) -> None:
        super().__init__(model_path, "--context-length", str(CONTEXT_LENGTH), "--log-level", "error")
        self.client = httpx.Client(base_url=self.url, timeout=REQUEST_TIMEOUT_S)

    def stop(self) -> None:
        self.client.close()
        super().stop()

    def post_raw(self, path: str, content: bytes) -> httpx.Response:
        try:
            return self.client.post(path, content=content, headers={"content-type": "application/json"})
        except httpx.TransportError as exc:
            raise AssertionError(f"POST {path} {content[:300]!r}: no answer ({exc!r}); server log:\n"
                                 f"{self.output()[-3000:]}") from None


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    proc = EngineServerProcess(tiny_model_dir).wait_healthy()
    yield proc
    proc.stop()


def _encode(body: Any) -> bytes:
    return json.dumps(body, allow_nan=True).encode()  # NaN / Infinity literals are fuzz input too


def _error_message(response: httpx.Response) -> str:
    """The message of a 4xx answer: {"error": {"message"}}, SGLang's {"success": false, "message"}, or plain text."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()
    if isinstance(body, dict):
        error = body.get("error")
        message = error.get("message") if isinstance(error, dict) else body.get("message")
        return message if isinstance(message, str) else ""
    return ""


def _check_answer(server: EngineServerProcess, path: str, content: bytes) -> httpx.Response:
    response = server.post_raw(path, content)
    assert response.status_code < 500, (f"POST {path} {content[:500]!r} -> {response.status_code} "
                                        f"{response.text[:500]}\nserver log:\n{server.output()[-3000:]}")
    if 400 <= response.status_code < 500:
        assert _error_message(response), f"POST {path} {content[:300]!r} -> {response.status_code} without a message"
    return response


def _check_generate_shape(response: httpx.Response) -> None:
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        assert response.text.rstrip().endswith("data: [DONE]"), response.text[-200:]
        return
    answer = response.json()
    for item in answer if isinstance(answer, list) else [answer]:
        assert isinstance(item["text"], str) and isinstance(item["output_ids"], list)
        assert all(0 <= t < VOCAB_SIZE for t in item["output_ids"])
        assert item["meta_info"]["completion_tokens"] == len(item["output_ids"])
        assert item["meta_info"]["prompt_tokens"] + len(item["output_ids"]) <= CONTEXT_LENGTH


def _restore_serving_state(server: EngineServerProcess) -> None:
    for path in ("/continue_generation", "/resume_memory_occupation"):
        response = server.post_raw(path, b"{}")
        assert response.status_code == 200, (path, response.text)


def _assert_still_serving(server: EngineServerProcess) -> None:
    assert server.proc.poll() is None, server.output()[-3000:]
    assert server.client.get("/health").status_code == 200
    answer = server.client.post("/generate", json={"input_ids": [1, 2, 3], "sampling_params": {
        "max_new_tokens": 3, "temperature": 0, "ignore_eos": True}})
    assert answer.status_code == 200 and len(answer.json()["output_ids"]) == 3, answer.text


# ---------------------------------------------------------------- tests

def test_fuzzed_generate_bodies_never_get_5xx(server):
    statuses: list[int] = []

    @fuzz_settings(EXAMPLES)
    @given(body=generate_bodies)
    def run(body):
        response = _check_answer(server, "/generate", _encode(body))
        statuses.append(response.status_code)
        if response.status_code == 200:
            _check_generate_shape(response)

    run()
    print({code: statuses.count(code) for code in set(statuses)})
    assert statuses.count(200) >= len(statuses) // 10, "the fuzzer hardly reached generation; widen the strategies"
    _assert_still_serving(server)


def test_raw_bytes_never_get_5xx(server):
    @fuzz_settings(EXAMPLES // 2)
    @given(path=st.sampled_from(ALL_POST_PATHS),
           content=st.binary(max_size=64) | st.sampled_from([b"", b"{", b"[1,", b"\xff\xfe{}", b"{\"text\": \"\xc3\x28\"}",
                                                           b"null", b"NaN", b"{\"text\": 1e999}", b"[[[[[[[[]]]]]]]]"]))
    def run(path, content):
        _check_answer(server, path, content)
        _restore_serving_state(server)

    run()
    _assert_still_serving(server)


def _joins_a_real_group(path: str, body: Any) -> bool:
    """A well-typed /init_weights_update_group body would wait for peers that never come (a valid, slow call)."""
    if path != "/init_weights_update_group" or not isinstance(body, dict):
        return False
    port, world, rank = body.get("master_port"), body.get("world_size"), body.get("rank_offset") or 0
    typed = (isinstance(body.get("master_address"), str) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in (port, world, rank)))
    return typed and 0 <= rank < world


def test_fuzzed_control_bodies_never_get_5xx(server):
    @fuzz_settings(EXAMPLES)
    @given(data=st.data())
    def run(data):
        path = data.draw(st.sampled_from(list(CONTROL_FIELDS)), label="path")
        body = data.draw(control_bodies(path), label="body")
        assume(not _joins_a_real_group(path, body))
        _check_answer(server, path, _encode(body))
        _restore_serving_state(server)

    run()
    _assert_still_serving(server)


@pytest.mark.parametrize("body, message", [
    ({"input_ids": [5] * 8, "sampling_params": {"n": 10 ** 9, "max_new_tokens": 1}}, "more than 16384 sequences"),
    ({"input_ids": [[5, 6]] * 20_000, "sampling_params": {"max_new_tokens": 1}}, "the batch has 20000 prompts"),
    ({"text": ["ab"] * 9000, "sampling_params": {"n": 2, "max_new_tokens": 1}}, "more than 16384 sequences"),
    ({"text": "x" * 200_000}, "longer than the context length"),
])
def test_oversized_requests_are_refused_quickly(server, body, message):
    """Found by fuzzing: n=10**9 used to build 10**9 requests in the event loop, and the server stopped answering."""
    started = time.monotonic()
    response = _check_answer(server, "/generate", _encode(body))
    assert response.status_code == 400 and message in _error_message(response), response.text[:300]
    assert time.monotonic() - started < 20
    _assert_still_serving(server)
