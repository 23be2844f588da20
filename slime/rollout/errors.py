"""Errors that stop a rollout (bad flags or plugin paths), as opposed to per-sample failures.

    raise RolloutConfigError("--rm-type nope is unknown ...")

Anything else raised while generating or scoring one sample marks that sample FAILED with the reason;
a RolloutConfigError (a ValueError) propagates, since every sample would fail the same way.
"""

from __future__ import annotations

from typing import Any, Callable

from slime.utils.plugins import load_function


class RolloutConfigError(ValueError):
    pass


def load_plugin(path: str, flag: str) -> Callable[..., Any]:
    try:
        return load_function(path, flag=flag)
    except ValueError as e:
        raise RolloutConfigError(str(e)) from e
