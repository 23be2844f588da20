"""SGLang `/generate` protocol at the server edge: validate + tokenise requests, detokenise + shape answers.

    call = parse_generate_request(body, tokenizer, max_context_len=2048)   # ProtocolError -> HTTP 400
    answer = build_generate_response(tokenizer, call.items[0], state, e2e_latency)
    fields = await read_json_object(request, {"rid": str, "abort_all": bool})   # control endpoints

Field names follow SGLang's GenerateReqInput / SamplingParams. Sampling parameters the built-in engine
cannot honour are rejected when set to a non-neutral value; unknown names are rejected outright, so a
typo never silently changes generation. A null value counts as absent (`sglang-router` re-serialises
requests with nulls for the fields it models). `sampling_seed` s gives the k-th sequence of the request
(over its prompts, then `n`) the seed s + k, so a batch of equal prompts still draws distinct samples
(SGLang gives every prompt of a batch the same seed).
"""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import dataclass, field
from typing import Any

from slime.engine.async_engine import RequestState


class ProtocolError(ValueError):
    """A client error; the server answers HTTP 400 with this message."""


# sampling parameters the engine honours, with SGLang's defaults
SUPPORTED_SAMPLING = {
    "max_new_tokens": 128, "temperature": 1.0, "top_p": 1.0, "top_k": -1, "min_p": 0.0, "stop": None,
    "stop_token_ids": None, "ignore_eos": False, "skip_special_tokens": True,
    "spaces_between_special_tokens": True, "no_stop_trim": False, "sampling_seed": None, "n": 1,
    "stream_interval": None, "min_new_tokens": 0,
}
# accepted only at their neutral value (None counts as neutral)
NEUTRAL_SAMPLING = {
    "frequency_penalty": 0.0, "presence_penalty": 0.0, "repetition_penalty": 1.0,
    "json_schema": None, "regex": None, "ebnf": None, "structural_tag": None, "stop_regex": None,
    "logit_bias": None, "custom_params": None,
}
# GenerateReqInput fields accepted only at their neutral value (None / False / 0 / empty)
NEUTRAL_REQUEST_FIELDS = {
    "input_embeds", "image_data", "video_data", "audio_data", "top_logprobs_num", "token_ids_logprob",
    "return_hidden_states", "lora_path", "lora_id", "custom_logit_processor", "session_params",
    "return_text_in_logprobs", "return_entropy", "return_routed_experts",
}
# GenerateReqInput fields that do not change what is generated; ignored
IGNORED_REQUEST_FIELDS = {
    "log_metrics", "modalities", "bootstrap_host", "bootstrap_port", "bootstrap_room", "bootstrap_pair_key",
    "data_parallel_rank", "routed_dp_rank", "background", "conversation_id", "priority", "extra_key", "no_logs",
    "custom_labels", "return_bytes", "is_single", "logprob_start_len", "routing_key", "request_id", "model",
}
REQUEST_FIELDS = {"text", "input_ids", "sampling_params", "rid", "return_logprob", "stream"}
# prompts x n of one /generate call; bounds the work a single request can queue (n=10**9 would never finish)
MAX_SEQUENCES_PER_REQUEST = 16384


@dataclass
class GenerateItem:
    """One prompt of a (possibly batched) /generate call, ready for the engine."""

    rid: str
    prompt_ids: list[int]
    engine_params: dict[str, Any]
    stop: list[str] = field(default_factory=list)
    no_stop_trim: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    return_logprob: bool = False


@dataclass
class GenerateCall:
    items: list[GenerateItem]
    is_batch: bool
    stream: bool


def _is_neutral(value: Any, neutral: Any) -> bool:
    return value is None or value == neutral or (neutral is None and value in ((), [], {}, "", False, 0))


def _as_bool(name: str, value: Any, default: bool) -> bool:
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ProtocolError(f"{name} must be true or false, got {value!r}")
    return value


def _as_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
        raise ProtocolError(f"sampling parameter {name} must be an integer, got {value!r}")
    return int(value)


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ProtocolError(f"sampling parameter {name} must be a finite number, got {value!r}")
    return float(value)


