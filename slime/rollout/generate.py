"""The default generate function and its helpers: one SGLang `/generate` call per turn, token in, token out.

    sample = await generate(args, sample, sampling_params)   # --custom-generate-function-path replaces it

POSTs `{"input_ids", "sampling_params", "return_logprob": true}` to
`http://{args.sglang_router_ip}:{args.sglang_router_port}/generate` and appends the answer to the
sample: tokens, response, response_length, loss_mask (1 per generated token), rollout_log_probs,
weight_versions and status (stop -> COMPLETED, length -> TRUNCATED, abort -> ABORTED). A sample
that was ABORTED half-way (partial rollout) is continued from its tokens with the remaining budget.
For the built-in engine the request carries a `sampling_seed` derived from `--rollout-seed`, the sample's
index and its response length so far (`sampling_seed`): the engine's seeded sampling does not depend on
what else is in the batch, so a rerun draws the same samples whatever the request timing.
"""

from __future__ import annotations

import hashlib
from typing import Any

from slime.utils.http_utils import post
from slime.utils.types import Sample

from .errors import RolloutConfigError
from .tokenization import encode, get_tokenizer, render_chat

DEFAULT_GENERATE_MAX_RETRIES = 8  # ~30 s of back-off on 5xx / connection errors before the sample FAILS


def router_url(args, endpoint: str = "/generate") -> str:
    ip, port = getattr(args, "sglang_router_ip", None), getattr(args, "sglang_router_port", None)
    if not ip or not port:
        raise RolloutConfigError("--sglang-router-ip and --sglang-router-port must be set (the engine or router address)")
    return f"http://{ip}:{port}{endpoint}"


def base_sampling_params(args, *, evaluation: bool = False) -> dict[str, Any]:
    """SGLang sampling params from the rollout (or `--eval-*`, falling back to rollout) flags."""
    def pick(eval_name: str, rollout_name: str, default: Any = None) -> Any:
        value = getattr(args, eval_name, None) if evaluation else None
        return value if value is not None else getattr(args, rollout_name, default)

    max_new_tokens = pick("eval_max_response_len", "rollout_max_response_len")
    if max_new_tokens is None:
        raise RolloutConfigError("--rollout-max-response-len is required for generation")
    temperature = pick("eval_temperature", "rollout_temperature", 1.0)
    params: dict[str, Any] = {
        "temperature": temperature,
        "top_p": pick("eval_top_p", "rollout_top_p", 1.0),
        "top_k": pick("eval_top_k", "rollout_top_k", -1),
        "max_new_tokens": int(max_new_tokens),
        "skip_special_tokens": bool(getattr(args, "rollout_skip_special_tokens", False)),
        "no_stop_trim": True,
        "spaces_between_special_tokens": False,
    }
    if getattr(args, "rollout_stop", None):
        params["stop"] = list(args.rollout_stop)
    if getattr(args, "rollout_stop_token_ids", None):
        params["stop_token_ids"] = list(args.rollout_stop_token_ids)
    if evaluation and getattr(args, "eval_min_new_tokens", None):
        params["min_new_tokens"] = int(args.eval_min_new_tokens)
    return params


def prompt_token_ids(args, sample: Sample) -> list[int]:
    """The ids to send: the sample's tokens when it has some (continuation), else the encoded prompt."""
    if sample.tokens:
        return list(sample.tokens)
    tokenizer = get_tokenizer(args.hf_checkpoint)
    prompt = sample.prompt
    if isinstance(prompt, list):
        tools = sample.metadata.get("tools") if isinstance(sample.metadata, dict) else None
        prompt = render_chat(tokenizer, prompt, add_generation_prompt=True, tools=tools)
    if not isinstance(prompt, str):
        raise ValueError(f"sample {sample.index}: prompt must be text or chat messages, got {type(prompt).__name__}")
    return encode(tokenizer, prompt)


def status_from_finish_reason(finish_reason: Any) -> Sample.Status:
    kind = finish_reason.get("type") if isinstance(finish_reason, dict) else finish_reason
    if kind == "length":
        return Sample.Status.TRUNCATED
    if kind == "abort":
        return Sample.Status.ABORTED
    return Sample.Status.COMPLETED


