"""--rm-type dapo: the DAPO / Minerva rule — the text after the last "Answer:" must equal the label after normalisation.

    python -c "from slime.rollout.rm_hub.dapo import compute_dapo_score; print(compute_dapo_score('... Answer: 42', '42'))"

Returns {"score": 1.0 | -1.0, "acc": bool, "pred": str}; train on it with `--reward-key score`.
"""

from __future__ import annotations

import re

from .math_utils import extract_boxed_answer

_ANSWER_PATTERN = re.compile(r"(?i)answer\s*:\s*([^\n]+)")
_TAIL_CHARS = 300  # final answers are short; looking only at the tail keeps long responses cheap

_UNIT_WORDS = (
    "square", "ways", "integers", "dollars", "mph", "inches", "hours", "km", "units", "points", "feet",
    "minutes", "digits", "cents", "degrees", "cm", "gm", "pounds", "meters", "meals", "edges", "students",
    "childrentickets", "multiples", "sq", "ft", "inch", "hour", "minute", "degree", "meter", "mile", "miles",
)
_TEXT_REPLACEMENTS = (
    ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\left", ""), ("\\right", ""), ("\\!", ""),
    ("\\,", ""), ("\\;", ""), ("\\$", ""), ("^\\circ", ""), ("^{\\circ}", ""), ("\\%", ""), ("%", ""),
    ("$", ""), (" ", ""),
)


def normalize_final_answer(answer: str) -> str:
    """Canonical text of a final answer: no units, text wrappers, dollars, spaces or thousands separators."""
    answer = answer.strip()
    boxed = extract_boxed_answer(answer)
    if boxed is not None:
        answer = boxed
    answer = answer.split("=")[-1]
    answer = re.sub(r"\\text\{\s*([^}]*)\}", r"\1", answer)
    answer = re.sub(r"\\textbf\{\s*([^}]*)\}", r"\1", answer)
    answer = re.sub(r"\\mbox\{\s*([^}]*)\}", r"\1", answer)
    for unit in _UNIT_WORDS:
        answer = re.sub(rf"(?<=[\d\s}}]){unit}(e?s)?\b", "", answer)
    for old, new in _TEXT_REPLACEMENTS:
        answer = answer.replace(old, new)
    answer = answer.rstrip(".")
    answer = re.sub(r"(\d),(?=\d{3}(\D|$))", r"\1", answer)  # 1,000 -> 1000
    answer = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", answer)  # \frac12 -> \frac{1}{2}
    answer = re.sub(r"\\sqrt(\d+)", r"\\sqrt{\1}", answer)
    if re.fullmatch(r"-?\d+\.0+", answer):
        answer = answer.split(".")[0]
    return answer.strip()


def extract_dapo_answer(response: str) -> str | None:
    matches = _ANSWER_PATTERN.findall(response[-_TAIL_CHARS:])
    return matches[-1] if matches else None


def compute_dapo_score(response: str, label: str | int | float) -> dict:
    raw = extract_dapo_answer(response or "")
    pred = normalize_final_answer(raw) if raw is not None else "[INVALID]"
    correct = raw is not None and pred == normalize_final_answer(str(label))
    return {"score": 1.0 if correct else -1.0, "acc": correct, "pred": pred}
