"""Evaluation rollout: every prompt of each `--eval-prompt-data name path ...` set, `--n-samples-per-eval-prompt` times.

    generate_rollout(args, rollout_id, data_source, evaluation=True)   # -> RolloutFnEvalOutput

Sampling uses the `--eval-*` flags, falling back to the rollout ones. Per dataset the result holds
`rewards`, `truncated` and `samples` (in prompt order); the metrics hold the mean reward,
pass@k for k = 1, 2, 4, ... <= n (unbiased estimator) and the truncated ratio.
Failed samples (engine or reward errors) count as wrong and are reported under `eval/{name}/failed`.
With the default generate, the samples of whole prompts go to the engine together, about
EVAL_SAMPLES_PER_REQUEST samples per `/generate` request (see --rollout-group-requests).
"""

from __future__ import annotations

import asyncio
import copy
import math
from dataclasses import dataclass, field
from typing import Any

from slime.utils.types import Sample

from .base_types import RolloutFnEvalOutput
from .generate import base_sampling_params
from .rewarding import failure_reason

_DATASETS: dict[tuple, list[Sample]] = {}
EVAL_SAMPLES_PER_REQUEST = 8


@dataclass
class EvalDataset:
    name: str
    path: str
    overrides: dict[str, Any] = field(default_factory=dict)  # argument dest -> value (--eval-config)

    def args(self, args):
        """The run's arguments with this dataset's settings over them."""
        if not self.overrides:
            return args
        merged = copy.copy(args)
        for dest, value in self.overrides.items():
            setattr(merged, dest, value)
        return merged


def eval_datasets(args) -> list[EvalDataset]:
    """From `args.eval_datasets` ([{"name", "path", "overrides"?}], filled by the argument parser from --eval-config
    and --eval-prompt-data) or, for hand-made args, `--eval-prompt-data` pairs."""
    configured = getattr(args, "eval_datasets", None)
    if configured:
        for i, entry in enumerate(configured):
            if not isinstance(entry, dict) or not entry.get("name") or not entry.get("path"):
                raise ValueError(f"eval dataset {i} needs a name and a path, got {entry!r:.100}")
        return [EvalDataset(str(entry["name"]), str(entry["path"]), dict(entry.get("overrides") or {}))
                for entry in configured]
    pairs = getattr(args, "eval_prompt_data", None) or []
    if len(pairs) % 2:
        raise ValueError(f"--eval-prompt-data takes name/path pairs, got {len(pairs)} values: {pairs}")
    return [EvalDataset(pairs[i], pairs[i + 1]) for i in range(0, len(pairs), 2)]


def _load_prompts(args, dataset: EvalDataset) -> list[Sample]:
    from slime.data.chat_template import load_tokenizer
    from slime.data.dataset import load_prompt_dataset

    apply_template = bool(getattr(args, "apply_chat_template", False))
    max_len = getattr(args, "eval_max_prompt_len", None) or getattr(args, "rollout_max_prompt_len", None)
    keys = dict(input_key=getattr(args, "eval_input_key", None) or getattr(args, "input_key", "input"),
                label_key=getattr(args, "eval_label_key", None) or getattr(args, "label_key", None),
                metadata_key=getattr(args, "metadata_key", "metadata"),
                tool_key=getattr(args, "eval_tool_key", None) or getattr(args, "tool_key", "tools"))
    key = (dataset.path, apply_template, max_len, getattr(args, "hf_checkpoint", None), *keys.values())
    if key not in _DATASETS:
        tokenizer = load_tokenizer(args.hf_checkpoint) if (apply_template or max_len) else None
        _DATASETS[key] = load_prompt_dataset(
            dataset.path,
            tokenizer=tokenizer,
            **keys,
            apply_chat_template=apply_template,
            apply_chat_template_kwargs=getattr(args, "apply_chat_template_kwargs", None),
            max_prompt_len=max_len,
            flag_prefix="--eval-",
        ).samples
    return _DATASETS[key]


def pass_at_k(n: int, correct: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if n - correct < k:
        return 1.0
    return 1.0 - math.comb(n - correct, k) / math.comb(n, k)


def _reward_value(args, sample: Sample) -> float:
    if sample.reward is None:
        return 0.0
    key = getattr(args, "eval_reward_key", None) or getattr(args, "reward_key", None)
    if isinstance(sample.reward, dict):
        if not key:
            raise ValueError("eval reward is a dict: set --eval-reward-key or --reward-key")
        return float(sample.reward[key])
    return float(sample.reward)


def dataset_metrics(name: str, rewards: list[float], truncated: list[bool], n: int, failed: int) -> dict[str, float]:
    metrics = {f"eval/{name}": sum(rewards) / len(rewards) if rewards else 0.0,
               f"eval/{name}/truncated_ratio": sum(truncated) / max(1, len(truncated)),
               f"eval/{name}/failed": failed}
    k = 1
    while k <= n:
        per_prompt = [rewards[i:i + n] for i in range(0, len(rewards), n)]
        metrics[f"eval/{name}/pass@{k}"] = sum(pass_at_k(n, sum(r > 0 for r in group), k) for group in per_prompt) / max(
            1, len(per_prompt))
        k *= 2
    return metrics


async def eval_one_dataset(args, rollout_id: int, dataset: EvalDataset) -> tuple[dict[str, Any], dict[str, float]]:
    from .sglang_rollout import generate_and_rm_group

    args = dataset.args(args)
    n = int(getattr(args, "n_samples_per_eval_prompt", 1) or 1)
    params = base_sampling_params(args, evaluation=True)
    samples: list[Sample] = []
    for p, prompt in enumerate(_load_prompts(args, dataset)):
        for _ in range(n):
            sample = copy.deepcopy(prompt)
            sample.group_index, sample.index = p, len(samples)
            samples.append(sample)
    per_request = n * max(1, EVAL_SAMPLES_PER_REQUEST // n)
    chunks = await asyncio.gather(*(
        generate_and_rm_group(args, samples[i:i + per_request], dict(params), evaluation=True, rollout_id=rollout_id)
        for i in range(0, len(samples), per_request)))
    results = [result for chunk in chunks for result in chunk]
    flat = [s for r in results for s in (r if isinstance(r, list) else [r])]
    if len(flat) != len(samples):  # a fan-out generate: keep the last sample of each trajectory
        flat = [r[-1] if isinstance(r, list) else r for r in results]
    rewards = [_reward_value(args, s) for s in flat]
    truncated = [s.status == Sample.Status.TRUNCATED for s in flat]
    failed = [s for s in flat if s.status == Sample.Status.FAILED]
    metrics = dataset_metrics(dataset.name, rewards, truncated, n, len(failed))
    if failed:
        metrics[f"eval/{dataset.name}/first_failure"] = failure_reason(failed[0])  # type: ignore[assignment]
    return {dataset.name: {"rewards": rewards, "truncated": truncated, "samples": flat}}, metrics


async def eval_rollout(args, rollout_id: int) -> RolloutFnEvalOutput:
    if getattr(args, "group_rm", False):
        raise ValueError("--group-rm is not supported for evaluation; set --eval-function-path to your own eval")
    datasets = eval_datasets(args)
    if not datasets:
        raise ValueError("evaluation needs --eval-prompt-data name path [name path ...]")
    outputs = await asyncio.gather(*(eval_one_dataset(args, rollout_id, d) for d in datasets))
    data: dict[str, Any] = {}
    metrics: dict[str, float] = {}
    for part, part_metrics in outputs:
        data.update(part)
        metrics.update(part_metrics)
    return RolloutFnEvalOutput(data=data, metrics=metrics)