def parse_generate_output(output: dict[str, Any]) -> tuple[list[int], list[float] | None]:
    """(new token ids, their log-probs or None when the server did not return them)."""
    meta = output.get("meta_info") or {}
    pairs = meta.get("output_token_logprobs")
    if pairs is not None:
        return [int(item[1]) for item in pairs], [float(item[0]) for item in pairs]
    ids = output.get("output_ids")
    if ids is None:
        raise ValueError(f"/generate answer has neither meta_info.output_token_logprobs nor output_ids: {output!r:.200}")
    return list(ids), None


def append_response(sample: Sample, new_tokens: list[int], log_probs: list[float] | None, text: str,
                    *, trainable: bool = True) -> None:
    """Extend the response by model tokens (trainable) or tool/environment tokens (loss mask 0, log-prob 0)."""
    if sample.loss_mask is None:
        sample.loss_mask = [1] * sample.response_length
    if sample.rollout_log_probs is None and sample.response_length == 0:
        sample.rollout_log_probs = []
    sample.tokens = list(sample.tokens) + list(new_tokens)
    sample.response += text
    sample.response_length += len(new_tokens)
    sample.loss_mask += [1 if trainable else 0] * len(new_tokens)
    if sample.rollout_log_probs is not None:
        if log_probs is None and trainable:
            sample.rollout_log_probs = None  # the server gave none: do not pretend
        else:
            sample.rollout_log_probs += list(log_probs) if trainable else [0.0] * len(new_tokens)


def generate_payload(args, sample: Sample, sampling_params: dict[str, Any]) -> dict[str, Any] | None:
    """The /generate body for this sample, or None (status set to TRUNCATED) when no token budget is left."""
    if sample.status not in (Sample.Status.PENDING, Sample.Status.ABORTED):
        raise ValueError(f"sample {sample.index} has status {sample.status.value}; only PENDING or ABORTED can generate")
    input_ids = prompt_token_ids(args, sample)
    if not sample.tokens:
        sample.tokens = list(input_ids)
    params = dict(sampling_params)
    params["max_new_tokens"] = int(params["max_new_tokens"]) - sample.response_length
    max_context = getattr(args, "rollout_max_context_len", None)
    if max_context:
        params["max_new_tokens"] = min(params["max_new_tokens"], int(max_context) - len(input_ids))
    if params["max_new_tokens"] <= 0:
        sample.status = Sample.Status.TRUNCATED
        return None
    return {"input_ids": input_ids, "sampling_params": params, "return_logprob": True}


def apply_generate_output(sample: Sample, output: dict[str, Any]) -> Sample:
    """Append one /generate answer (tokens, log-probs, text, weight version) and set the status from it."""
    new_tokens, log_probs = parse_generate_output(output)
    append_response(sample, new_tokens, log_probs, output.get("text", ""))
    meta = output.get("meta_info") or {}
    if meta.get("weight_version") is not None:
        sample.weight_versions.append(str(meta["weight_version"]))
    sample.status = status_from_finish_reason(meta.get("finish_reason"))
    return sample


def generate_max_retries(args) -> int:
    return getattr(args, "rollout_max_retries", None) or DEFAULT_GENERATE_MAX_RETRIES


def serves_builtin_engines(args) -> bool:
    """Whether the rollout talks to engines slime starts itself with the built-in backend."""
    return (getattr(args, "rollout_backend", None) or "builtin") == "builtin" \
        and not getattr(args, "rollout_external_engine_addrs", None)


def sampling_seed(args, sample: Sample) -> int | None:
    """The sample's `sampling_seed` (room left for the +j the server adds to the j-th prompt of a batch), or None:
    without --rollout-seed, or for SGLang engines (they take sampling_seed only with deterministic inference)."""
    seed = getattr(args, "rollout_seed", None)
    if seed is None or not serves_builtin_engines(args):
        return None
    key = f"{seed}:{sample.index}:{sample.response_length}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 2


def with_sampling_seed(args, sample: Sample, payload: dict[str, Any]) -> dict[str, Any]:
    """`payload` with the sample's sampling_seed in its sampling params (unless they already name one)."""
    seed = sampling_seed(args, sample)
    if seed is not None and payload["sampling_params"].get("sampling_seed") is None:
        payload = dict(payload, sampling_params=dict(payload["sampling_params"], sampling_seed=seed))
    return payload


async def generate(args, sample: Sample, sampling_params: dict[str, Any]) -> Sample:
    payload = generate_payload(args, sample, sampling_params)
    if payload is None:
        return sample
    payload = with_sampling_seed(args, sample, payload)
    output = await post(router_url(args), payload, max_retries=generate_max_retries(args))
    return apply_generate_output(sample, output)
