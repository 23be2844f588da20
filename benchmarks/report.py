"""How every benchmark hands back its result: one JSON object on stdout, and the same text in `--out` if given.

    from benchmarks.report import emit_json
    emit_json(result, args.out)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def emit_json(result: dict[str, Any], out: str | None, *, echo: bool = True, indent: int = 2) -> dict[str, Any]:
    text = json.dumps(result, indent=indent)
    if echo:
        print(text, flush=True)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
    return result
