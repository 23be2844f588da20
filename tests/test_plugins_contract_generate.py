"""Contract test for --custom-generate-function-path against the real engine: an original-style generate.

    python -m pytest -q tests/test_plugins_contract_generate.py
"""

from __future__ import annotations

import json
import sys

from slime.data.data_source import RolloutDataSourceWithBuffer
from slime.rollout.base_types import split_train_output
from slime.rollout.sglang_rollout import generate_rollout
from slime.rollout.train_data import samples_to_train_data
from slime.utils.types import Sample

from test_rollout_sglang import engine, rollout_args  # noqa: F401  (module-scoped engine subprocess)

ORIGINAL_STYLE_GENERATE = '''
from slime.rollout.sglang_rollout import GenerateState
from slime.utils.http_utils import post
from slime.utils.types import Sample


async def generate(args, sample: Sample, sampling_params) -> Sample:
    state = GenerateState(args)
    url = f"http://{args.sglang_router_ip}:{args.sglang_router_port}/generate"
    prompt_ids = state.tokenizer(sample.prompt, add_special_tokens=False)["input_ids"]
    output = await post(url, {"input_ids": prompt_ids, "sampling_params": sampling_params, "return_logprob": True})
    pairs = output["meta_info"]["output_token_logprobs"]
    sample.tokens = prompt_ids + [item[1] for item in pairs]
    sample.rollout_log_probs = [item[0] for item in pairs]
    sample.response_length = len(pairs)
    sample.loss_mask = [1] * len(pairs)
    sample.response = output["text"]
    finish = output["meta_info"]["finish_reason"]["type"]
    sample.status = {"length": Sample.Status.TRUNCATED, "abort": Sample.Status.ABORTED}.get(
        finish, Sample.Status.COMPLETED)
    return sample


async def reward(args, sample: Sample, **kwargs):
    return float(sample.index % 2)
'''


def test_original_style_generate_runs_in_the_default_rollout(engine, tiny_model_dir, tmp_path, monkeypatch):  # noqa: F811
    (tmp_path / "original_generate.py").write_text(ORIGINAL_STYLE_GENERATE)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("original_generate", None)
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"input": f"{i}+1=", "label": str(i + 1)}) + "\n" for i in range(4)))
    args = rollout_args(tiny_model_dir, engine.port, data, rollout_batch_size=2, n_samples_per_prompt=2,
                        rollout_max_response_len=5, custom_generate_function_path="original_generate.generate",
                        custom_rm_path="original_generate.reward")
    groups, metrics = split_train_output(generate_rollout(args, 0, RolloutDataSourceWithBuffer(args)))
    samples = [s for g in groups for s in g]
    assert [s.index for s in samples] == [0, 1, 2, 3]
    assert all(1 <= s.response_length <= 5 and s.status != Sample.Status.FAILED for s in samples)
    data = samples_to_train_data(args, samples)
    assert data["raw_reward"] == [0.0, 1.0, 0.0, 1.0]
    assert [len(lp) for lp in data["rollout_log_probs"]] == data["response_lengths"]
