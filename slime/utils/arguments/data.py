"""Data flags: `python train.py --prompt-data train.jsonl --input-key prompt --label-key answer --rollout-batch-size 32 ...`."""

from __future__ import annotations

import argparse

from slime.utils.arguments.value_types import json_object


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--prompt-data", type=str, default=None, help="Prompt file (.jsonl or .parquet).")
    group.add_argument("--input-key", type=str, default="input", help="Record key of the prompt.")
    group.add_argument("--label-key", type=str, default=None, help="Record key of the label.")
    group.add_argument("--metadata-key", type=str, default="metadata", help="Record key of per-sample metadata.")
    group.add_argument("--tool-key", type=str, default="tools", help="Record key of the tools passed to the chat template.")
    group.add_argument("--apply-chat-template", action="store_true", default=False,
                       help="Prompts are chat messages; render them with the tokenizer's chat template.")
    group.add_argument("--apply-chat-template-kwargs", type=json_object, default="{}",
                       help='Extra chat-template arguments as a JSON object, e.g. \'{"enable_thinking": false}\'.')
    group.add_argument("--num-rollout", type=int, default=None,
                       help="Rollout steps to run (default: from --num-epoch and the dataset size).")
    group.add_argument("--num-epoch", type=int, default=None,
                       help="Epochs over the prompt data; sets --num-rollout when that is not given.")
    group.add_argument("--start-rollout-id", type=int, default=None,
                       help="First rollout id (default: from --load, else 0).")
    group.add_argument("--rollout-batch-size", type=int, default=None,
                       help="Prompts per rollout step (required).")
    group.add_argument("--n-samples-per-prompt", type=int, default=1, help="Responses per prompt.")
    group.add_argument("--num-steps-per-rollout", type=int, default=None,
                       help="Optimizer steps per rollout; sets --global-batch-size to "
                            "rollout-batch-size * n-samples-per-prompt / steps.")
    group.add_argument("--disable-rollout-global-dataset", action="store_false", dest="rollout_global_dataset",
                       help="Do not load --prompt-data into the data source (custom rollout functions bring their own).")
    group.add_argument("--data-source-path", type=str, default="slime.data.data_source.RolloutDataSourceWithBuffer",
                       help="module.attr of the data source class.")
    group.add_argument("--loss-mask-type", choices=["qwen", "qwen3", "distill_qwen"], default="qwen",
                       help="How multi-turn loss masks are derived from the chat template.")
