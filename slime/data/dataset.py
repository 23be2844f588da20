"""Prompt datasets: rows of a `.jsonl` / `.parquet` file turned into `Sample`s, checked row by row.

    python -m slime.data.dataset --prompt-data train.jsonl --input-key messages --label-key label \
        --hf-checkpoint /tmp/tiny-qwen3 --apply-chat-template --rollout-max-prompt-len 64

Per row: the prompt is `row[--input-key]` (text, or chat messages `[{"role", "content"}, ...]`), the
label `row[--label-key]`, metadata `row[--metadata-key]` (an object, or a JSON string of one) and
tools `row[--tool-key]` (a list, or a JSON string of one; also kept as `metadata["tools"]`).
With `--apply-chat-template` the prompt becomes the templated text (tools passed as `tools=`,
`--apply-chat-template-kwargs` forwarded) and the messages are kept as `metadata["messages"]`.

Bad input policy: broken JSON, a missing input/label field, or a field of the wrong type is an
error naming the file and line (row for parquet). Empty prompts and prompts longer than
`--rollout-max-prompt-len` tokens are dropped, with one warning each that counts them.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
from dataclasses import dataclass, field
from typing import Any

from slime.data.chat_template import Messages, as_messages, count_prompt_tokens, load_tokenizer, render_chat
from slime.data.readers import Row, iter_rows
from slime.utils.types import Sample

logger = logging.getLogger(__name__)

_LABEL_TYPES = (str, int, float, bool, list, dict)


@dataclass
class PromptDataset:
    """Samples in file order; `permutation(epoch)` gives the shuffled order of an epoch."""

    samples: list[Sample]
    path: str
    seed: int = 42
    num_dropped_empty: int = 0
    num_dropped_long: int = 0
    _order_cache: dict[int, list[int]] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.samples)

    def permutation(self, epoch: int) -> list[int]:
        """Order of the samples in `epoch`: a shuffle seeded by `seed + epoch` (the original's rule)."""
        if epoch not in self._order_cache:
            order = list(range(len(self.samples)))
            random.Random(self.seed + epoch).shuffle(order)
            self._order_cache = {epoch: order}  # only the current epoch is ever needed
        return self._order_cache[epoch]


@dataclass(frozen=True)
class RowSchema:
    """Which fields of a row hold what; `flag_prefix` is "--" or "--eval-" for error messages."""

    input_key: str = "input"
    label_key: str | None = None
    metadata_key: str | None = "metadata"
    tool_key: str | None = "tools"
    flag_prefix: str = "--"


def load_prompt_dataset(
    path: str,
    *,
    tokenizer: Any = None,
    input_key: str = "input",
    label_key: str | None = None,
    metadata_key: str | None = "metadata",
    tool_key: str | None = "tools",
    apply_chat_template: bool = False,
    apply_chat_template_kwargs: dict[str, Any] | None = None,
    max_prompt_len: int | None = None,
    seed: int = 42,
    flag_prefix: str = "--",
) -> PromptDataset:
    """Read, check and convert every row of `path` (`.jsonl` / `.parquet`, optional `@[start:end]`)."""
    max_len_flag = "--eval-max-prompt-len" if flag_prefix == "--eval-" else "--rollout-max-prompt-len"
    if (apply_chat_template or max_prompt_len is not None) and tokenizer is None:
        raise ValueError(f"--apply-chat-template and {max_len_flag} need a tokenizer: set --hf-checkpoint")
    if max_prompt_len is not None and max_prompt_len <= 0:
        raise ValueError(f"{max_len_flag} must be positive, got {max_prompt_len}")
    if apply_chat_template_kwargs is not None and not isinstance(apply_chat_template_kwargs, dict):
        raise ValueError("--apply-chat-template-kwargs must be a JSON object, "
                         f"got {type(apply_chat_template_kwargs).__name__}")
    schema = RowSchema(input_key, label_key, metadata_key, tool_key, flag_prefix)
    samples: list[Sample] = []
    empty_locations: list[str] = []
    long_locations: list[str] = []
    total = 0
    for row in iter_rows(path, flag=f"{flag_prefix}prompt-data"):
        total += 1
        sample = row_to_sample(row, schema, tokenizer=tokenizer, apply_chat_template=apply_chat_template,
                               template_kwargs=apply_chat_template_kwargs)
        if sample is None:
            empty_locations.append(row.location)
            continue
        if max_prompt_len is not None:
            tools = sample.metadata.get("tools") if not apply_chat_template else None
            try:
                length = count_prompt_tokens(tokenizer, sample.prompt, tools=tools,
                                             template_kwargs=apply_chat_template_kwargs)
            except Exception as e:  # a template error on one row: say which row
                raise ValueError(f"{row.location}: cannot template the prompt to measure its length ({e})") from e
            if length > max_prompt_len:
                long_locations.append(row.location)
                continue
        samples.append(sample)
    if empty_locations:
        logger.warning("%s: dropped %d of %d rows with an empty prompt (first at %s)",
                       path, len(empty_locations), total, empty_locations[0])
    if long_locations:
        logger.warning("%s: dropped %d of %d prompts longer than %s=%d tokens (first at %s)",
                       path, len(long_locations), total, max_len_flag, max_prompt_len, long_locations[0])
    if not samples:
        raise ValueError(f"{flag_prefix}prompt-data {path}: no usable prompts ({total} rows, "
                         f"{len(empty_locations)} empty, {len(long_locations)} too long)")
    return PromptDataset(samples=samples, path=path, seed=seed, num_dropped_empty=len(empty_locations),
                         num_dropped_long=len(long_locations))


def row_to_sample(row: Row, schema: RowSchema, *, tokenizer: Any = None, apply_chat_template: bool = False,
                  template_kwargs: dict[str, Any] | None = None) -> Sample | None:
    """One checked `Sample` (prompt, label, metadata), or None when the prompt is empty."""
    data, where, flag = row.data, row.location, schema.flag_prefix
    if schema.input_key not in data:
        raise ValueError(f"{where}: no field {schema.input_key!r} (set by {flag}input-key); "
                         f"fields present: {sorted(data)}")
    prompt = _check_prompt(data[schema.input_key], where, schema)
    if _is_empty(prompt):
        return None
    label = _check_label(data, where, schema) if schema.label_key else None
    metadata = _check_metadata(data.get(schema.metadata_key) if schema.metadata_key else None, where, schema)
    tools = _check_tools(data.get(schema.tool_key) if schema.tool_key else None, where, schema)
    if tools is not None:
        metadata.setdefault("tools", tools)
    if apply_chat_template:
        messages = as_messages(prompt)
        try:
            prompt = render_chat(tokenizer, messages, tools=tools, template_kwargs=template_kwargs)
        except Exception as e:  # jinja / tokenizer errors name the row they came from
            raise ValueError(f"{where}: --apply-chat-template failed on this row ({e})") from e
        metadata.setdefault("messages", messages)
    return Sample(prompt=prompt, label=label, metadata=metadata)


def _check_prompt(value: Any, where: str, schema: RowSchema) -> str | Messages:
    flag = f"{schema.flag_prefix}input-key"
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        for i, message in enumerate(value):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise ValueError(f"{where}: field {schema.input_key!r} ({flag}) message {i} must be an object "
                                 f"with a string 'role', got {message!r:.80}")
            content = message.get("content")
            if content is not None and not isinstance(content, (str, list)):
                raise ValueError(f"{where}: field {schema.input_key!r} ({flag}) message {i} has content of type "
                                 f"{type(content).__name__}; expected a string")
        return value
    raise ValueError(f"{where}: field {schema.input_key!r} ({flag}) must be a string or a list of chat messages, "
                     f"got {type(value).__name__}")


def _is_empty(prompt: str | Messages) -> bool:
    if isinstance(prompt, str):
        return not prompt.strip()
    return not any(isinstance(m.get("content"), list) or (m.get("content") or "").strip() for m in prompt)


def _check_label(data: dict[str, Any], where: str, schema: RowSchema) -> Any:
    flag = f"{schema.flag_prefix}label-key"
    if schema.label_key not in data:
        raise ValueError(f"{where}: no field {schema.label_key!r} (set by {flag}); fields present: {sorted(data)}")
    label = data[schema.label_key]
    if label is None:
        raise ValueError(f"{where}: label field {schema.label_key!r} ({flag}) is null")
    if not isinstance(label, _LABEL_TYPES):
        raise ValueError(f"{where}: label field {schema.label_key!r} ({flag}) has type {type(label).__name__}; "
                         "expected a string, number, boolean, list or object")
    return label


def _check_metadata(value: Any, where: str, schema: RowSchema) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: metadata field {schema.metadata_key!r} (--metadata-key) is a string "
                             f"but not JSON ({e.msg})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{where}: metadata field {schema.metadata_key!r} (--metadata-key) must be an object, "
                         f"got {type(value).__name__}")
    return dict(value)


