"""--rm-type deepscaler: the final `\\boxed{}` after the reasoning (after `</think>` or `###Response`) must match the label.

    python -c "from slime.rollout.rm_hub.deepscaler import compute_deepscaler_reward as f; print(f('<think>..</think> \\\\boxed{2}', '2'))"

A response with no closing `</think>` / `###Response` marker gets 0, as in the original rule.
"""

from __future__ import annotations

from .math_utils import extract_boxed_answer, grade_answer


def compute_deepscaler_reward(response: str, label: str | int | float) -> int:
    if "</think>" in response:
        solution = response.split("</think>")[-1]
    elif "###Response" in response:
        solution = response.split("###Response", 1)[1]
    else:
        return 0
    answer = extract_boxed_answer(solution)
    if answer is None or label is None or str(label).strip() == "":
        return 0
    truth = str(label)
    if "\\boxed" in truth or "\\fbox" in truth:
        truth = extract_boxed_answer(truth)
        if truth is None:
            return 0
    return 1 if grade_answer(f"\\boxed{{{answer}}}", truth) else 0
