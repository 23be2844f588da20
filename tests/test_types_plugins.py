import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from slime.utils.http_utils import HTTPStatusError, post
from slime.utils.plugins import call_maybe_async, load_function
from slime.utils.types import Sample, Status


def test_sample_round_trip_and_status():
    s = Sample(index=3, group_index=1, prompt=[{"role": "user", "content": "hi"}], tokens=[1, 2, 3],
               response="x", response_length=1, label="4", reward={"acc": 1.0}, loss_mask=[1],
               rollout_log_probs=[-0.5], status=Sample.Status.TRUNCATED, metadata={"k": 1})
    d = s.to_dict()
    assert d["status"] == "truncated"
    json.dumps(d)
    back = Sample.from_dict(json.loads(json.dumps(d)))
    assert back == s and back.status is Status.TRUNCATED
    assert back.prompt_length == 2 and back.effective_response_length == 1


def test_sample_from_dict_rejects_unknown_field():
    with pytest.raises(ValueError, match="unknown field.*'bogus'"):
        Sample.from_dict({"bogus": 1})


def test_reward_key():
    class A:
        reward_key = "acc"

    assert Sample(reward={"acc": 0.5}).get_reward_value(A()) == 0.5
    with pytest.raises(ValueError, match="--reward-key"):
        Sample(reward={"acc": 0.5}).get_reward_value(object())


def test_load_function_errors_name_the_path():
    assert load_function("os.path.join")("a", "b") == "a/b"
    with pytest.raises(ValueError, match="cannot import module 'no_such_mod'.*--custom-rm-path"):
        load_function("no_such_mod.fn", flag="--custom-rm-path")
    with pytest.raises(ValueError, match="has no attribute 'nope'"):
        load_function("os.nope")
    with pytest.raises(ValueError, match="must look like"):
        load_function("noname")


def test_call_maybe_async():
    async def a(x):
        return x + 1

    assert asyncio.run(call_maybe_async(a, 1)) == 2
    assert asyncio.run(call_maybe_async(lambda x: x * 2, 2)) == 4


class _FlakyHandler(BaseHTTPRequestHandler):
    calls = 0

    def do_POST(self):
        type(self).calls += 1
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/bad":
            self.send_response(400)
            self.end_headers()
            self.wfile.write(b"bad field")
            return
        status = 503 if type(self).calls < 3 else 200
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(json.dumps({"echo": body, "calls": type(self).calls}).encode())

    def log_message(self, *a):
        pass


def test_post_retries_5xx_and_raises_4xx():
    server = HTTPServer(("127.0.0.1", 0), _FlakyHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        out = asyncio.run(post(url + "/ok", {"a": 1}, backoff=0.01))
        assert out == {"echo": {"a": 1}, "calls": 3}
        with pytest.raises(HTTPStatusError, match="HTTP 400: bad field"):
            asyncio.run(post(url + "/bad", {}, backoff=0.01))
        with pytest.raises(RuntimeError, match="failed after 2 attempts"):
            asyncio.run(post("http://127.0.0.1:1/x", {}, max_retries=2, backoff=0.01))
    finally:
        server.shutdown()


def test_tiny_model_is_deterministic_and_loads(tiny_model_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tools.make_tiny_model import make_model

    other = make_model("tiny", tmp_path / "again", seed=0)
    m1 = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    m2 = AutoModelForCausalLM.from_pretrained(other)
    assert sum(p.numel() for p in m1.parameters()) < 1_000_000
    for (n1, p1), (n2, p2) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "Q: 12+7=? A: 19! (x_y) {z}"
    assert tok.decode(tok(text).input_ids) == text
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.eos_token_id == m1.config.eos_token_id
