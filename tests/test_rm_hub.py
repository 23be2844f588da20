"""Reward hub dispatch (`--rm-type`, boxed_ prefix, remote_rm over real HTTP, custom/group plugins) and FAILED marking.

    python -m pytest -q tests/test_rm_hub.py
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest

from slime.rollout.rewarding import score_group, score_sample
from slime.rollout.rm_hub import async_rm, batched_async_rm
from slime.rollout.rm_hub.dapo import compute_dapo_score, normalize_final_answer
from slime.rollout.rm_hub.deepscaler import compute_deepscaler_reward
from slime.rollout.rm_hub.f1 import f1_score
from slime.rollout.rm_hub.gpqa import compute_gpqa_reward
from slime.utils.types import Sample


def make_args(**kw):
    base = dict(rm_type=None, custom_rm_path=None, rm_url=None, reward_key=None, group_rm=False, rm_timeout=None)
    base.update(kw)
    return SimpleNamespace(**base)


def rm(args, response, label, **sample_kw):
    return asyncio.run(async_rm(args, Sample(response=response, label=label, **sample_kw)))


# ---- built-in rules ----------------------------------------------------------------------------

@pytest.mark.parametrize("response,label,score", [
    ("Let me think.\nAnswer: 42", "42", 1.0),
    ("Answer: $1,000$ dollars", "1000", 1.0),
    ("Answer: \\frac12", "\\frac{1}{2}", 1.0),
    ("Answer: \\boxed{7}", "7", 1.0),
    ("Answer: 41", "42", -1.0),
    ("The result is 42", "42", -1.0),  # no "Answer:" line
    ("Answer: 1\nmore text\nAnswer: 2", "2", 1.0),  # the last one counts
])
def test_dapo(response, label, score):
    result = compute_dapo_score(response, label)
    assert result["score"] == score and result["acc"] == (score > 0)


def test_dapo_normalisation():
    assert normalize_final_answer("\\text{5 inches}") == "5"
    assert normalize_final_answer("90^\\circ") == "90"
    assert normalize_final_answer("x = 3.00") == "3"


@pytest.mark.parametrize("response,label,reward", [
    ("<think>work</think> so \\boxed{\\frac{1}{2}}", "0.5", 1),
    ("<think>work</think> so \\boxed{3}", "\\boxed{3}", 1),
    ("<think>\\boxed{3}</think> so \\boxed{4}", "3", 0),  # only the part after </think> counts
    ("\\boxed{3}", "3", 0),  # no closing </think>
    ("###Response \\boxed{9}", "9", 1),
    ("<think></think>\\boxed{9}", "", 0),
])
def test_deepscaler(response, label, reward):
    assert compute_deepscaler_reward(response, label) == reward


def test_f1_scores():
    assert f1_score("The Eiffel Tower", "eiffel tower")[0] == 1.0
    f1, precision, recall = f1_score("tower in paris", "eiffel tower")
    assert precision == pytest.approx(1 / 3) and recall == pytest.approx(1 / 2) and f1 == pytest.approx(0.4)
    assert f1_score("yes", "no")[0] == 0.0
    assert f1_score("", "anything")[0] == 0.0


def test_gpqa():
    assert compute_gpqa_reward("Reasoning... Answer: (B)", "B") == 1
    assert compute_gpqa_reward("\\boxed{C}", "B") == 0
    assert compute_gpqa_reward("Answer: A", "Paris", metadata={"choices": ["Paris", "Rome"]}) == 1


def test_dispatch_by_rm_type_and_boxed_prefix():
    assert rm(make_args(rm_type="math"), "\\boxed{\\frac{1}{2}}", "0.5") == 1
    assert rm(make_args(rm_type="f1"), "it is the eiffel tower", "Eiffel Tower") < 1.0
    assert rm(make_args(rm_type="boxed_f1"), "it is \\boxed{the Eiffel Tower}", "Eiffel Tower") == 1.0
    assert rm(make_args(rm_type="boxed_f1"), "no box here", "Eiffel Tower") == 0.0
    assert rm(make_args(rm_type="dapo"), "Answer: 3", "3")["score"] == 1.0
    assert rm(make_args(rm_type="random"), "x", "y") in (0, 1)
    # per-sample metadata["rm_type"] overrides --rm-type
    assert rm(make_args(rm_type="f1"), "\\boxed{2}", "2", metadata={"rm_type": "math"}) == 1


def test_unknown_or_missing_rm_type_is_a_clear_error():
    with pytest.raises(ValueError, match="--rm-type"):
        rm(make_args(rm_type="nope"), "a", "b")
    with pytest.raises(ValueError, match="--rm-type or --custom-rm-path"):
        rm(make_args(), "a", "b")


# ---- remote_rm over real HTTP ------------------------------------------------------------------

class _RewardServer:
    """A reward service on 127.0.0.1: fails the first `fail_first` calls with HTTP 500."""

    def __init__(self, fail_first: int = 0, status_when_failing: int = 500):
        self.calls: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.calls.append(body)
                if len(outer.calls) <= fail_first:
                    self.send_response(status_when_failing)
                    self.end_headers()
                    self.wfile.write(b"reward model overloaded")
                    return
                answer = json.dumps({"score": 1.0 if body["response"] == body["label"] else 0.0}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/reward"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_remote_rm_posts_prompt_response_label_and_retries_5xx():
    server = _RewardServer(fail_first=2)
    try:
        args = make_args(rm_type="remote_rm", rm_url=server.url, reward_key="score")
        reward = rm(args, "Paris", "Paris", prompt="capital of France?")
        assert reward == {"score": 1.0}
        assert len(server.calls) == 3
        assert server.calls[-1] == {"prompt": "capital of France?", "response": "Paris", "label": "Paris"}
    finally:
        server.close()


def test_remote_rm_4xx_fails_the_sample_with_the_reason():
    server = _RewardServer(fail_first=100, status_when_failing=422)
    try:
        args = make_args(rm_type="remote_rm", rm_url=server.url, reward_key="score")
        sample = Sample(response="a", label="b")
        asyncio.run(score_sample(args, sample))
        assert sample.status == Sample.Status.FAILED and sample.reward is None
        assert "422" in sample.metadata["failure_reason"]
        assert len(server.calls) == 1  # 4xx is not retried
    finally:
        server.close()


def test_remote_rm_without_url():
    with pytest.raises(ValueError, match="--rm-url"):
        rm(make_args(rm_type="remote_rm"), "a", "b")


# ---- custom plugins and failure handling -------------------------------------------------------

PLUGIN = '''
import asyncio, time
from slime.utils.types import Sample

async def length_reward(args, sample: Sample, **kwargs):
    return float(len(sample.response))

async def raising_reward(args, sample, **kwargs):
    if sample.response == "bad":
        raise RuntimeError("judge crashed on this one")
    return 1.0

async def value_error_reward(args, sample, **kwargs):
    raise ValueError(f"label {sample.label!r} is not a number")

async def hanging_reward(args, sample, **kwargs):
    await asyncio.sleep(60)

def sync_hanging_reward(args, sample, **kwargs):
    time.sleep(1.5)
    return 1.0

async def none_reward(args, sample, **kwargs):
    return None

async def nan_reward(args, sample, **kwargs):
    return float("nan")

async def group_reward(args, samples):
    best = max(len(s.response) for s in samples)
    return [1.0 if len(s.response) == best else 0.0 for s in samples]

async def short_group_reward(args, samples):
    return [1.0]
'''


@pytest.fixture()
def plugin_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards_hub.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_rewards_hub", None)
    return "my_rewards_hub"


def test_custom_rm_path(plugin_module):
    args = make_args(custom_rm_path=f"{plugin_module}.length_reward", rm_type="math")
    assert rm(args, "abcd", None) == 4.0


def test_raising_reward_fails_only_that_sample(plugin_module):
    args = make_args(custom_rm_path=f"{plugin_module}.raising_reward")
    samples = [Sample(index=i, response=r) for i, r in enumerate(["ok", "bad", "fine"])]

    async def score_all():
        await asyncio.gather(*(score_sample(args, s) for s in samples))

    asyncio.run(score_all())
    assert [s.status for s in samples] == [Sample.Status.PENDING, Sample.Status.FAILED, Sample.Status.PENDING]
    assert samples[0].reward == 1.0 and samples[2].reward == 1.0
    assert samples[1].reward is None  # never silently 0
    assert "RuntimeError: judge crashed on this one" in samples[1].metadata["failure_reason"]


def test_plugin_value_error_is_a_sample_failure_but_bad_config_stops(plugin_module):
    sample = Sample(response="x", label="y")
    asyncio.run(score_sample(make_args(custom_rm_path=f"{plugin_module}.value_error_reward"), sample))
    assert sample.status == Sample.Status.FAILED
    assert sample.metadata["failure_reason"] == "reward ValueError: label 'y' is not a number"
    assert sample.metadata["failure_stage"] == "reward"
    with pytest.raises(ValueError, match="--custom-rm-path"):
        asyncio.run(score_sample(make_args(custom_rm_path=f"{plugin_module}.missing"), Sample(response="x")))
    with pytest.raises(ValueError, match="--rm-type"):
        asyncio.run(score_sample(make_args(rm_type="nope"), Sample(response="x")))


@pytest.mark.parametrize("fn", ["hanging_reward", "sync_hanging_reward"])
def test_hanging_reward_times_out_to_failed(plugin_module, fn):
    args = make_args(custom_rm_path=f"{plugin_module}.{fn}", rm_timeout=0.3)
    sample = Sample(response="x")

    async def timed() -> float:
        start = time.monotonic()
        await score_sample(args, sample)
        return time.monotonic() - start

    assert asyncio.run(timed()) < 1.2  # (asyncio.run itself then waits for the sleeping thread)
    assert sample.status == Sample.Status.FAILED
    assert "timed out after 0.3s" in sample.metadata["failure_reason"]


def test_reward_of_wrong_type_or_missing_key_fails(plugin_module):
    sample = Sample(response="x")
    asyncio.run(score_sample(make_args(custom_rm_path=f"{plugin_module}.none_reward"), sample))
    assert sample.status == Sample.Status.FAILED and "NoneType" in sample.metadata["failure_reason"]
    sample = Sample(response="x")
    asyncio.run(score_sample(make_args(custom_rm_path=f"{plugin_module}.nan_reward"), sample))
    assert sample.status == Sample.Status.FAILED and "nan" in sample.metadata["failure_reason"]
    sample = Sample(response="Answer: 3", label="3")
    asyncio.run(score_sample(make_args(rm_type="dapo"), sample))
    assert sample.status == Sample.Status.FAILED and "--reward-key" in sample.metadata["failure_reason"]
    sample = Sample(response="Answer: 3", label="3")
    asyncio.run(score_sample(make_args(rm_type="dapo", reward_key="score"), sample))
    assert sample.reward["score"] == 1.0 and sample.status == Sample.Status.PENDING


def test_group_rm(plugin_module):
    args = make_args(custom_rm_path=f"{plugin_module}.group_reward", group_rm=True)
    group = [Sample(response="a"), Sample(response="abc"), Sample(response="ab")]
    assert asyncio.run(batched_async_rm(args, group)) == [0.0, 1.0, 0.0]
    asyncio.run(score_group(args, group))
    assert [s.reward for s in group] == [0.0, 1.0, 0.0]


def test_group_rm_with_wrong_length_fails_the_group(plugin_module):
    args = make_args(custom_rm_path=f"{plugin_module}.short_group_reward", group_rm=True)
    group = [Sample(response="a"), Sample(response="b")]
    asyncio.run(score_group(args, group))
    assert all(s.status == Sample.Status.FAILED for s in group)
    assert "must return a list of 2 rewards" in group[0].metadata["failure_reason"]


def test_builtin_batched_rm_scores_each_sample():
    args = make_args(rm_type="math")
    samples = [Sample(response="\\boxed{2}", label="2"), Sample(response="\\boxed{3}", label="2")]
    assert asyncio.run(batched_async_rm(args, samples)) == [1, 0]
