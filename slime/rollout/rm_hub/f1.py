"""--rm-type f1: token-level F1 between the normalised response and label (SQuAD-style normalisation).

    python -c "from slime.rollout.rm_hub.f1 import f1_score; print(f1_score('The Eiffel Tower', 'eiffel tower'))"
"""

from __future__ import annotations

import re
import string
from collections import Counter

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    text = str(text).lower().translate(_PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def f1_score(prediction: str, ground_truth: str) -> tuple[float, float, float]:
    """(f1, precision, recall); yes/no/noanswer only match themselves exactly."""
    pred, truth = normalize_answer(prediction), normalize_answer(ground_truth)
    special = {"yes", "no", "noanswer"}
    if (pred in special or truth in special) and pred != truth:
        return 0.0, 0.0, 0.0
    pred_tokens, truth_tokens = pred.split(), truth.split()
    common = Counter(pred_tokens) & Counter(truth_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0, 0.0, 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(truth_tokens)
    return 2 * precision * recall / (precision + recall), precision, recall


def compute_f1_reward(response: str, label: str | list[str]) -> float:
    """Best F1 over the label (or each label in a list)."""
    labels = label if isinstance(label, (list, tuple)) else [label]
    if not labels:
        return 0.0
    return max(f1_score(response, str(truth))[0] for truth in labels)
