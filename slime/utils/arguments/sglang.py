"""Engine flags (`--sglang-<flag>`): `python train.py --sglang-mem-fraction-static 0.7 --sglang-enable-foo ...`.

Flags in ENGINE_FLAGS are real attributes (`args.sglang_mem_fraction_static`); any other
`--sglang-<name> [value ...]` lands in `args.sglang_extra_args[name]` (str, a list of str when
several values follow, or True when none does). `engine_server_argv(args)` turns both back into
`--<name> value` flags for `python -m slime.engine.server` or `sglang.launch_server`.
"""

from __future__ import annotations

import argparse
from typing import Any

PREFIX = "--sglang-"

# name (without --sglang-) -> (type or "flag", help). Defaults are None (engine decides) or False.
ENGINE_FLAGS: dict[str, tuple[Any, str]] = {
    "mem-fraction-static": (float, "Fraction of accelerator memory for weights + KV cache."),
    "context-length": (int, "Longest sequence the engine accepts (default: the model's)."),
    "dtype": (str, ("Weight/activation dtype: auto (CPU: float32; GPU: the checkpoint's, bfloat16 for a float32 "
                    "one), float32, float16, bfloat16.")),
    "max-running-requests": (int, "Most requests decoded at once."),
    "max-total-tokens": (int, "KV-cache size in tokens."),
    "max-prefill-tokens": (int, "Most tokens in one prefill batch."),
    "chunked-prefill-size": (int, "Split prefills longer than this many tokens."),
    "page-size": (int, "Tokens per KV-cache block."),
    "random-seed": (int, "Engine sampling seed."),
    "disable-cuda-graph": ("flag", "Run decode eagerly (no CUDA graphs)."),
    "enable-overlap-schedule": ("flag", "Built-in engine: enqueue each decode step before the previous one's "
                                        "tokens reach the host (default on CUDA at tp 1; this also turns it on "
                                        "on CPU)."),
    "disable-overlap-schedule": ("flag", "Built-in engine: decode step by step (the host waits for each step)."),
    "cuda-graph-max-bs": (int, "Largest decode batch captured in a CUDA graph."),
    "enable-memory-saver": ("flag", "Allow releasing/resuming weights and KV cache (colocated training)."),
    "disable-radix-cache": ("flag", "Turn off prefix caching."),
    "skip-tokenizer-init": ("flag", "Serve token ids only."),
    "log-level": (str, "Engine log level."),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "engine (--sglang-*)",
        "Any other --sglang-<flag> [value] is passed to the engine as --<flag> [value]; "
        "the built-in engine rejects flags it does not know when it starts.",
    )
    for name, (kind, help_) in ENGINE_FLAGS.items():
        if kind == "flag":
            group.add_argument(PREFIX + name, action="store_true", default=False, help=help_)
        else:
            group.add_argument(PREFIX + name, type=kind, default=None, help=help_)
    group.add_argument("--sglang-server-concurrency", type=int, default=512,
                       help="Most requests in flight from the rollout to the router.")
    group.add_argument("--sglang-router-ip", type=str, default=None, help="Router host (default: started by slime).")
    group.add_argument("--sglang-router-port", type=int, default=None, help="Router port (default: a free port).")
    group.add_argument("--sglang-router-request-timeout-secs", type=int, default=14400,
                       help="Router timeout for one request, in seconds.")


def split_extra_args(
    argv: list[str], known_options: set[str], prefix: str = PREFIX
) -> tuple[dict[str, str | list[str] | bool], list[str]]:
    """Take every `--sglang-<name> [value ...]` / `--sglang-<name>=value` not in known_options out of argv.

    `prefix` picks another family (megatron.py collects `--moe-*` the same way); names keep no prefix.

    Values are the following tokens up to the next `--flag`. Returns (extras, the rest of argv)."""
    extras: dict[str, str | list[str] | bool] = {}
    rest: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        i += 1
        option = token.split("=", 1)[0]
        if not option.startswith(prefix) or len(option) == len(prefix) or option in known_options:
            rest.append(token)
            continue
        name = option[len(prefix):]
        if "=" in token:
            extras[name] = token.split("=", 1)[1]
            continue
        values: list[str] = []
        while i < len(argv) and not argv[i].startswith("--"):
            values.append(argv[i])
            i += 1
        extras[name] = True if not values else values[0] if len(values) == 1 else values
    return extras, rest


def engine_server_argv(args: argparse.Namespace) -> list[str]:
    """Engine flags that were set (non-None / True) plus the extras, as `--<name> value` argv."""
    argv: list[str] = []
    for name, (kind, _) in ENGINE_FLAGS.items():
        value = getattr(args, "sglang_" + name.replace("-", "_"), None)
        if kind == "flag":
            if value:
                argv.append("--" + name)
        elif value is not None:
            argv += ["--" + name, str(value)]
    for name, value in getattr(args, "sglang_extra_args", {}).items():
        if value is True:
            argv.append("--" + name)
        elif value is False or value is None:
            continue
        elif isinstance(value, (list, tuple)):
            argv += ["--" + name, *map(str, value)]
        else:
            argv += ["--" + name, str(value)]
    return argv
