"""Contract tests: plugins written in the original slime's style load through our real code paths.

    python -m pytest -q tests/test_plugins_contract.py

Each test writes a plugin module into tmp_path (original imports: `from slime.utils.types import Sample`,
`from slime.utils.http_utils import post`, ...) and runs it through the code that loads it in a run.
The generate plugin here answers without an engine so the whole default rollout runs in-process;
`test_plugins_contract_generate.py` runs an original-style generate against the real engine.
"""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import pytest

from slime.data.data_source import RolloutDataSourceWithBuffer, create_data_source
from slime.rollout.base_types import RolloutFnEvalOutput, split_eval_output, split_train_output
from slime.rollout.log_hooks import call_eval_rollout_log_function, call_rollout_log_function
from slime.rollout.sglang_rollout import generate_rollout
from slime.rollout.train_data import apply_rollout_data_postprocess, samples_to_train_data
from slime.utils.plugins import load_function

# An engine-free generate in the original style: answers "a+b=" prompts, right for even sample indices.
GENERATE_PLUGIN = '''
from slime.utils.types import Sample

CALLS = []

async def generate(args, sample: Sample, sampling_params) -> Sample:
    CALLS.append(dict(sampling_params))
    a, b = sample.prompt.rstrip("=").split("+")
    answer = str(int(a) + int(b) + (0 if sample.index % 2 == 0 else 1))
    prompt_tokens = [ord(c) for c in sample.prompt]
    sample.tokens = prompt_tokens + [ord(c) for c in answer]
    sample.response = answer
    sample.response_length = len(answer)
    sample.loss_mask = [1] * len(answer)
    sample.rollout_log_probs = [-0.5] * len(answer)
    sample.status = Sample.Status.COMPLETED
    return sample

async def generate_with_evaluation(args, sample: Sample, sampling_params, evaluation=False) -> Sample:
    sample = await generate(args, sample, sampling_params)
    sample.metadata["evaluation"] = evaluation
    return sample
'''


