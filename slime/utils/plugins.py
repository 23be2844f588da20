"""Load user plugins given as `module.attr` paths (the original slime convention).

    python -c "from slime.utils.plugins import load_function; print(load_function('math.sqrt')(4))"
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable


def load_function(path: str, *, flag: str | None = None) -> Callable[..., Any]:
    """Import `module.sub.attr` and return the attribute; errors name the path (and the flag if given)."""
    where = f" (from {flag})" if flag else ""
    if not isinstance(path, str) or "." not in path:
        raise ValueError(f"plugin path {path!r}{where} must look like 'package.module.function'")
    module_name, _, attr = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise ValueError(f"cannot import module {module_name!r} for plugin {path!r}{where}: {e}") from e
    try:
        return getattr(module, attr)
    except AttributeError as e:
        raise ValueError(f"module {module_name!r} has no attribute {attr!r} (plugin {path!r}{where})") from e


async def call_maybe_async(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call a plugin that may be sync or async."""
    result = fn(*args, **kwargs)
    if inspect.isawaitable(result):
        result = await result
    return result
