"""--rm-type remote_rm: POST {"prompt", "response", "label"} to `--rm-url` and use the JSON answer as the reward.

    python train.py --rm-type remote_rm --rm-url http://127.0.0.1:8000/reward ...

Connection errors and 5xx answers are retried with back-off (`slime.utils.http_utils.post`); a 4xx
answer, or running out of retries, raises — the rollout then marks the sample FAILED with the reason.
"""

from __future__ import annotations

from typing import Any

from slime.utils.http_utils import post
from slime.utils.types import Sample

from ..errors import RolloutConfigError

DEFAULT_MAX_RETRIES = 10


async def remote_rm(args, sample: Sample, max_retries: int | None = None) -> Any:
    url = getattr(args, "rm_url", None)
    if not url:
        raise RolloutConfigError("--rm-type remote_rm needs --rm-url (the reward server's address)")
    payload = {"prompt": sample.prompt, "response": sample.response, "label": sample.label}
    retries = max_retries if max_retries is not None else getattr(args, "rm_max_retries", DEFAULT_MAX_RETRIES)
    return await post(url, payload, max_retries=retries)