def _check_tools(value: Any, where: str, schema: RowSchema) -> list[dict[str, Any]] | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: tools field {schema.tool_key!r} ({schema.flag_prefix}tool-key) is a string "
                             f"but not JSON ({e.msg})") from None
    if not isinstance(value, list) or not all(isinstance(tool, dict) for tool in value):
        raise ValueError(f"{where}: tools field {schema.tool_key!r} ({schema.flag_prefix}tool-key) must be a list "
                         f"of tool objects, got {value!r:.80}")
    return value


def dataset_from_args(args: argparse.Namespace, tokenizer: Any = None) -> PromptDataset:
    """The training prompt set described by `--prompt-data` and its companion flags."""
    if not getattr(args, "prompt_data", None):
        raise ValueError("--prompt-data is required (or pass --disable-rollout-global-dataset)")
    max_prompt_len = getattr(args, "rollout_max_prompt_len", None)
    apply_template = bool(getattr(args, "apply_chat_template", False))
    if tokenizer is None and (apply_template or max_prompt_len is not None):
        tokenizer = load_tokenizer(getattr(args, "hf_checkpoint", None))
    return load_prompt_dataset(
        args.prompt_data,
        tokenizer=tokenizer,
        input_key=getattr(args, "input_key", "input"),
        label_key=getattr(args, "label_key", None),
        metadata_key=getattr(args, "metadata_key", "metadata"),
        tool_key=getattr(args, "tool_key", "tools"),
        apply_chat_template=apply_template,
        apply_chat_template_kwargs=getattr(args, "apply_chat_template_kwargs", None),
        max_prompt_len=max_prompt_len,
        seed=getattr(args, "rollout_seed", 42),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Load a prompt dataset and print a summary plus the first prompts.")
    parser.add_argument("--prompt-data", required=True)
    parser.add_argument("--input-key", default="input")
    parser.add_argument("--label-key", default=None)
    parser.add_argument("--metadata-key", default="metadata")
    parser.add_argument("--tool-key", default="tools")
    parser.add_argument("--hf-checkpoint", default=None)
    parser.add_argument("--apply-chat-template", action="store_true")
    parser.add_argument("--apply-chat-template-kwargs", type=json.loads, default=None)
    parser.add_argument("--rollout-max-prompt-len", type=int, default=None)
    parser.add_argument("--rollout-seed", type=int, default=42)
    parser.add_argument("--show", type=int, default=3, help="how many samples to print")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        dataset = dataset_from_args(args)
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")
    print(f"{args.prompt_data}: {len(dataset)} prompts "
          f"({dataset.num_dropped_empty} empty and {dataset.num_dropped_long} too long dropped)")
    for sample in dataset.samples[: args.show]:
        print(json.dumps({"prompt": sample.prompt, "label": sample.label, "metadata": sample.metadata},
                         ensure_ascii=False, default=str))


if __name__ == "__main__":
    main()
