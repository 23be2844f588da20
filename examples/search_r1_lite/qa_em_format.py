"""Search-R1 reward: exact match of the final `<answer>` with a gold target, plus a format score.

    PYTHONPATH=examples/search_r1_lite python -c "from qa_em_format import compute_score; print(compute_score('<answer>Paris</answer>', ['Paris']))"

correct + well formed = 1.0; correct + badly formed = 1 - format_score; wrong + well formed =
format_score; no answer or wrong + badly formed = 0. "Well formed" = every <search> and <answer>
tag is closed, there is exactly one answer, and it ends the model's text.
"""

from __future__ import annotations

import re
import string

FORMAT_SCORE = 0.2
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_INFORMATION = re.compile(r"<information>.*?</information>", re.DOTALL)


def normalize_answer(text: str) -> str:
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def extract_answer(response: str) -> str | None:
    answers = _ANSWER.findall(_INFORMATION.sub("", response))
    return answers[-1].strip() if answers else None


def is_well_formed(response: str) -> bool:
    text = _INFORMATION.sub("", response)  # retrieved text is not the model's
    for tag in ("search", "answer", "think"):
        if text.count(f"<{tag}>") != text.count(f"</{tag}>"):
            return False
    if text.count("<answer>") != 1:
        return False
    tail = text.rsplit("</answer>", 1)[1]
    return tail.replace("<|im_end|>", "").replace("<|endoftext|>", "").strip() == ""


def exact_match(prediction: str, targets: list[str]) -> bool:
    pred = normalize_answer(prediction)
    return any(pred == normalize_answer(t) for t in targets)


def compute_score(response: str, targets: str | list[str], format_score: float = FORMAT_SCORE) -> float:
    if isinstance(targets, str):
        targets = [targets]
    answer = extract_answer(response)
    if answer is None:
        return 0.0
    correct = exact_match(answer, targets)
    well_formed = is_well_formed(response)
    if correct:
        return 1.0 if well_formed else 1.0 - format_score
    return format_score if well_formed else 0.0
