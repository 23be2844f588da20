"""Synthetic arithmetic task for the quickstart: RL prompts with exact answers plus SFT conversations.

    python -m slime.data.synthetic --output data/arith --n-train 2000 --n-test 200 --max-operand 20 --ops +-

Writes three files under the output folder:
- `train.jsonl`, `test.jsonl`: `{"messages": [{"role": "user", "content": "12+7="}], "label": "19"}`
  (RL: `--input-key messages --label-key label --apply-chat-template`); train and test prompts are disjoint.
- `sft.jsonl`: `{"messages": [user, {"role": "assistant", "content": "19"}]}` over the train prompts
  (`--sft-from all`: the test prompts too).
With `--answer-style short` (default) the SFT answer is the bare integer. `--answer-style worked` writes
the steps first (`3+4=` -> `3 + 4: 4, 5, 6, 7. Answer: 7`; counting down for `-`, repeated addition for
`*`), so responses run to tens or hundreds of tokens, as in real reasoning RL.
`exact_answer_reward` (usable as `--custom-rm-path slime.data.synthetic.exact_answer_reward`) gives 1.0
when the stripped response, or the text after its last `Answer:`, equals the label.
Prompts stay short because the quickstart model is a ~1M-parameter byte-level model.
"""

from __future__ import annotations

import argparse
import json
import operator
import os
import random
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

OPERATORS: dict[str, Callable[[int, int], int]] = {"+": operator.add, "-": operator.sub, "*": operator.mul}
DEFAULT_PROMPT_FORMAT = "{a}{op}{b}="
_END_MARKERS = ("<|im_end|>", "<|endoftext|>")
ANSWER_MARKER = "Answer:"
ANSWER_STYLES = ("short", "worked")


def arithmetic_problems(max_operand: int, ops: Iterable[str], *, allow_negative: bool = False) -> list[tuple[int, str, int]]:
    """Every distinct `(a, op, b)` with operands in [0, max_operand]; `a - b < 0` only if allowed."""
    if max_operand < 0:
        raise ValueError(f"--max-operand must be >= 0, got {max_operand}")
    ops = list(dict.fromkeys(ops))
    unknown = [op for op in ops if op not in OPERATORS]
    if unknown or not ops:
        raise ValueError(f"--ops: unsupported operator(s) {unknown or ops}; choose from {''.join(OPERATORS)}")
    problems = []
    for op in ops:
        for a in range(max_operand + 1):
            for b in range(max_operand + 1):
                if op == "-" and not allow_negative and a < b:
                    continue
                problems.append((a, op, b))
    return problems


def solve(a: int, op: str, b: int) -> int:
    return OPERATORS[op](a, b)


def worked_answer(a: int, op: str, b: int) -> str:
    """The steps to the answer, one number per step: count up by one (+), down by one (-), add a again (*)."""
    if op == "+":
        steps = [a + i for i in range(1, b + 1)]
    elif op == "-":
        steps = [a - i for i in range(1, b + 1)]
    else:
        steps = [a * i for i in range(1, b + 1)]
    shown = ", ".join(str(x) for x in steps) if steps else str(solve(a, op, b))
    return f"{a} {op} {b}: {shown}. {ANSWER_MARKER} {solve(a, op, b)}"


