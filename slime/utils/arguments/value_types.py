"""Value parsers for argparse `type=`: `parser.add_argument("--train-env-vars", type=json_object)`.

Each parser raises `argparse.ArgumentTypeError`, so argparse reports
"argument --flag: <message>" and exits with code 2.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

RM_TYPES = ("math", "dapo", "deepscaler", "f1", "gpqa", "remote_rm", "random")
BOXED_PREFIX = "boxed_"


def json_object(text: str | dict) -> dict[str, Any]:
    """A JSON object given on the command line (or a mapping given in a YAML config)."""
    if isinstance(text, dict):
        return dict(text)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r} ({exc.msg})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"KEY\": \"VALUE\"}}', got {text!r}")
    return value


def rm_type(text: str) -> str:
    """A reward-model name from RM_TYPES, optionally prefixed with `boxed_`."""
    base = text[len(BOXED_PREFIX):] if text.startswith(BOXED_PREFIX) else text
    if base not in RM_TYPES:
        names = ", ".join(RM_TYPES)
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {names} (optionally prefixed with '{BOXED_PREFIX}')")
    return text


def byte_size(text: str) -> int:
    """A positive whole number of bytes; accepts scientific notation like 5e8."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of bytes, got {text!r}") from None
    if value != int(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive whole number of bytes, got {text!r}")
    return int(value)
