"""`--rm-type math` against math-verify on a table of answer pairs (fractions, LaTeX, units, boxed).

    python -m pytest -q tests/test_rm_math.py
"""

from __future__ import annotations

import pytest
from math_verify import parse, verify

from slime.rollout.rm_hub.math_utils import compute_math_reward, extract_boxed_answer

# (model response, label, correct?)
MATH_PAIRS = [
    # fractions and decimals
    (r"The answer is \boxed{\frac{1}{2}}.", "0.5", True),
    (r"\boxed{1/2}", r"\frac{1}{2}", True),
    (r"\boxed{\dfrac{3}{4}}", "0.75", True),
    (r"\boxed{\frac12}", "1/2", True),
    (r"so we get $\frac{6}{8}$", "3/4", True),
    (r"\boxed{0.333}", r"\frac{1}{3}", False),
    (r"\boxed{\frac{2}{3}}", r"\frac{3}{2}", False),
    (r"\boxed{-\frac{5}{2}}", "-2.5", True),
    (r"\boxed{3.0}", "3", True),
    # plain integers / numbers with separators
    ("42", "42", True),
    ("I think it is 7", "8", False),
    (r"\boxed{1,000}", "1000", True),
    (r"\boxed{12}", "12.0", True),
    (r"\boxed{-4}", "4", False),
    # LaTeX expressions
    (r"\boxed{\sqrt{2}/2}", r"\frac{\sqrt{2}}{2}", True),
    (r"\boxed{2\sqrt{3}}", r"\sqrt{12}", True),
    (r"\boxed{x^2+2x+1}", "(x+1)^2", True),
    (r"\boxed{x^2+1}", "(x+1)^2", False),
    (r"\boxed{\pi}", "3.14", False),
    (r"\boxed{2\pi}", r"2\pi", True),
    (r"\boxed{\{1,2\}}", r"\{2,1\}", True),
    (r"\boxed{(1,2)}", "(1,2)", True),
    (r"\boxed{x=3}", "3", True),
    (r"\boxed{e^{2}}", "e^2", True),
    # units and percentages
    ("x = 5 cm", "5", True),
    (r"\boxed{5\text{ cm}}", "5", True),
    (r"\boxed{100^\circ}", "100", True),
    (r"\boxed{10\%}", "10", True),
    (r"\boxed{7\text{ meters}}", "8", False),
    # several boxes: the last one counts; malformed boxes give nothing
    (r"first \boxed{2}, then \boxed{3}", "3", True),
    (r"first \boxed{3}, then \boxed{2}", "3", False),
    (r"\boxed{12", "12", False),
    (r"\boxed{}", "0", False),
    ("no answer at all", "5", False),
]


def _math_verify_direct(response: str, label: str) -> bool:
    """What math-verify alone says: gold wrapped in $...$ (as LaTeX) against the response's last box or text."""
    boxed = extract_boxed_answer(response)
    predicted = parse(response if boxed is None else f"\\boxed{{{boxed}}}")
    return bool(predicted) and verify(parse(f"${label}$"), predicted)


def test_table_is_large_enough():
    assert len(MATH_PAIRS) >= 30
    assert sum(ok for *_, ok in MATH_PAIRS) >= 10 and sum(not ok for *_, ok in MATH_PAIRS) >= 10


@pytest.mark.parametrize("response,label,correct", MATH_PAIRS)
def test_math_reward_matches_table_and_math_verify(response, label, correct):
    assert compute_math_reward(response, label) == (1 if correct else 0)
    if extract_boxed_answer(response) is not None or correct:
        assert _math_verify_direct(response, label) == correct


@pytest.mark.parametrize("text,expected", [
    (r"\boxed{a{b}c}", "a{b}c"),
    (r"\fbox{7}", "7"),
    (r"$\boxed 5$", "5"),
    (r"\boxed{1} and \boxed{\frac{2}{3}}", r"\frac{2}{3}"),
    ("nothing", None),
    (r"\boxed{open", None),
])
def test_extract_boxed_answer(text, expected):
    assert extract_boxed_answer(text) == expected


def test_numeric_labels_are_accepted():
    assert compute_math_reward(r"\boxed{4}", 4) == 1
    assert compute_math_reward(r"\boxed{0.25}", 0.25) == 1
    assert compute_math_reward(r"\boxed{4}", None) == 0