def make_arithmetic_dataset(
    out_dir: str | os.PathLike,
    *,
    n_train: int,
    n_test: int,
    seed: int = 0,
    max_operand: int = 20,
    ops: Iterable[str] = ("+", "-"),
    allow_negative: bool = False,
    prompt_format: str = DEFAULT_PROMPT_FORMAT,
    n_sft: int | None = None,
    answer_style: str = "short",
    sft_from: str = "train",
) -> dict[str, Path]:
    """Write train/test/sft jsonl files; returns their paths keyed "train", "test", "sft".

    Problems are drawn without replacement, so train and test prompts never overlap. `n_sft`
    (default: one per problem) SFT conversations reuse the train problems (`sft_from="train"`) or the
    train and test problems (`"all"`: SFT then knows every sum, and the test set measures how far a
    new prompt phrasing learned in RL carries over to problems RL never saw), cycling when larger.
    """
    if sft_from not in ("train", "all"):
        raise ValueError(f"--sft-from {sft_from!r}: choose train or all")
    if n_train <= 0 or n_test < 0:
        raise ValueError(f"--n-train must be > 0 and --n-test >= 0, got {n_train} and {n_test}")
    if answer_style not in ANSWER_STYLES:
        raise ValueError(f"--answer-style {answer_style!r}: choose one of {', '.join(ANSWER_STYLES)}")
    for field in ("{a}", "{op}", "{b}"):
        if field not in prompt_format:
            raise ValueError(f"--prompt-format {prompt_format!r} must contain {field}")
    problems = arithmetic_problems(max_operand, ops, allow_negative=allow_negative)
    if n_train + n_test > len(problems):
        raise ValueError(f"--n-train + --n-test = {n_train + n_test} exceeds the {len(problems)} distinct problems "
                         f"with --max-operand {max_operand} and --ops {''.join(dict.fromkeys(ops))}; raise --max-operand")
    rng = random.Random(seed)
    chosen = rng.sample(problems, n_train + n_test)
    train, test = chosen[:n_train], chosen[n_train:]
    pool = train if sft_from == "train" else train + test
    n_sft = len(pool) if n_sft is None else n_sft
    if n_sft < 0:
        raise ValueError(f"--n-sft must be >= 0, got {n_sft}")
    sft = [pool[i % len(pool)] for i in range(n_sft)]

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"train": out / "train.jsonl", "test": out / "test.jsonl", "sft": out / "sft.jsonl"}
    _write_jsonl(paths["train"], (_rl_row(p, prompt_format) for p in train))
    _write_jsonl(paths["test"], (_rl_row(p, prompt_format) for p in test))
    _write_jsonl(paths["sft"], (_sft_row(p, prompt_format, answer_style) for p in sft))
    return paths


def _rl_row(problem: tuple[int, str, int], prompt_format: str) -> dict[str, Any]:
    a, op, b = problem
    return {"messages": [{"role": "user", "content": prompt_format.format(a=a, op=op, b=b)}],
            "label": str(solve(a, op, b))}


def _sft_row(problem: tuple[int, str, int], prompt_format: str, answer_style: str = "short") -> dict[str, Any]:
    row = _rl_row(problem, prompt_format)
    answer = worked_answer(*problem) if answer_style == "worked" else row["label"]
    return {"messages": row["messages"] + [{"role": "assistant", "content": answer}]}


def _write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


def is_correct_answer(response: str, label: str) -> bool:
    """The exact check the task is scored by: the response (or its text after the last `Answer:`), stripped of
    whitespace and end markers, equals the label."""
    text = response.strip()
    for marker in _END_MARKERS:
        if text.endswith(marker):
            text = text[: -len(marker)].rstrip()
    if ANSWER_MARKER in text:
        text = text.rsplit(ANSWER_MARKER, 1)[1].strip()
    return text == str(label).strip()


async def exact_answer_reward(args: Any, sample: Any, **kwargs: Any) -> float:
    """Reward plugin (`--custom-rm-path slime.data.synthetic.exact_answer_reward`): 1.0 if exactly right, else 0.0."""
    return 1.0 if is_correct_answer(sample.response, sample.label) else 0.0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the synthetic arithmetic task (train/test/sft jsonl).")
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-test", type=int, default=200)
    parser.add_argument("--n-sft", type=int, default=None, help="SFT conversations (default: one per --sft-from problem)")
    parser.add_argument("--sft-from", choices=["train", "all"], default="train",
                        help="problems the SFT conversations cover: train only, or train and test")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-operand", type=int, default=20)
    parser.add_argument("--ops", default="+-", help="operators to use, e.g. '+-*'")
    parser.add_argument("--allow-negative", action="store_true", help="allow a-b with a<b (negative answers)")
    parser.add_argument("--prompt-format", default=DEFAULT_PROMPT_FORMAT)
    parser.add_argument("--answer-style", default="short", choices=ANSWER_STYLES,
                        help="SFT answers: the bare integer, or the worked steps then 'Answer: N'")
    args = parser.parse_args(argv)
    try:
        paths = make_arithmetic_dataset(
            args.output, n_train=args.n_train, n_test=args.n_test, seed=args.seed, max_operand=args.max_operand,
            ops=tuple(args.ops), allow_negative=args.allow_negative, prompt_format=args.prompt_format,
            n_sft=args.n_sft, answer_style=args.answer_style, sft_from=args.sft_from)
    except ValueError as e:
        parser.error(str(e))
    for name, path in paths.items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
