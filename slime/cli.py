"""The `slime` console script.

    slime quickstart --output outputs/quickstart     # tiny model + arithmetic task: SFT then GRPO on CPU
    slime engine --model-path DIR --port 30000        # the built-in engine's HTTP server
    slime train [train.py flags]                      # same as `python train.py ...`
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "quickstart": ("slime.quickstart", "main", "tiny model + synthetic arithmetic: SFT warm-up then GRPO, on CPU"),
    "engine": ("slime.engine.server", "main", "serve a checkpoint with the built-in engine (SGLang HTTP API)"),
    "train": ("slime.train_loop", "main", "synchronous RL training (python train.py)"),
    "train-async": ("slime.train_loop", "main_async", "one-step off-policy RL training (python train_async.py)"),
}


def _usage() -> str:
    lines = ["usage: slime COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<12} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"slime: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        sys.exit(2)
    module_name, attr, _ = COMMANDS[name]
    getattr(importlib.import_module(module_name), attr)(rest)


if __name__ == "__main__":
    main()
