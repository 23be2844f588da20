"""--rm-type gpqa: multiple choice — the chosen letter (last "Answer: X" or `\\boxed{X}`) must equal the label letter.

    python -c "from slime.rollout.rm_hub.gpqa import compute_gpqa_reward; print(compute_gpqa_reward('Answer: (B)', 'B'))"
"""

from __future__ import annotations

import re

from .math_utils import extract_boxed_answer

_ANSWER = re.compile(r"(?i)answer\s*(?:is|:)?\s*\(?([A-J])\)?\b")


def extract_choice(response: str) -> str | None:
    boxed = extract_boxed_answer(response)
    if boxed is not None:
        letter = re.fullmatch(r"\(?\s*(?:\\text\{)?([A-Ja-j])\}?\s*\)?", boxed.strip())
        if letter:
            return letter.group(1).upper()
    matches = _ANSWER.findall(response)
    return matches[-1].upper() if matches else None


def compute_gpqa_reward(response: str, label: str, metadata: dict | None = None) -> int:
    truth = str(label).strip().strip("()").upper()
    choices = (metadata or {}).get("choices")
    if isinstance(choices, list) and str(label) in choices:  # label given as the option text
        truth = "ABCDEFGHIJ"[choices.index(str(label))]
    return 1 if extract_choice(response or "") == truth else 0
