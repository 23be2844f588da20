"""The slime command line: `python -m slime.utils.arguments --help`; in code `args = parse_args(argv)`.

parse → (YAML defaults from --custom-config-path) → engine extras → validate + derived defaults →
Megatron-architecture check. Errors exit with code 2 and a message naming the flag.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from typing import Callable

from slime.utils.arguments import (
    algorithm,
    checkpoint,
    cluster,
    data,
    debug,
    eval,
    log,
    megatron,
    misc,
    reward,
    rollout,
    sglang,
    training,
    weight_sync,
)
from slime.utils.arguments.hf_config_check import check_architecture
from slime.utils.arguments.sglang import engine_server_argv, split_extra_args
from slime.utils.arguments.validate import (
    NOT_SUPPORTED_UNDER_FSDP,
    NOT_SUPPORTED_VALUES,
    NOT_SUPPORTED_YET,
    validate_and_derive,
)
from slime.utils.arguments.yaml_config import apply_yaml_defaults

__all__ = [
    "build_parser",
    "parse_args",
    "engine_server_argv",
    "NOT_SUPPORTED_YET",
    "NOT_SUPPORTED_UNDER_FSDP",
    "NOT_SUPPORTED_VALUES",
]

GROUPS = [cluster, weight_sync, training, megatron, rollout, sglang, data, eval, algorithm, checkpoint, log, debug,
          reward, misc]

AddArguments = Callable[[argparse.ArgumentParser], object]


class HelpFormatter(argparse.HelpFormatter):
    """Wraps help text without splitting flag names at their hyphens; shows defaults that say something."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_ = action.help or ""
        quiet_default = action.default is None or action.default is False or action.default == []
        if quiet_default or action.default is argparse.SUPPRESS or "default" in help_.lower():
            return help_
        return help_ + " (default: %(default)s)"

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return textwrap.fill(" ".join(text.split()), width, initial_indent=indent, subsequent_indent=indent,
                             break_on_hyphens=False)


def build_parser(add_custom_arguments: AddArguments | None = None) -> argparse.ArgumentParser:
    """Every flag of the reference; `add_custom_arguments(parser)` may add a project's own flags."""
    parser = argparse.ArgumentParser(
        prog="train.py",
        usage="%(prog)s [flags]   (--help lists every flag)",
        description="slime: RL post-training. Engine flags pass through as --sglang-<flag> [value].",
        allow_abbrev=False,
        formatter_class=HelpFormatter,
    )
    for group in GROUPS:
        group.add_arguments(parser)
    if add_custom_arguments is not None:
        add_custom_arguments(parser)
    return parser


def _given_dests(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    actions = parser._option_string_actions
    return {actions[token.split("=", 1)[0]].dest for token in argv if token.split("=", 1)[0] in actions}


def parse_args(argv: list[str] | None = None, add_custom_arguments: AddArguments | None = None) -> argparse.Namespace:
    """Parse, validate and fill derived defaults; exits with code 2 and a message naming the flag on error.

    `parse_args(add_custom_arguments)` (the original slime call, a function as the only argument) works too."""
    if callable(argv) and add_custom_arguments is None:
        argv, add_custom_arguments = None, argv
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(add_custom_arguments)
    known = set(parser._option_string_actions)
    engine_extras, argv = split_extra_args(argv, known)
    ignored_megatron: dict[str, object] = {}
    for prefix in megatron.NO_OP_PREFIXES:
        found, argv = split_extra_args(argv, known, prefix=prefix)
        ignored_megatron.update({prefix[2:] + name: value for name, value in found.items()})
    given = _given_dests(parser, argv)

    config_path = _pre_parse_config_path(argv)
    if config_path is not None:
        try:
            yaml_dests, yaml_engine_extras, yaml_ignored = apply_yaml_defaults(parser, config_path)
        except ValueError as exc:
            parser.error(str(exc))
        given |= yaml_dests
        engine_extras = {**yaml_engine_extras, **engine_extras}
        ignored_megatron = {**yaml_ignored, **ignored_megatron}

    args, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.error(
            f"unrecognized arguments: {' '.join(unknown)} (engine flags take the --sglang- prefix; "
            "see --help for the rest)"
        )
    args.sglang_extra_args = engine_extras
    args.megatron_ignored_args = ignored_megatron
    try:
        validate_and_derive(args)
        check_architecture(args, given)
    except ValueError as exc:
        parser.error(str(exc))
    return args


def _pre_parse_config_path(argv: list[str]) -> str | None:
    pre = argparse.ArgumentParser(prog="train.py", usage="%(prog)s [flags]", add_help=False, allow_abbrev=False)
    pre.add_argument("--custom-config-path", type=str, default=None)
    known, _ = pre.parse_known_args(argv)
    return known.custom_config_path
