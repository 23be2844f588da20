"""The default rollout against the real built-in engine (a subprocess on a free port, tiny model).

    python -m pytest -q tests/test_rollout_sglang.py

Covers: one /generate call filling a Sample, continuing an aborted sample, over-sampling + dynamic
filter returning exactly --rollout-batch-size groups with nothing left running, partial rollout
continued in the next step, an engine answering 500 (retried, then FAILED with the reason), and eval.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from slime.data.data_source import RolloutDataSourceWithBuffer
from slime.rollout.base_types import RolloutFnEvalOutput, RolloutFnTrainOutput
from slime.rollout.generate import base_sampling_params, generate
from slime.rollout.sglang_rollout import generate_and_rm, generate_rollout
from slime.rollout.tokenization import get_tokenizer
from slime.utils.arguments import parse_args
from slime.utils.types import Sample

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "slime.engine.server", "--model-path", str(tiny_model_dir), "--port", str(port),
         "--log-level", "warning"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        if proc.poll() is not None:
            pytest.fail(f"engine server exited: {proc.stdout.read()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("engine server did not become healthy in 180 s")
        time.sleep(0.5)
    yield SimpleNamespace(url=url, port=port)
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def server_state(url: str) -> dict:
    return httpx.get(f"{url}/get_server_info", timeout=10).json()["internal_states"][0]


PROMPTS = ["1+1=", "2+3=", "Say hi.", "7*6=", "Name a color.", "9-4=", "Count to three.", "5+5=",
           "10/2=", "Spell cat.", "3*3=", "Hello?"]


@pytest.fixture()
def prompt_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"input": p, "label": str(i)}) + "\n" for i, p in enumerate(PROMPTS)))
    return path


# settings our code reads that have no flag yet (see the report): default when absent
NO_FLAG_YET = {"rm_timeout", "rollout_max_retries"}


def rollout_args(model_dir, port, prompt_data=None, **kw):
    """Real `parse_args` output for a rollout against the engine at `port`; keyword arguments override."""
    argv = ["--hf-checkpoint", str(model_dir), "--actor-num-gpus-per-node", "1",
            "--sglang-router-ip", "127.0.0.1", "--sglang-router-port", str(port),
            "--rollout-max-response-len", "8", "--rm-type", "random", "--label-key", "label"]
    for name in ("rollout_batch_size", "n_samples_per_prompt", "over_sampling_batch_size"):
        value = kw.pop(name, {"rollout_batch_size": 2, "n_samples_per_prompt": 2}.get(name))
        if value is not None:
            argv += [f"--{name.replace('_', '-')}", str(value)]
    if prompt_data:
        argv += ["--prompt-data", str(prompt_data)]
    args = parse_args(argv)
    for name, value in kw.items():
        if not hasattr(args, name) and name not in NO_FLAG_YET and not name.startswith("hold_"):
            raise AttributeError(f"parse_args has no {name!r}")
        setattr(args, name, value)
    return args


@pytest.fixture()
def plugin_dir(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(name: str, source: str) -> str:
        (tmp_path / f"{name}.py").write_text(source)
        sys.modules.pop(name, None)
        return name

    return write


# ---- the default generate ----------------------------------------------------------------------

def test_generate_fills_the_sample(engine, tiny_model_dir):
    args = rollout_args(tiny_model_dir, engine.port, rollout_max_response_len=6)
    tokenizer = get_tokenizer(str(tiny_model_dir))
    sample = Sample(index=0, prompt="1+1=")
    sample = asyncio.run(generate(args, sample, base_sampling_params(args)))
    prompt_ids = tokenizer("1+1=", add_special_tokens=False)["input_ids"]
    assert sample.tokens[:len(prompt_ids)] == prompt_ids
    assert 1 <= sample.response_length <= 6
    assert len(sample.tokens) == len(prompt_ids) + sample.response_length
    assert sample.loss_mask == [1] * sample.response_length
    assert len(sample.rollout_log_probs) == sample.response_length and all(lp <= 0 for lp in sample.rollout_log_probs)
    assert sample.status in (Sample.Status.COMPLETED, Sample.Status.TRUNCATED)
    assert sample.weight_versions == ["default"]


def test_generate_applies_chat_template_to_message_prompts(engine, tiny_model_dir):
    args = rollout_args(tiny_model_dir, engine.port, rollout_max_response_len=3)
    tokenizer = get_tokenizer(str(tiny_model_dir))
    messages = [{"role": "user", "content": "hi"}]
    sample = asyncio.run(generate(args, Sample(prompt=messages), base_sampling_params(args)))
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(sample.tokens[:sample.prompt_length]) == text


def test_generate_continues_an_aborted_sample_within_the_budget(engine, tiny_model_dir):
    args = rollout_args(tiny_model_dir, engine.port, rollout_max_response_len=10)
    tokenizer = get_tokenizer(str(tiny_model_dir))
    prompt_ids = tokenizer("2+3=", add_special_tokens=False)["input_ids"]
    partial = Sample(index=0, prompt="2+3=", tokens=prompt_ids + [70, 71, 72], response="FGH", response_length=3,
                     loss_mask=[1, 1, 1], rollout_log_probs=[-1.0, -2.0, -3.0], status=Sample.Status.ABORTED)
    sample = asyncio.run(generate(args, copy.deepcopy(partial), base_sampling_params(args)))
    assert sample.tokens[:len(partial.tokens)] == partial.tokens
    assert sample.rollout_log_probs[:3] == [-1.0, -2.0, -3.0]
    assert 3 < sample.response_length <= 10
    assert sample.response.startswith("FGH")
    assert len(sample.loss_mask) == len(sample.rollout_log_probs) == sample.response_length
    # a sample whose budget is spent is TRUNCATED without a request
    done = copy.deepcopy(partial)
    done.response_length, done.loss_mask = 10, [1] * 10
    assert asyncio.run(generate(args, done, base_sampling_params(args))).status == Sample.Status.TRUNCATED


# ---- over-sampling, dynamic filter, abort ----------------------------------------------------

REWARDS_PLUGIN = '''
from slime.utils.types import Sample

async def index_parity_reward(args, sample: Sample, **kwargs):
    # groups whose group_index is 2 mod 3 get equal rewards (dropped by the filter); the others differ
    if sample.group_index % 3 == 2:
        return 1.0
    return float(sample.index % 2)
'''

# The held group's hook waits `hold_steps` engine steps while the next group decodes; that group needs
# far more steps than that to finish, so it is still in flight (and the one after it still queued) when
# the batch fills, however slowly the hook's polls run on a loaded machine.
LONG_RESPONSE = 160

HOOK_PLUGIN = '''
import asyncio
from slime.utils.http_utils import get

SEEN = []

async def hold_first_group(args, sample, *, rollout_id=None, evaluation=False):
    """Let the engine run a few more decode steps before the first group completes."""
    SEEN.append((sample.index, rollout_id, evaluation))
    if sample.group_index == args.hold_group_index and sample.status.value != "aborted":
        url = f"http://{args.sglang_router_ip}:{args.sglang_router_port}/get_server_info"
        start = (await get(url))["internal_states"][0]["num_steps"]
        for _ in range(1500):
            if (await get(url))["internal_states"][0]["num_steps"] - start >= args.hold_steps:
                break
            await asyncio.sleep(0.02)
    return None
'''


def test_over_sampling_with_filter_returns_exactly_the_batch_and_aborts_the_rest(
        engine, tiny_model_dir, prompt_file, plugin_dir):
    rewards = plugin_dir("os_rewards", REWARDS_PLUGIN)
    hooks = plugin_dir("os_hooks", HOOK_PLUGIN)
    args = rollout_args(
        tiny_model_dir, engine.port, prompt_file, rollout_batch_size=3, over_sampling_batch_size=6,
        n_samples_per_prompt=2, sglang_server_concurrency=2, rollout_max_response_len=LONG_RESPONSE,
        custom_rm_path=f"{rewards}.index_parity_reward",
        dynamic_sampling_filter_path="slime.rollout.filter_hub.dynamic_sampling_filters.check_reward_nonzero_std",
        rollout_sample_hook_path=[f"{hooks}.hold_first_group"], hold_group_index=3, hold_steps=4)
    data_source = RolloutDataSourceWithBuffer(args)
    requests_before = httpx.get(f"{engine.url}/get_server_info").json()["num_generate_requests"]
    output = generate_rollout(args, 0, data_source)
    assert isinstance(output, RolloutFnTrainOutput)
    groups = output.samples
    assert len(groups) == 3 and all(len(g) == 2 for g in groups)
    assert [g[0].group_index for g in groups] == [0, 1, 3]  # group 2 was filtered out
    for group in groups:
        assert len({s.reward for s in group}) == 2
        for s in group:
            assert s.status in (Sample.Status.COMPLETED, Sample.Status.TRUNCATED)
            assert len(s.loss_mask) == len(s.rollout_log_probs) == s.response_length > 0
    assert output.metrics["rollout/drop/zero_std_1.0"] == 1
    assert output.metrics["rollout/aborted_groups"] == 2  # groups 4 and 5 were in flight or queued
    # nothing is left running on the engine, and groups 4 and 5 were not all sent
    assert server_state(engine.url)["num_running_requests"] == 0
    assert httpx.get(f"{engine.url}/get_server_info").json()["num_generate_requests"] - requests_before < 12
    assert data_source.get_buffer_length() == 0  # no --partial-rollout: aborted work is dropped
    hook_module = sys.modules[hooks]
    assert all(rid == 0 and not ev for _, rid, ev in hook_module.SEEN)


def test_partial_rollout_is_continued_in_the_next_step_and_keeps_its_tokens(
        engine, tiny_model_dir, prompt_file, plugin_dir):
    rewards = plugin_dir("pr_rewards", REWARDS_PLUGIN.replace("% 3 == 2", "% 3 == 99"))
    hooks = plugin_dir("pr_hooks", HOOK_PLUGIN)
    args = rollout_args(
        tiny_model_dir, engine.port, prompt_file, rollout_batch_size=1, over_sampling_batch_size=2,
        n_samples_per_prompt=2, sglang_server_concurrency=2, rollout_max_response_len=LONG_RESPONSE,
        custom_rm_path=f"{rewards}.index_parity_reward", partial_rollout=True,
        mask_offpolicy_in_partial_rollout=True, rollout_sample_hook_path=[f"{hooks}.hold_first_group"],
        hold_group_index=0, hold_steps=6)
    data_source = RolloutDataSourceWithBuffer(args)
    first = generate_rollout(args, 0, data_source)
    assert [g[0].group_index for g in first.samples] == [0]
    assert server_state(engine.url)["num_running_requests"] == 0
    assert data_source.get_buffer_length() == 1
    (left_group,) = copy.deepcopy(data_source.buffer)
    assert left_group[0].group_index == 1
    # (a sample may also have hit EOS before the abort; it then waits, COMPLETED, for its group)
    partial = [s for s in left_group if s.response_length > 0 and s.status == Sample.Status.ABORTED]
    assert partial, "group 1 should have been aborted mid-generation"
    for s in partial:
        assert s.metadata["start_rollout_id"] == 0 and s.reward is None
        assert s.response_length < LONG_RESPONSE and len(s.rollout_log_probs) == s.response_length

    args.hold_group_index = -1
    second = generate_rollout(args, 1, data_source)
    continued = {s.index: s for s in second.samples[0]}
    assert second.samples[0][0].group_index == 1  # the buffered group is served first
    for old in partial:
        new = continued[old.index]
        assert new.tokens[:len(old.tokens)] == old.tokens  # the half-done tokens are kept
        assert new.rollout_log_probs[:old.response_length] == old.rollout_log_probs
        assert new.response_length > old.response_length or new.status == Sample.Status.TRUNCATED
        assert new.loss_mask[:old.response_length] == [0] * old.response_length  # off-policy part masked
        assert new.loss_mask[old.response_length:] == [1] * (new.response_length - old.response_length)
        assert new.status in (Sample.Status.COMPLETED, Sample.Status.TRUNCATED) and new.reward is not None
    assert server_state(engine.url)["num_running_requests"] == 0


# ---- hostile engine: HTTP 500 ------------------------------------------------------------------

class ForwardingProxy:
    """An HTTP proxy in front of the engine; subclasses may answer a request themselves or watch answers."""

    def __init__(self, engine_url: str, timeout: float = 60.0):
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                own = outer.intercept(self.path, body)
                if own is not None:
                    status, content = own
                    self.send_response(status)
                    self.end_headers()
                    self.wfile.write(content)
                    return
                answer = httpx.post(f"{engine_url}{self.path}", content=body, timeout=timeout,
                                    headers={"Content-Type": "application/json"})
                outer.on_answer(self.path, answer)
                self.send_response(answer.status_code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer.content)))
                self.end_headers()
                self.wfile.write(answer.content)

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def intercept(self, path: str, body: bytes) -> tuple[int, bytes] | None:
        return None

    def on_answer(self, path: str, answer: httpx.Response) -> None:
        pass

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class PoisonProxy(ForwardingProxy):
    """Forwards to the real engine and records every /generate body (single or batched prompts); answers 500
    for any whose prompts contain the poison ids."""

    def __init__(self, engine_url: str, poison_ids: list[int] | None = None):
        self.poison_ids = poison_ids or []
        self.bodies: list[dict] = []
        self.poisoned_calls = 0
        super().__init__(engine_url)

    def intercept(self, path: str, body: bytes) -> tuple[int, bytes] | None:
        if path != "/generate":
            return None
        payload = json.loads(body)
        self.bodies.append(payload)
        ids = payload.get("input_ids") or []
        prompts = ids if ids and isinstance(ids[0], list) else [ids]
        n = len(self.poison_ids)
        if n and any(p[i:i + n] == self.poison_ids for p in prompts for i in range(len(p))):
            self.poisoned_calls += 1
            return 500, b"CUDA error: device-side assert triggered"
        return None


def poisoned_rollout(tiny_model_dir, engine_url: str, tmp_path, **kw):
    """(proxy, args): five prompts, the second containing POISON, behind a PoisonProxy; 2 samples a prompt."""
    tokenizer = get_tokenizer(str(tiny_model_dir))
    proxy = PoisonProxy(engine_url, tokenizer("POISON", add_special_tokens=False)["input_ids"])
    data = tmp_path / "prompts.jsonl"
    prompts = ["1+1=", "POISON 2+2=", "3+3=", "4+4=", "5+5="]
    data.write_text("".join(json.dumps({"input": p, "label": "x"}) + "\n" for p in prompts))
    args = rollout_args(tiny_model_dir, proxy.port, data, rollout_batch_size=3, over_sampling_batch_size=3,
                        n_samples_per_prompt=2, rollout_max_retries=2, rollout_max_response_len=4, **kw)
    return proxy, args


def test_engine_500_is_retried_then_fails_only_that_group(engine, tiny_model_dir, tmp_path):
    # per-sample requests (grouped: test_rollout_grouped.py)
    proxy, args = poisoned_rollout(tiny_model_dir, engine.url, tmp_path, rollout_group_requests="off")
    try:
        data_source = RolloutDataSourceWithBuffer(args)
        output = generate_rollout(args, 0, data_source)
        # the poisoned group fails, so a second over-sampling round is fetched to fill the batch
        kept = [g[0].group_index for g in output.samples]
        assert kept[:2] == [0, 2] and kept[2] in (3, 4, 5)
        assert output.metrics["rollout/failed_samples"] == 2
        assert output.metrics["rollout/drop/failed_sample"] == 1
        assert output.metrics["rollout/failed/generate"] == 2
        assert proxy.poisoned_calls == 2 * 2  # each poisoned sample was tried twice (--rollout-max-retries 2)
        assert all(s.status != Sample.Status.FAILED for g in output.samples for s in g)

        sample = Sample(index=9, prompt="POISON")
        sample = asyncio.run(generate_and_rm(args, sample, base_sampling_params(args)))
        assert sample.status == Sample.Status.FAILED and sample.reward is None
        assert "HTTP 500" in sample.metadata["failure_reason"]
        assert "device-side assert" in sample.metadata["failure_reason"]
    finally:
        proxy.close()


# ---- evaluation --------------------------------------------------------------------------------

def test_eval_rollout_per_dataset_rewards_and_pass_at_k(engine, tiny_model_dir, tmp_path):
    first = tmp_path / "a.jsonl"
    first.write_text("".join(json.dumps({"input": f"{i}+0=", "label": str(i)}) + "\n" for i in range(3)))
    second = tmp_path / "b.jsonl"
    second.write_text(json.dumps({"input": "hi", "label": "5"}) + "\n")
    args = rollout_args(tiny_model_dir, engine.port, rm_type="math", n_samples_per_eval_prompt=2,
                        eval_max_response_len=3, eval_temperature=0.7,
                        eval_datasets=[{"name": "arith", "path": str(first)}, {"name": "greet", "path": str(second)}])
    output = generate_rollout(args, 5, None, evaluation=True)
    assert isinstance(output, RolloutFnEvalOutput)
    assert set(output.data) == {"arith", "greet"}
    arith = output.data["arith"]
    assert len(arith["rewards"]) == len(arith["truncated"]) == len(arith["samples"]) == 6
    assert [s.index for s in arith["samples"]] == list(range(6))
    assert all(s.response_length <= 3 for s in arith["samples"])
    assert set(arith["rewards"]) <= {0.0, 1.0}
    for name in ("arith", "greet"):
        assert f"eval/{name}" in output.metrics
        assert f"eval/{name}/pass@1" in output.metrics and f"eval/{name}/pass@2" in output.metrics
    assert server_state(engine.url)["num_running_requests"] == 0


LABEL_ECHO_REWARD = '''
async def label_is_b(args, sample, **kwargs):
    return 1.0 if sample.label == "b" else 0.0
'''


def test_eval_config_gives_each_dataset_its_own_settings(engine, tiny_model_dir, tmp_path, plugin_dir):
    """--eval-config: two datasets over the same file differ in samples per prompt, response length, label key and
    reward function (the file's defaults apply where a dataset names nothing)."""
    from slime.utils.arguments.eval_config import load_eval_config

    data = tmp_path / "a.jsonl"
    data.write_text("".join(json.dumps({"input": f"{i}+0=", "label": str(i), "other": "b"}) + "\n" for i in range(3)))
    rewards = plugin_dir("eval_cfg_rewards", LABEL_ECHO_REWARD)
    config = tmp_path / "eval.yaml"
    config.write_text(f"""
eval:
  defaults: {{n_samples_per_eval_prompt: 2, max_response_len: 3}}
  datasets:
    - {{name: plain, path: {data}}}
    - {{name: tuned, path: {data}, n_samples_per_eval_prompt: 4, max_response_len: 5, label_key: other,
       custom_rm_path: {rewards}.label_is_b, temperature: 0.5}}
""")
    args = rollout_args(tiny_model_dir, engine.port, rm_type="math", eval_datasets=load_eval_config(str(config)))
    output = generate_rollout(args, 0, None, evaluation=True)
    plain, tuned = output.data["plain"], output.data["tuned"]
    assert len(plain["samples"]) == 6 and len(tuned["samples"]) == 12
    assert all(s.response_length <= 3 for s in plain["samples"])
    assert all(s.response_length <= 5 for s in tuned["samples"])
    assert [s.label for s in plain["samples"]] == ["0", "0", "1", "1", "2", "2"]
    assert {s.label for s in tuned["samples"]} == {"b"}
    assert output.metrics["eval/tuned"] == 1.0  # its own reward function: every label is "b"
    assert "eval/tuned/pass@4" in output.metrics and "eval/plain/pass@4" not in output.metrics
    assert args.n_samples_per_eval_prompt == 1 and args.eval_temperature != 0.5  # the run's own args are untouched
