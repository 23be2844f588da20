"""Math answer checking with the `math-verify` library, plus `\\boxed{}` extraction (`--rm-type math`, `boxed_*`).

    python -c "from slime.rollout.rm_hub.math_utils import grade_answer; print(grade_answer('\\\\boxed{1/2}', '0.5'))"
"""

from __future__ import annotations

import threading

from math_verify import parse, verify

_BOX_COMMANDS = ("\\boxed", "\\fbox")


def _timeout_seconds(seconds: int) -> int | None:
    # math-verify times out with signal.alarm, which only works on the main thread.
    return seconds if threading.current_thread() is threading.main_thread() else None


def last_boxed_span(text: str) -> tuple[int, int] | None:
    """(start, end) of the last `\\boxed{...}` / `\\fbox{...}` / `\\boxed x` in text, braces balanced."""
    start = max(text.rfind(cmd) for cmd in _BOX_COMMANDS)
    if start < 0:
        return None
    cmd = next(c for c in _BOX_COMMANDS if text.startswith(c, start))
    pos = start + len(cmd)
    if text.startswith(" ", pos):  # "\boxed 5": argument runs to the next "$" or end
        end = text.find("$", pos)
        return start, (len(text) if end < 0 else end)
    if not text.startswith("{", pos):
        return None
    depth = 0
    for i in range(pos, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return start, i + 1
    return None


def extract_boxed_answer(text: str) -> str | None:
    """The content of the last `\\boxed{}` in text, or None when there is none (or it is unbalanced)."""
    if not isinstance(text, str):
        return None
    span = last_boxed_span(text)
    if span is None:
        return None
    boxed = text[span[0] : span[1]]
    cmd = next(c for c in _BOX_COMMANDS if boxed.startswith(c))
    inner = boxed[len(cmd) :]
    if inner.startswith("{"):
        return inner[1:-1].strip()
    return inner.strip()


def _as_latex_candidate(answer: str) -> str:
    # math-verify finds answers in LaTeX environments or \boxed; a bare "3/4" is parsed by its
    # expression extractor, and a bare "\frac{3}{4}" needs math delimiters.
    if "\\" in answer and "$" not in answer and "\\boxed" not in answer and "\\(" not in answer:
        return f"${answer}$"
    return answer


def parse_answer(text: str) -> list:
    """math-verify's parse of text; [] when nothing can be extracted."""
    timeout = _timeout_seconds(5)
    candidates = [_as_latex_candidate(text), text]
    if "$" not in text:
        candidates.append(f"${text}$")  # bare "(1,2)" or "(x+1)^2" only parse as LaTeX
    for candidate in dict.fromkeys(candidates):
        parsed = parse(candidate, parsing_timeout=timeout)
        if parsed:
            return parsed
    return []


def grade_answer(response: str, label: str | int | float) -> bool:
    """True when the response's final answer equals the label per math-verify (gold = label)."""
    if response is None or label is None:
        return False
    gold = parse_answer(str(label))
    if not gold:
        return False
    boxed = extract_boxed_answer(response)
    predicted = parse_answer(response if boxed is None else f"\\boxed{{{boxed}}}")
    if not predicted:
        return False
    return bool(verify(gold, predicted, timeout_seconds=_timeout_seconds(5)))


def compute_math_reward(response: str, label: str | int | float) -> int:
    """--rm-type math: 1 if correct else 0."""
    return 1 if grade_answer(response, label) else 0
