"""`--custom-config-path FILE.yaml`: `apply_yaml_defaults(parser, path)` turns the file's keys into parser defaults.

Keys are flag names in dash or underscore form (`rollout-batch-size`, `rollout_batch_size`,
`disable-rewards-normalization`). Values go through the flag's own type and choices. Because they
become defaults, flags given on the command line win over the file. Keys `sglang-<name>` that are
not engine flags of the table become engine extras, and `moe-*` keys are ignored like their
command-line form. Any other unknown key is an error naming the file and the key.
"""

from __future__ import annotations

import argparse
from typing import Any

import yaml

from slime.utils.arguments.megatron import NO_OP_PREFIXES
from slime.utils.arguments.sglang import PREFIX as SGLANG_PREFIX
from slime.utils.arguments.value_types import json_object


def load_yaml_mapping(path: str, flag: str = "--custom-config-path",
                      expected: str = "a mapping of flag names to values") -> dict[str, Any]:
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ValueError(f"{flag} {path}: file not found") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{flag} {path}: not valid YAML ({exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{flag} {path}: expected {expected}, got {type(data).__name__}")
    return data


def _convert(action: argparse.Action, value: Any, where: str) -> Any:
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true or false, got {value!r}")
        return value if isinstance(action, argparse._StoreTrueAction) else not value
    if isinstance(action, argparse.BooleanOptionalAction):
        if value is not None and not isinstance(value, bool):
            raise ValueError(f"{where}: expected true, false or null, got {value!r}")
        return value
    if value is None:
        return None
    many = action.nargs in ("+", "*") or isinstance(action, argparse._AppendAction)
    if many:
        items = value if isinstance(value, list) else [value]
        return [_convert_one(action, item, where) for item in items]
    if isinstance(value, list) or (isinstance(value, dict) and action.type is not json_object):
        raise ValueError(f"{where}: expected a single value, got {value!r}")
    return _convert_one(action, value, where)


def _convert_one(action: argparse.Action, value: Any, where: str) -> Any:
    if action.type is not None:
        text = value if isinstance(value, (str, dict)) else str(value)
        try:
            value = action.type(text)
        except (argparse.ArgumentTypeError, ValueError, TypeError) as exc:
            raise ValueError(f"{where}: invalid value {value!r} ({exc})") from None
    if action.choices is not None and value not in action.choices:
        choices = ", ".join(map(str, action.choices))
        raise ValueError(f"{where}: {value!r} is not one of {choices}")
    return value


def apply_yaml_defaults(
    parser: argparse.ArgumentParser, path: str
) -> tuple[set[str], dict[str, Any], dict[str, Any]]:
    """Set parser defaults from the YAML file.

    Returns (dests it set, engine extras from `sglang-*` keys, ignored Megatron `moe-*` keys)."""
    by_option = parser._option_string_actions
    by_dest = {action.dest: action for action in parser._actions if action.option_strings}
    defaults: dict[str, Any] = {}
    extras: dict[str, Any] = {}
    ignored: dict[str, Any] = {}
    for raw_key, value in load_yaml_mapping(path).items():
        key = str(raw_key).lstrip("-")
        option = "--" + key.replace("_", "-")
        by_flag_name = option in by_option
        action = by_option[option] if by_flag_name else by_dest.get(key.replace("-", "_"))
        where = f"--custom-config-path {path}: key {raw_key!r}"
        if action is None or action.dest == "help":
            if option.startswith(SGLANG_PREFIX):
                extras[option[len(SGLANG_PREFIX):]] = value
                continue
            if option.startswith(NO_OP_PREFIXES):
                ignored[option[2:]] = value
                continue
            raise ValueError(f"--custom-config-path {path}: unknown key {raw_key!r} (no flag {option})")
        if action.dest == "custom_config_path":
            raise ValueError(f"{where}: a config file cannot name another config file")
        if isinstance(action, argparse.BooleanOptionalAction) and option.startswith("--no-"):
            converted = _convert(action, value, where)
            defaults[action.dest] = None if converted is None else not converted
        elif not by_flag_name and isinstance(action, argparse._StoreFalseAction):
            # keyed by dest (`rewards_normalization: false`): the value is the dest's own, not the flag's
            defaults[action.dest] = not _convert(action, value, where)
        else:
            defaults[action.dest] = _convert(action, value, where)
    parser.set_defaults(**defaults)
    return set(defaults), extras, ignored
