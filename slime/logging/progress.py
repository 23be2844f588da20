"""tqdm progress bars for generation and training; quiet when stdout is not a terminal unless forced.

    from slime.logging.progress import progress_bar
    with progress_bar(total=64, desc="rollout 3") as bar:
        bar.update(1)

Set SLIME_PROGRESS=0 to hide every bar, SLIME_PROGRESS=1 to show them even without a terminal.
"""

from __future__ import annotations

import os
import sys

from tqdm import tqdm


def progress_enabled() -> bool:
    setting = os.environ.get("SLIME_PROGRESS")
    if setting is not None:
        return setting not in ("0", "false", "False", "")
    return sys.stderr.isatty()


def progress_bar(total: int | None, desc: str, unit: str = "it", leave: bool = False) -> tqdm:
    return tqdm(total=total, desc=desc, unit=unit, leave=leave, disable=not progress_enabled(), dynamic_ncols=True)