def validate_sampling_params(raw: Any, vocab_size: int | None = None) -> dict[str, Any]:
    """SGLang sampling_params dict -> normalised dict (every supported key present)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ProtocolError(f"sampling_params must be an object, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(SUPPORTED_SAMPLING) - set(NEUTRAL_SAMPLING))
    if unknown:
        raise ProtocolError(f"unknown sampling parameter {unknown[0]!r} (known: {sorted(SUPPORTED_SAMPLING)})")
    for name, neutral in NEUTRAL_SAMPLING.items():
        if name in raw and not _is_neutral(raw[name], neutral):
            raise ProtocolError(f"sampling parameter {name}={raw[name]!r} is not supported by the built-in engine")
    params = {k: (raw[k] if raw.get(k) is not None else v) for k, v in SUPPORTED_SAMPLING.items()}
    params["max_new_tokens"] = _as_int("max_new_tokens", params["max_new_tokens"])
    if params["max_new_tokens"] < 0:
        raise ProtocolError(f"sampling parameter max_new_tokens must be >= 0, got {params['max_new_tokens']}")
    params["temperature"] = _as_float("temperature", params["temperature"])
    if params["temperature"] < 0:
        raise ProtocolError(f"sampling parameter temperature must be >= 0, got {params['temperature']}")
    params["top_p"] = _as_float("top_p", params["top_p"])
    if not 0.0 < params["top_p"] <= 1.0:
        raise ProtocolError(f"sampling parameter top_p must be in (0, 1], got {params['top_p']}")
    params["top_k"] = _as_int("top_k", params["top_k"])
    if params["top_k"] == 0 or params["top_k"] < -1:
        raise ProtocolError(f"sampling parameter top_k must be -1 (off) or >= 1, got {params['top_k']}")
    params["min_p"] = _as_float("min_p", params["min_p"])
    if not 0.0 <= params["min_p"] <= 1.0:
        raise ProtocolError(f"sampling parameter min_p must be in [0, 1], got {params['min_p']}")
    params["min_new_tokens"] = _as_int("min_new_tokens", params["min_new_tokens"])
    if params["min_new_tokens"] < 0:
        raise ProtocolError(f"sampling parameter min_new_tokens must be >= 0, got {params['min_new_tokens']}")
    params["n"] = _as_int("n", params["n"])
    if params["n"] < 1:
        raise ProtocolError(f"sampling parameter n must be >= 1, got {params['n']}")
    if params["sampling_seed"] is not None:
        params["sampling_seed"] = _as_int("sampling_seed", params["sampling_seed"])
    stop = params["stop"]
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise ProtocolError(f"sampling parameter stop must be a non-empty string or a list of them, got {params['stop']!r}")
    params["stop"] = stop
    stop_ids = params["stop_token_ids"] or []
    if not isinstance(stop_ids, list):
        raise ProtocolError(f"sampling parameter stop_token_ids must be a list of ints, got {stop_ids!r}")
    params["stop_token_ids"] = [_as_int("stop_token_ids", t) for t in stop_ids]
    if vocab_size is not None and any(not 0 <= t < vocab_size for t in params["stop_token_ids"]):
        raise ProtocolError(f"sampling parameter stop_token_ids holds an id outside the vocabulary (size {vocab_size})")
    for name in ("ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim"):
        params[name] = _as_bool(f"sampling parameter {name}", params[name], SUPPORTED_SAMPLING[name])
    return params


def _per_item(name: str, value: Any, count: int, is_batch: bool) -> list[Any]:
    if is_batch and isinstance(value, list):
        if len(value) != count:
            raise ProtocolError(f"{name} has {len(value)} entries but the batch has {count} prompts")
        return value
    return [value] * count


def _check_ids(ids: Any, where: str, vocab_size: int | None) -> list[int]:
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise ProtocolError(f"{where} must be a list of integer token ids")
    if vocab_size is not None and any(not 0 <= t < vocab_size for t in ids):
        raise ProtocolError(f"{where} holds a token id outside the vocabulary (size {vocab_size})")
    return ids


def _check_batch_size(count: int) -> None:
    if count > MAX_SEQUENCES_PER_REQUEST:
        raise ProtocolError(f"the batch has {count} prompts; at most {MAX_SEQUENCES_PER_REQUEST} per request")


def parse_generate_request(
    body: Any, tokenizer: Any, max_context_len: int, vocab_size: int | None = None
) -> GenerateCall:
    """Validate a /generate body and tokenise it; raises ProtocolError with a readable message."""
    if not isinstance(body, dict):
        raise ProtocolError(f"the request body must be a JSON object, got {type(body).__name__}")
    for name, value in body.items():
        if name in REQUEST_FIELDS or name in IGNORED_REQUEST_FIELDS:
            continue
        if name in NEUTRAL_REQUEST_FIELDS:
            if not _is_neutral(value, None):
                raise ProtocolError(f"request field {name} is not supported by the built-in engine")
            continue
        if value is not None:
            raise ProtocolError(f"unknown request field {name!r}")
    text, input_ids = body.get("text"), body.get("input_ids")
    if (text is None) == (input_ids is None):
        raise ProtocolError("give exactly one of 'text' or 'input_ids'")
    if text is not None:
        if tokenizer is None:
            raise ProtocolError("'text' needs a tokenizer but the server runs with --skip-tokenizer-init; send 'input_ids'")
        is_batch = isinstance(text, list)
        texts = text if is_batch else [text]
        if not all(isinstance(t, str) for t in texts):
            raise ProtocolError("'text' must be a string or a list of strings")
        _check_batch_size(len(texts))
        prompts = [list(tokenizer.encode(t)) for t in texts]
    else:
        is_batch = isinstance(input_ids, list) and bool(input_ids) and isinstance(input_ids[0], list)
        if is_batch:
            _check_batch_size(len(input_ids))
        prompts = [_check_ids(p, f"input_ids[{i}]" if is_batch else "input_ids", vocab_size)
                   for i, p in enumerate(input_ids if is_batch else [input_ids])]
    if is_batch and not prompts:
        raise ProtocolError("the batch is empty")
    count = len(prompts)
    sampling = _per_item("sampling_params", body.get("sampling_params"), count, is_batch)
    rids = _per_item("rid", body.get("rid"), count, is_batch)
    return_logprob = _per_item("return_logprob", body.get("return_logprob"), count, is_batch)
    stream = _as_bool("stream", body.get("stream"), False)
    if stream and is_batch:
        raise ProtocolError("stream=true is supported for a single prompt only")

    items: list[GenerateItem] = []
    for i, prompt in enumerate(prompts):
        where = f" (prompt {i})" if is_batch else ""
        if not prompt:
            raise ProtocolError(f"the prompt is empty{where}")
        if len(prompt) >= max_context_len:
            raise ProtocolError(f"the prompt has {len(prompt)} tokens, longer than the context length "
                                f"{max_context_len} minus one{where}")
        params = validate_sampling_params(sampling[i], vocab_size)
        if len(items) + params["n"] > MAX_SEQUENCES_PER_REQUEST:
            raise ProtocolError(f"the request asks for more than {MAX_SEQUENCES_PER_REQUEST} sequences (prompts x n "
                                f"= at least {len(items) + params['n']}); split it into several requests")
        max_new = min(params["max_new_tokens"], max_context_len - len(prompt))
        rid = rids[i]
        if rid is not None and not isinstance(rid, str):
            raise ProtocolError(f"rid must be a string or a list of strings, got {rid!r}")
        base_rid = rid or uuid.uuid4().hex
        for j in range(params["n"]):
            seed = params["sampling_seed"]
            items.append(GenerateItem(
                rid=base_rid if params["n"] == 1 else f"{base_rid}-{j}",
                prompt_ids=prompt,
                engine_params=dict(
                    temperature=params["temperature"], top_p=params["top_p"], top_k=params["top_k"],
                    min_p=params["min_p"], max_new_tokens=max_new, stop_token_ids=params["stop_token_ids"],
                    ignore_eos=params["ignore_eos"], seed=None if seed is None else seed + len(items),
                    min_new_tokens=params["min_new_tokens"],
                ),
                stop=params["stop"],
                no_stop_trim=params["no_stop_trim"],
                skip_special_tokens=params["skip_special_tokens"],
                spaces_between_special_tokens=params["spaces_between_special_tokens"],
                return_logprob=_as_bool("return_logprob", return_logprob[i], False),
            ))
    if stream and len(items) > 1:
        raise ProtocolError("stream=true is supported with n=1 only")
    return GenerateCall(items=items, is_batch=is_batch or len(items) > 1, stream=stream)


def decode_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ProtocolError(f"malformed JSON body: {e}") from e


async def read_json_object(request: Any, fields: dict[str, type | tuple[type, ...]], required: tuple[str, ...] = ()) -> dict:
    """Decode a control endpoint's JSON object body; unknown or mistyped fields are client errors.

    A null value counts as absent. Returns every field of `fields` (absent ones as None)."""
    raw = await request.body()
    body = decode_json(raw) if raw.strip() else {}
    path = request.url.path
    if not isinstance(body, dict):
        raise ProtocolError(f"the request body must be a JSON object, got {type(body).__name__}")
    unknown = sorted(k for k, v in body.items() if k not in fields and v is not None)
    if unknown:
        raise ProtocolError(f"unknown field {unknown[0]!r} for {path} (known: {sorted(fields)})")
    for name in required:
        if body.get(name) is None:
            raise ProtocolError(f"{path} needs the field {name!r}")
    for name, kind in fields.items():
        value = body.get(name)
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if value is not None and (not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds)):
            raise ProtocolError(f"field {name!r} of {path} has the wrong type ({type(value).__name__})")
    return {k: body.get(k) for k in fields}


def min_tokens_text_len(tokenizer: Any, item: GenerateItem, output_ids: list[int]) -> int:
    """Text length of the first min_new_tokens - 1 output tokens: a stop string ends the request only where it
    ends beyond that text, i.e. at or after its min_new_tokens-th token (0 without min_new_tokens)."""
    count = int(item.engine_params.get("min_new_tokens") or 0)
    if count <= 1:
        return 0
    return len(tokenizer.decode(output_ids[:count - 1], skip_special_tokens=item.skip_special_tokens))


class StopStringWatcher:
    """Detokenise incrementally and report the first stop string that appears in the output text
    (ignoring any that is complete within the first min_new_tokens - 1 tokens)."""

    def __init__(self, tokenizer: Any, item: GenerateItem):
        self._tokenizer = tokenizer
        self._item = item
        self._text = ""
        self._prefix_offset = 0
        self._read_offset = 0
        self._longest = max((len(s) for s in item.stop), default=0)
        self._min_tokens = int(item.engine_params.get("min_new_tokens") or 0)
        self._min_end: int | None = None if self._min_tokens > 1 else 0  # see min_tokens_text_len

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._item.skip_special_tokens)

    def check(self, output_ids: list[int]) -> tuple[str, int] | None:
        """Feed the cumulative output ids; returns (stop string, tokens to keep) at the first match.

        The engine may run ahead of the edge by several tokens, so the kept length is the shortest
        prefix of `output_ids` whose text contains the stop string."""
        if not self._item.stop or len(output_ids) <= self._read_offset or len(output_ids) < self._min_tokens:
            return None
        if self._min_end is None:  # nothing was consumed yet: offsets and text are still at the start
            self._min_end = min_tokens_text_len(self._tokenizer, self._item, output_ids)
        prefix = self._decode(output_ids[self._prefix_offset:self._read_offset])
        searched_from = max(0, len(self._text) - self._longest + 1)
        for end in range(max(self._read_offset + 1, self._min_tokens), len(output_ids) + 1):
            window = self._decode(output_ids[self._prefix_offset:end])
            if len(window) <= len(prefix) or window.endswith("\ufffd"):
                continue  # an incomplete multi-byte character: wait for more tokens
            text = self._text + window[len(prefix):]
            hits = [(text.find(s, max(searched_from, self._min_end - len(s) + 1)), s) for s in self._item.stop]
            hits = [hit for hit in hits if hit[0] >= 0]
            if hits:
                return min(hits)[1], end
        window = self._decode(output_ids[self._prefix_offset:])
        if len(window) > len(prefix) and not window.endswith("\ufffd"):
            self._text += window[len(prefix):]
            self._prefix_offset, self._read_offset = self._read_offset, len(output_ids)
        return None


def output_text(tokenizer: Any, item: GenerateItem, state: RequestState) -> str:
    """The answer's text: decoded output with the matched stop trimmed (unless no_stop_trim)."""
    if tokenizer is None:
        return ""
    ids = state.output_ids
    reason = state.finish_reason or {}
    matched = reason.get("matched") if reason.get("type") == "stop" else None
    if isinstance(matched, int) and not item.no_stop_trim and ids and ids[-1] == matched:
        ids = ids[:-1]
    text = tokenizer.decode(ids, skip_special_tokens=item.skip_special_tokens)
    if isinstance(matched, str) and not item.no_stop_trim:
        position = text.find(matched, max(0, min_tokens_text_len(tokenizer, item, ids) - len(matched) + 1))
        if position >= 0:
            text = text[:position]
    return text


def build_generate_response(
    tokenizer: Any, item: GenerateItem, state: RequestState, e2e_latency: float
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "id": item.rid,
        "finish_reason": state.finish_reason if state.finished else None,
        "prompt_tokens": len(item.prompt_ids),
        "completion_tokens": len(state.output_ids),
        "cached_tokens": state.cached_tokens,
        "weight_version": state.weight_version,
        "e2e_latency": e2e_latency,
    }
    if item.return_logprob:
        meta["output_token_logprobs"] = [[float(lp), int(t), None] for lp, t in zip(state.logprobs, state.output_ids)]
    return {"text": output_text(tokenizer, item, state), "output_ids": list(state.output_ids), "meta_info": meta}
