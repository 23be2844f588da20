"""Synthetic arithmetic task: disjoint splits, right answers, SFT format, loadable as RL prompts.

    python -m pytest -q tests/test_data_synthetic.py
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from slime.data.chat_template import load_tokenizer
from slime.data.dataset import load_prompt_dataset
from slime.data.synthetic import arithmetic_problems, exact_answer_reward, is_correct_answer, make_arithmetic_dataset
from slime.utils.types import Sample

ROOT = Path(__file__).resolve().parents[1]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def independent_answer(prompt: str) -> str:
    match = re.fullmatch(r"(\d+)([+\-*])(\d+)=", prompt)
    assert match, prompt
    a, op, b = int(match[1]), match[2], int(match[3])
    return str({"+": a + b, "-": a - b, "*": a * b}[op])


def test_splits_disjoint_and_answers_right(tmp_path):
    paths = make_arithmetic_dataset(tmp_path, n_train=300, n_test=60, seed=1, max_operand=15, ops=("+", "-", "*"))
    train, test, sft = (read_jsonl(paths[name]) for name in ("train", "test", "sft"))
    assert (len(train), len(test), len(sft)) == (300, 60, 300)
    train_prompts = [r["messages"][0]["content"] for r in train]
    test_prompts = [r["messages"][0]["content"] for r in test]
    assert len(set(train_prompts)) == 300 and len(set(test_prompts)) == 60
    assert not set(train_prompts) & set(test_prompts)
    for row in train + test:
        assert row["messages"][0]["role"] == "user" and len(row["messages"]) == 1
        assert row["label"] == independent_answer(row["messages"][0]["content"])
        assert not row["label"].startswith("-")  # no negative answers by default
    assert {re.fullmatch(r"\d+([+\-*])\d+=", p)[1] for p in train_prompts} == {"+", "-", "*"}
    for row, rl in zip(sft, train):
        user, assistant = row["messages"]
        assert user == rl["messages"][0]
        assert assistant == {"role": "assistant", "content": rl["label"]}
        assert is_correct_answer(assistant["content"], rl["label"])


def test_seeded_and_configurable(tmp_path):
    a = make_arithmetic_dataset(tmp_path / "a", n_train=20, n_test=5, seed=3)
    b = make_arithmetic_dataset(tmp_path / "b", n_train=20, n_test=5, seed=3)
    c = make_arithmetic_dataset(tmp_path / "c", n_train=20, n_test=5, seed=4)
    assert a["train"].read_text() == b["train"].read_text() != c["train"].read_text()

    neg = make_arithmetic_dataset(tmp_path / "neg", n_train=90, n_test=0, seed=0, max_operand=9, ops="-",
                                  allow_negative=True, prompt_format="What is {a} {op} {b}?", n_sft=450)
    rows = read_jsonl(neg["train"])
    assert any(r["label"].startswith("-") for r in rows)
    assert rows[0]["messages"][0]["content"].startswith("What is ")
    assert read_jsonl(neg["test"]) == []
    assert len(read_jsonl(neg["sft"])) == 450

    assert len(arithmetic_problems(3, "+-")) == 16 + 10
    with pytest.raises(ValueError, match=r"--n-train \+ --n-test = 30 exceeds the 26 distinct problems"):
        make_arithmetic_dataset(tmp_path / "x", n_train=25, n_test=5, max_operand=3)
    with pytest.raises(ValueError, match=r"--ops: unsupported operator\(s\) \['/'\]"):
        make_arithmetic_dataset(tmp_path / "x", n_train=5, n_test=5, ops="+/")
    with pytest.raises(ValueError, match="--prompt-format .* must contain \\{b\\}"):
        make_arithmetic_dataset(tmp_path / "x", n_train=5, n_test=5, prompt_format="{a}{op}")


def test_sft_from_all_covers_the_test_problems_too(tmp_path):
    paths = make_arithmetic_dataset(tmp_path, n_train=20, n_test=6, seed=5, max_operand=9, ops="+", sft_from="all")
    questions = {name: [r["messages"][0]["content"] for r in read_jsonl(paths[name])]
                 for name in ("train", "test", "sft")}
    assert sorted(questions["sft"]) == sorted(questions["train"] + questions["test"])  # one conversation per problem
    train_only = make_arithmetic_dataset(tmp_path / "t", n_train=20, n_test=6, seed=5, max_operand=9, ops="+")
    assert not {r["messages"][0]["content"] for r in read_jsonl(train_only["sft"])} & set(questions["test"])
    with pytest.raises(ValueError, match="--sft-from"):
        make_arithmetic_dataset(tmp_path / "bad", n_train=2, n_test=1, sft_from="test")


def test_loads_as_rl_prompts_and_reward_checks_exact_answer(tmp_path, tiny_model_dir):
    paths = make_arithmetic_dataset(tmp_path, n_train=30, n_test=10, seed=0)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    ds = load_prompt_dataset(str(paths["train"]), tokenizer=tokenizer, input_key="messages", label_key="label",
                             apply_chat_template=True, max_prompt_len=64)
    assert len(ds) == 30
    sample = ds.samples[0]
    question = sample.metadata["messages"][0]["content"]
    assert sample.prompt == f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    assert len(tokenizer.encode(sample.prompt, add_special_tokens=False)) < 40

    def reward(response: str) -> float:
        return asyncio.run(exact_answer_reward(None, Sample(response=response, label=sample.label)))

    assert reward(sample.label) == 1.0
    assert reward(f" {sample.label}<|im_end|>") == 1.0
    assert reward(sample.label + "0") == 0.0
    assert reward(f"The answer is {sample.label}") == 0.0
    assert reward("") == 0.0


def test_cli_writes_files_and_rejects_bad_flags(tmp_path):
    out = tmp_path / "arith"
    ok = subprocess.run([sys.executable, "-m", "slime.data.synthetic", "--output", str(out), "--n-train", "40",
                         "--n-test", "8", "--ops", "+"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert len(read_jsonl(out / "train.jsonl")) == 40 and len(read_jsonl(out / "test.jsonl")) == 8
    assert all("+" in r["messages"][0]["content"] for r in read_jsonl(out / "train.jsonl"))
    bad = subprocess.run([sys.executable, "-m", "slime.data.synthetic", "--output", str(out), "--n-train", "5000",
                          "--max-operand", "5"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "raise --max-operand" in bad.stderr


def test_worked_answers_show_every_step_and_score_by_the_final_answer(tmp_path):
    paths = make_arithmetic_dataset(tmp_path, n_train=120, n_test=0, seed=2, max_operand=12, ops="+-*",
                                    answer_style="worked")
    for row, rl in zip(read_jsonl(paths["sft"]), read_jsonl(paths["train"])):
        answer = row["messages"][1]["content"]
        a, op, b = re.fullmatch(r"(\d+)([+\-*])(\d+)=", rl["messages"][0]["content"]).groups()
        a, b = int(a), int(b)
        head, tail = answer.split(": ", 1)
        assert head == f"{a} {op} {b}"
        steps = [int(x) for x in tail.split(". Answer:")[0].split(", ")]
        step = {"+": 1, "-": -1, "*": a}[op]
        if b:  # each step moves by one unit (or by a, for *) and the last one is the result
            assert len(steps) == b and all(y - x == step for x, y in zip(steps, steps[1:]))
        assert steps[-1] == int(rl["label"])
        assert is_correct_answer(answer, rl["label"])
        assert not is_correct_answer(answer.rsplit(" ", 1)[0] + " 999", rl["label"])
    assert is_correct_answer("1, 2. Answer: 7<|im_end|>", "7") and not is_correct_answer("Answer: 7 8", "7")
    with pytest.raises(ValueError, match="--answer-style"):
        make_arithmetic_dataset(tmp_path / "x", n_train=5, n_test=0, answer_style="long")