@pytest.fixture()
def plugins(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(name: str, source: str) -> str:
        (tmp_path / f"{name}.py").write_text(source)
        sys.modules.pop(name, None)
        return name

    write("contract_generate", GENERATE_PLUGIN)
    return write


@pytest.fixture()
def prompt_file(tmp_path):
    path = tmp_path / "arith.jsonl"
    path.write_text("".join(json.dumps({"input": f"{i}+{i}=", "label": str(2 * i)}) + "\n" for i in range(8)))
    return path


def make_args(prompt_file, **kw):
    base = dict(
        hf_checkpoint=None, sglang_router_ip="127.0.0.1", sglang_router_port=1, sglang_server_concurrency=8,
        rollout_temperature=1.0, rollout_top_p=1.0, rollout_top_k=-1, rollout_max_response_len=16,
        rollout_max_context_len=None, rollout_stop=None, rollout_stop_token_ids=None, rollout_skip_special_tokens=False,
        rollout_batch_size=2, n_samples_per_prompt=2, over_sampling_batch_size=None, dynamic_sampling_filter_path=None,
        partial_rollout=False, mask_offpolicy_in_partial_rollout=False, rollout_sample_hook_path=[],
        custom_generate_function_path="contract_generate.generate", rm_type="math", custom_rm_path=None,
        group_rm=False, reward_key=None, rm_timeout=None, prompt_data=str(prompt_file), input_key="input",
        label_key="label", metadata_key="metadata", tool_key="tools", apply_chat_template=False,
        rollout_shuffle=False, rollout_seed=42, rollout_max_prompt_len=None, buffer_filter_path=None,
        data_source_path=None, advantage_estimator="grpo", disable_rewards_normalization=False,
        disable_grpo_std_normalization=False, custom_reward_post_process_path=None,
        custom_convert_samples_to_train_data_path=None, rollout_data_postprocess_path=None,
        custom_rollout_log_function_path=None, custom_eval_rollout_log_function_path=None, eval_function_path=None,
    )
    base.update(kw)
    return SimpleNamespace(**base)


def run_rollout(args, rollout_id=0, data_source=None):
    data_source = data_source or create_data_source(args)
    groups, metrics = split_train_output(generate_rollout(args, rollout_id, data_source))
    return groups, metrics, data_source


# ---- --rollout-function-path -------------------------------------------------------------------

def test_rollout_function_path(plugins, prompt_file):
    name = plugins("contract_rollout_fn", '''
from slime.rollout.base_types import RolloutFnTrainOutput
from slime.utils.types import Sample

def generate_rollout(args, rollout_id, data_buffer, evaluation=False):
    assert not evaluation
    samples = data_buffer.get_samples(args.rollout_batch_size)
    for group in samples:
        for i, sample in enumerate(group):
            sample.tokens = [1, 2, 3, 4 + i]
            sample.response_length = 1
            sample.response = "x"
            sample.reward = float(i)
            sample.status = Sample.Status.COMPLETED
    return RolloutFnTrainOutput(samples=samples, metrics={"custom/rollout_id": rollout_id})
''')
    args = make_args(prompt_file, rollout_function_path=f"{name}.generate_rollout")
    fn = load_function(args.rollout_function_path, flag="--rollout-function-path")
    groups, metrics = split_train_output(fn(args, 7, create_data_source(args)))
    assert metrics == {"custom/rollout_id": 7}
    data = samples_to_train_data(args, [s for g in groups for s in g])
    assert data["tokens"] == [[1, 2, 3, 4], [1, 2, 3, 5]] * 2
    assert data["raw_reward"] == [0.0, 1.0, 0.0, 1.0]


def test_rollout_function_returning_bare_list_and_bad_path(plugins, prompt_file):
    name = plugins("contract_rollout_list", '''
def generate_rollout(args, rollout_id, data_source, evaluation=False):
    return data_source.get_samples(1)
''')
    args = make_args(prompt_file)
    groups, metrics = split_train_output(load_function(f"{name}.generate_rollout")(args, 0, create_data_source(args)))
    assert len(groups) == 1 and metrics == {}
    with pytest.raises(ValueError, match="--rollout-function-path"):
        load_function(f"{name}.missing", flag="--rollout-function-path")


# ---- --custom-generate-function-path (engine-free; see test_plugins_contract_generate.py) --------

def test_custom_generate_function_path_with_and_without_evaluation(plugins, prompt_file):
    args = make_args(prompt_file)
    groups, metrics, _ = run_rollout(args)
    assert [[s.response for s in g] for g in groups] == [["0", "1"], ["2", "3"]]
    assert [[s.reward for s in g] for g in groups] == [[1, 0], [1, 0]]
    calls = sys.modules["contract_generate"].CALLS
    assert calls[0]["max_new_tokens"] == 16 and calls[0]["temperature"] == 1.0
    args = make_args(prompt_file, custom_generate_function_path="contract_generate.generate_with_evaluation")
    groups, _, _ = run_rollout(args)
    assert groups[0][0].metadata["evaluation"] is False


# ---- --custom-rm-path / --group-rm -------------------------------------------------------------

def test_custom_rm_path(plugins, prompt_file):
    name = plugins("contract_rm", '''
from slime.utils.types import Sample

async def reward_func(args, sample: Sample, **kwargs):
    return {"score": 1.0 if sample.response == sample.label else -1.0, "pred": sample.response}
''')
    args = make_args(prompt_file, custom_rm_path=f"{name}.reward_func", reward_key="score")
    groups, _, _ = run_rollout(args)
    assert [s.reward["score"] for g in groups for s in g] == [1.0, -1.0, 1.0, -1.0]
    data = samples_to_train_data(args, [s for g in groups for s in g])
    assert data["raw_reward"] == [1.0, -1.0, 1.0, -1.0]


def test_group_rm(plugins, prompt_file):
    name = plugins("contract_group_rm", '''
async def group_reward(args, samples):
    assert len(samples) == args.n_samples_per_prompt
    return [float(i) for i, _ in enumerate(samples)]
''')
    args = make_args(prompt_file, custom_rm_path=f"{name}.group_reward", group_rm=True)
    groups, _, _ = run_rollout(args)
    assert [[s.reward for s in g] for g in groups] == [[0.0, 1.0], [0.0, 1.0]]


# ---- --dynamic-sampling-filter-path ------------------------------------------------------------

def test_dynamic_sampling_filter_path(plugins, prompt_file):
    name = plugins("contract_filter", '''
from slime.rollout.filter_hub.base_types import DynamicFilterOutput

def drop_group_one(args, samples, **kwargs):
    keep = samples[0].group_index != 1
    return DynamicFilterOutput(keep=keep, reason=None if keep else "group_one")

def keep_even_groups(args, samples, **kwargs):
    return samples[0].group_index % 2 == 0
''')
    args = make_args(prompt_file, dynamic_sampling_filter_path=f"{name}.drop_group_one", over_sampling_batch_size=3)
    groups, metrics, _ = run_rollout(args)
    assert [g[0].group_index for g in groups] == [0, 2]
    assert metrics["rollout/drop/group_one"] == 1
    args = make_args(prompt_file, dynamic_sampling_filter_path=f"{name}.keep_even_groups")
    groups, metrics, _ = run_rollout(args)
    assert [g[0].group_index for g in groups] == [0, 2]
    assert metrics["rollout/drop/filtered"] in (1, 2)  # group 3 may finish in the same wake-up as group 2


# ---- --data-source-path ------------------------------------------------------------------------

def test_data_source_path(plugins, prompt_file, tmp_path):
    name = plugins("contract_source", '''
import copy
from slime.utils.types import Sample

class CountingSource:
    def __init__(self, args):
        self.args = args
        self.next_index = 0
        self.buffer = []
        self.saved = []

    def get_samples(self, num_samples):
        groups = []
        for _ in range(num_samples):
            g = self.next_index
            self.next_index += 1
            groups.append([Sample(group_index=g, index=g * self.args.n_samples_per_prompt + i,
                                  prompt=f"{g}+1=", label=str(g + 1)) for i in range(self.args.n_samples_per_prompt)])
        return groups

    def add_samples(self, samples):
        self.buffer.extend(samples)

    def save(self, rollout_id):
        self.saved.append(rollout_id)

    def load(self, rollout_id=None):
        pass
''')
    args = make_args(prompt_file, data_source_path=f"{name}.CountingSource")
    source = create_data_source(args)
    assert type(source).__name__ == "CountingSource"
    groups, _, _ = run_rollout(args, data_source=source)
    assert [[s.response for s in g] for g in groups] == [["1", "2"], ["2", "3"]]
    assert [[s.reward for s in g] for g in groups] == [[1, 0], [1, 0]]
    source.save(0)
    assert source.saved == [0]


# ---- --buffer-filter-path ----------------------------------------------------------------------

def test_buffer_filter_path(plugins, prompt_file):
    name = plugins("contract_buffer_filter", '''
SEEN = []

def pop_last(args, rollout_id, buffer, num_samples):
    SEEN.append((rollout_id, len(buffer), num_samples))
    taken = buffer[-num_samples:]
    del buffer[-num_samples:]
    return taken
''')
    args = make_args(prompt_file, buffer_filter_path=f"{name}.pop_last")
    source = RolloutDataSourceWithBuffer(args)
    leftovers = source.get_samples(3)  # groups 0, 1, 2 go back to the buffer
    source.add_samples(leftovers)
    groups, _, _ = run_rollout(args, data_source=source)
    assert [g[0].group_index for g in groups] == [1, 2]
    assert sys.modules[name].SEEN[0] == (None, 3, 2)
    assert source.get_buffer_length() == 1


# ---- --rollout-sample-hook-path ----------------------------------------------------------------

def test_rollout_sample_hook_path(plugins, prompt_file):
    name = plugins("contract_hooks", '''
from slime.utils.types import Sample

SEEN = []

def tag(args, sample, *, rollout_id=None, evaluation=False):
    SEEN.append(("tag", sample.index, rollout_id, evaluation))
    sample.metadata["tagged"] = True
    return None

async def replace(args, sample: Sample, **kwargs):
    SEEN.append(("replace", sample.index, kwargs.get("rollout_id"), kwargs.get("evaluation")))
    new = Sample(**{**sample.__dict__})
    new.metadata = dict(sample.metadata, replaced=True)
    return new

def bare(args, sample):
    SEEN.append(("bare", sample.index))
''')
    args = make_args(prompt_file, rollout_sample_hook_path=[f"{name}.tag", f"{name}.replace", f"{name}.bare"])
    groups, _, _ = run_rollout(args, rollout_id=4)
    assert all(s.metadata["tagged"] and s.metadata["replaced"] for g in groups for s in g)
    seen = sys.modules[name].SEEN
    assert ("tag", 0, 4, False) in seen and ("replace", 3, 4, False) in seen and ("bare", 1) in seen
    bad = plugins("contract_bad_hook", "def hook(args, sample):\n    return 42\n")
    with pytest.raises(ValueError, match="--rollout-sample-hook-path"):
        run_rollout(make_args(prompt_file, rollout_sample_hook_path=[f"{bad}.hook"]))


# ---- --rollout-data-postprocess-path -----------------------------------------------------------

def test_rollout_data_postprocess_path(plugins, prompt_file):
    name = plugins("contract_postprocess", '''
CALLS = []

def old_style(args):
    CALLS.append("old")

def new_style(args, rollout_id, rollout_data):
    CALLS.append(("new", rollout_id))
    rollout_data["rewards"] = [r * 2 for r in rollout_data["rewards"]]
''')
    data = {"rewards": [1.0, -1.0]}
    apply_rollout_data_postprocess(make_args(prompt_file, rollout_data_postprocess_path=f"{name}.old_style"), 3, data)
    apply_rollout_data_postprocess(make_args(prompt_file, rollout_data_postprocess_path=f"{name}.new_style"), 3, data)
    assert sys.modules[name].CALLS == ["old", ("new", 3)]
    assert data["rewards"] == [2.0, -2.0]


# ---- --custom-reward-post-process-path ---------------------------------------------------------

def test_custom_reward_post_process_path(plugins, prompt_file):
    name = plugins("contract_reward_post", '''
def post_process_rewards(args, samples):
    raw = [s.get_reward_value(args) for s in samples]
    return raw, [r * 10 for r in raw]
''')
    args = make_args(prompt_file, custom_reward_post_process_path=f"{name}.post_process_rewards")
    groups, _, _ = run_rollout(args)
    data = samples_to_train_data(args, [s for g in groups for s in g])
    assert data["raw_reward"] == [1.0, 0.0, 1.0, 0.0]
    assert data["rewards"] == [10.0, 0.0, 10.0, 0.0]


# ---- --custom-convert-samples-to-train-data-path -----------------------------------------------

def test_custom_convert_samples_to_train_data_path(plugins, prompt_file):
    name = plugins("contract_convert", '''
def convert(args, samples):
    return {
        "tokens": [s.tokens for s in samples],
        "response_lengths": [s.response_length for s in samples],
        "loss_masks": [[1] * s.response_length for s in samples],
        "rewards": [float(s.reward) for s in samples],
        "raw_reward": [float(s.reward) for s in samples],
        "truncated": [0 for _ in samples],
        "sample_indices": [s.index for s in samples],
        "custom": ["seen"] * len(samples),
    }
''')
    args = make_args(prompt_file, custom_convert_samples_to_train_data_path=f"{name}.convert")
    groups, _, _ = run_rollout(args)
    data = samples_to_train_data(args, [s for g in groups for s in g])
    assert data["custom"] == ["seen"] * 4 and data["rewards"] == [1.0, 0.0, 1.0, 0.0]


# ---- --eval-function-path ----------------------------------------------------------------------

def test_eval_function_path(plugins, prompt_file):
    name = plugins("contract_eval", '''
from slime.rollout.base_types import RolloutFnEvalOutput
from slime.utils.types import Sample

def eval_rollout(args, rollout_id, data_source, evaluation=False):
    assert evaluation
    samples = [Sample(index=i, response=str(i), reward=float(i % 2)) for i in range(4)]
    return {"toy": {"rewards": [s.reward for s in samples], "truncated": [False] * 4, "samples": samples}}
''')
    args = make_args(prompt_file, eval_function_path=f"{name}.eval_rollout")
    fn = load_function(args.eval_function_path, flag="--eval-function-path")
    data, metrics = split_eval_output(fn(args, 0, None, evaluation=True))
    assert data["toy"]["rewards"] == [0.0, 1.0, 0.0, 1.0] and metrics == {}


def test_default_eval_with_custom_generate(plugins, prompt_file):
    args = make_args(prompt_file, eval_prompt_data=["arith", str(prompt_file)], n_samples_per_eval_prompt=2,
                     eval_max_response_len=None, eval_temperature=None, eval_top_p=None, eval_top_k=None,
                     eval_min_new_tokens=None, eval_input_key=None, eval_label_key=None, eval_tool_key=None,
                     eval_max_prompt_len=None, eval_reward_key=None,
                     custom_generate_function_path="contract_generate.generate_with_evaluation")
    output = generate_rollout(args, 0, None, evaluation=True)
    assert isinstance(output, RolloutFnEvalOutput)
    assert output.data["arith"]["rewards"] == [1.0, 0.0] * 8
    assert output.metrics["eval/arith"] == 0.5
    assert output.metrics["eval/arith/pass@1"] == 0.5 and output.metrics["eval/arith/pass@2"] == 1.0
    assert all(s.metadata["evaluation"] for s in output.data["arith"]["samples"])


# ---- --custom-rollout-log-function-path / --custom-eval-rollout-log-function-path --------------

def test_rollout_log_function_paths(plugins, prompt_file):
    name = plugins("contract_log", '''
LOGGED = []

def log_rollout_data(rollout_id, args, samples, rollout_extra_metrics, rollout_time):
    LOGGED.append(("train", rollout_id, len(samples), rollout_time))
    return True

def log_eval_rollout_data(rollout_id, args, data, extra_metrics):
    LOGGED.append(("eval", rollout_id, sorted(data)))
    return False
''')
    args = make_args(prompt_file, custom_rollout_log_function_path=f"{name}.log_rollout_data",
                     custom_eval_rollout_log_function_path=f"{name}.log_eval_rollout_data")
    groups, metrics, _ = run_rollout(args)
    samples = [s for g in groups for s in g]
    assert call_rollout_log_function(args, 2, samples, metrics, 1.5) is True
    assert call_eval_rollout_log_function(args, 2, {"toy": {}}, {}) is False
    assert sys.modules[name].LOGGED == [("train", 2, 4, 1.5), ("eval", 2, ["toy"])]
    assert call_rollout_log_function(make_args(prompt_file), 2, samples, metrics, 1.5) is False


# ---- --sglang-server-concurrency bounds the generate calls in flight ---------------------------

def test_concurrency_limit_holds_across_groups(plugins, prompt_file):
    name = plugins("contract_slow_generate", '''
import asyncio
from slime.utils.types import Sample

IN_FLIGHT = [0]
PEAK = [0]

async def generate(args, sample: Sample, sampling_params) -> Sample:
    IN_FLIGHT[0] += 1
    PEAK[0] = max(PEAK[0], IN_FLIGHT[0])
    await asyncio.sleep(0.02)
    IN_FLIGHT[0] -= 1
    sample.tokens, sample.response, sample.response_length = [1, 2], "x", 1
    sample.loss_mask, sample.status = [1], Sample.Status.COMPLETED
    return sample
''')
    args = make_args(prompt_file, custom_generate_function_path=f"{name}.generate", rm_type="random",
                     rollout_batch_size=4, n_samples_per_prompt=4, sglang_server_concurrency=3)
    groups, _, _ = run_rollout(args)
    assert len(groups) == 4
    assert sys.modules[name].PEAK[0] == 3


def test_namespace_used_here_matches_the_real_argument_names(prompt_file, tiny_model_dir):
    from slime.utils.arguments import parse_args

    real = vars(parse_args(["--hf-checkpoint", str(tiny_model_dir), "--rollout-batch-size", "2",
                            "--actor-num-gpus-per-node", "1"]))
    no_flag_yet = {"rm_timeout", "rollout_max_retries"}  # read with defaults; flags requested in the report
    assert sorted(set(vars(make_args(prompt_file))) - set(real) - no_flag_yet) == []
