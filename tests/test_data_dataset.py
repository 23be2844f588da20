"""Prompt dataset loading: jsonl / parquet, keys, chat template, filters, and bad-input errors.

    python -m pytest -q tests/test_data_dataset.py
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from slime.data.chat_template import load_tokenizer
from slime.data.dataset import load_prompt_dataset

ROOT = Path(__file__).resolve().parents[1]
TOOLS = [{"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}}]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir))


def test_jsonl_all_keys(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"question": "1+1=", "answer": "2", "meta": {"source": "a"}, "fns": TOOLS},
        {"question": "2+2=", "answer": 4, "meta": json.dumps({"source": "b"}), "fns": json.dumps(TOOLS)},
        {"question": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "3+3="}],
         "answer": ["6", "six"]},
    ])
    ds = load_prompt_dataset(str(path), input_key="question", label_key="answer", metadata_key="meta",
                             tool_key="fns")
    assert len(ds) == 3
    first, second, third = ds.samples
    assert (first.prompt, first.label) == ("1+1=", "2")
    assert first.metadata == {"source": "a", "tools": TOOLS}
    assert (second.label, second.metadata) == (4, {"source": "b", "tools": TOOLS})
    assert third.prompt[1] == {"role": "user", "content": "3+3="} and third.label == ["6", "six"]
    assert third.metadata == {}
    assert all(s.index is None and s.group_index is None for s in ds.samples)


def test_parquet_all_keys_and_row_errors(tmp_path):
    table = pa.table({
        "messages": [[{"role": "user", "content": "5-2="}], [{"role": "user", "content": "9-1="}]],
        "label": ["3", "8"],
        "metadata": [{"level": 1}, {"level": 2}],
        "tools": [json.dumps(TOOLS), None],
    })
    path = tmp_path / "d.parquet"
    pq.write_table(table, path)
    ds = load_prompt_dataset(str(path), input_key="messages", label_key="label")
    assert [s.prompt for s in ds.samples] == [[{"role": "user", "content": "5-2="}], [{"role": "user", "content": "9-1="}]]
    assert [s.label for s in ds.samples] == ["3", "8"]
    assert ds.samples[0].metadata == {"level": 1, "tools": TOOLS}
    assert ds.samples[1].metadata == {"level": 2}

    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"input": ["a", "b", "c"], "label": [b"1", b"2", b"3"]}), bad)
    with pytest.raises(ValueError, match=r"bad\.parquet:row 0: label field 'label' \(--label-key\) has type bytes"):
        load_prompt_dataset(str(bad), label_key="label")


def test_chat_template_applied_with_kwargs_and_tools(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"messages": [{"role": "user", "content": "12+7="}], "label": "19"},
        {"messages": "plain text prompt", "label": "x", "tools": TOOLS},
    ])
    ds = load_prompt_dataset(str(path), tokenizer=tokenizer, input_key="messages", label_key="label",
                             apply_chat_template=True)
    assert ds.samples[0].prompt == "<|im_start|>user\n12+7=<|im_end|>\n<|im_start|>assistant\n"
    assert ds.samples[0].metadata["messages"] == [{"role": "user", "content": "12+7="}]
    assert ds.samples[1].prompt == "<|im_start|>user\nplain text prompt<|im_end|>\n<|im_start|>assistant\n"

    no_gen = load_prompt_dataset(str(path), tokenizer=tokenizer, input_key="messages", apply_chat_template=True,
                                 apply_chat_template_kwargs={"add_generation_prompt": False})
    assert no_gen.samples[0].prompt == "<|im_start|>user\n12+7=<|im_end|>\n"

    from transformers import AutoTokenizer

    tool_tokenizer = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    tool_tokenizer.chat_template = (
        "{% if tools %}TOOLS={{ tools | map(attribute='function.name') | join(',') }};{% endif %}"
        "{% for m in messages %}{{ m['role'] }}:{{ m['content'] }};{% endfor %}{{ extra | default('') }}")
    with_tools = load_prompt_dataset(str(path), tokenizer=tool_tokenizer, input_key="messages",
                                     apply_chat_template=True, apply_chat_template_kwargs={"extra": "END"})
    assert with_tools.samples[0].prompt == "user:12+7=;END"
    assert with_tools.samples[1].prompt == "TOOLS=search;user:plain text prompt;END"


def test_long_prompts_dropped_with_one_counting_warning(tmp_path, tokenizer, caplog):
    # byte-level tokenizer: one token per ASCII character
    prompts = ["a" * 5, "b" * 10, "c" * 11, "d" * 30, "e" * 3]
    path = write_jsonl(tmp_path / "d.jsonl", [{"input": p} for p in prompts])
    with caplog.at_level(logging.WARNING, logger="slime.data.dataset"):
        ds = load_prompt_dataset(str(path), tokenizer=tokenizer, max_prompt_len=10)
    assert [s.prompt for s in ds.samples] == ["a" * 5, "b" * 10, "e" * 3]
    assert ds.num_dropped_long == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "dropped 2 of 5 prompts longer than --rollout-max-prompt-len=10" in warnings[0]
    assert f"{path}:3" in warnings[0]

    # chat messages are measured after templating (the template adds ~30 tokens)
    path2 = write_jsonl(tmp_path / "m.jsonl", [{"input": [{"role": "user", "content": "hi"}]}, {"input": "hi"}])
    ds2 = load_prompt_dataset(str(path2), tokenizer=tokenizer, max_prompt_len=10)
    assert [s.prompt for s in ds2.samples] == ["hi"]
    with pytest.raises(ValueError, match="need a tokenizer: set --hf-checkpoint"):
        load_prompt_dataset(str(path), max_prompt_len=10)


def test_empty_prompts_dropped_and_counted(tmp_path, caplog):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"input": "ok"}, {"input": "   "}, {"input": []}, {"input": [{"role": "user", "content": ""}]}, {"input": "ok2"},
    ])
    with caplog.at_level(logging.WARNING, logger="slime.data.dataset"):
        ds = load_prompt_dataset(str(path))
    assert [s.prompt for s in ds.samples] == ["ok", "ok2"]
    assert ds.num_dropped_empty == 3
    (message,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "dropped 3 of 5 rows with an empty prompt" in message and f"{path}:2" in message

    all_empty = write_jsonl(tmp_path / "e.jsonl", [{"input": ""}, {"input": " "}])
    with pytest.raises(ValueError, match=r"e\.jsonl: no usable prompts \(2 rows, 2 empty"):
        load_prompt_dataset(str(all_empty))


def test_blank_lines_skipped_and_line_numbers_kept(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"input": "a"}\n\n{"input": "b"}\n{"input": "c", \n')
    with pytest.raises(ValueError, match=r"d\.jsonl:4: invalid JSON"):
        load_prompt_dataset(str(path))


@pytest.mark.parametrize("line, pattern", [
    ('{"input": "a", "label": }', r":2: invalid JSON"),
    ('["input", "a"]', r":2: expected a JSON object per line, got list"),
    ('{"prompt": "a", "label": "1"}', r":2: no field 'input' \(set by --input-key\); fields present: \['label', 'prompt'\]"),
    ('{"input": "a"}', r":2: no field 'label' \(set by --label-key\)"),
    ('{"input": "a", "label": null}', r":2: label field 'label' \(--label-key\) is null"),
    ('{"input": 7, "label": "1"}', r":2: field 'input' \(--input-key\) must be a string or a list of chat messages, got int"),
    ('{"input": [{"content": "x"}], "label": "1"}', r":2: field 'input' \(--input-key\) message 0 must be an object with a string 'role'"),
    ('{"input": [{"role": "user", "content": 5}], "label": "1"}', r":2: .* message 0 has content of type int"),
    ('{"input": "a", "label": "1", "metadata": [1]}', r":2: metadata field 'metadata' \(--metadata-key\) must be an object, got list"),
    ('{"input": "a", "label": "1", "metadata": "{oops"}', r":2: metadata field .* is a string but not JSON"),
    ('{"input": "a", "label": "1", "tools": {"name": "x"}}', r":2: tools field 'tools' \(--tool-key\) must be a list"),
])
def test_bad_rows_name_file_and_line(tmp_path, line, pattern):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"input": "fine", "label": "0"}\n' + line + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl" + pattern):
        load_prompt_dataset(str(path), label_key="label")


def test_bad_files(tmp_path):
    with pytest.raises(ValueError, match=r"--prompt-data: file not found: .*missing\.jsonl"):
        load_prompt_dataset(str(tmp_path / "missing.jsonl"))
    for name in ("d.csv", "d.json"):
        (tmp_path / name).write_text('{"input": "a"}\n')
        with pytest.raises(ValueError, match=name.replace(".", r"\.") + r" is neither \.jsonl nor \.parquet"):
            load_prompt_dataset(str(tmp_path / name))
    binary = tmp_path / "bin.jsonl"
    binary.write_bytes(b'{"input": "a"}\n{"input": "\xff\xfe"}\n')
    with pytest.raises(ValueError, match=r"bin\.jsonl:2: not valid UTF-8"):
        load_prompt_dataset(str(binary))
    fake = tmp_path / "fake.parquet"
    fake.write_text("not parquet")
    with pytest.raises(ValueError, match=r"fake\.parquet: not a readable parquet file"):
        load_prompt_dataset(str(fake))


def test_row_slice_and_template_error_names_row(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"input": str(i)} for i in range(6)])
    assert [s.prompt for s in load_prompt_dataset(f"{path}@[1:4]").samples] == ["1", "2", "3"]
    assert [s.prompt for s in load_prompt_dataset(f"{path}@[-2:]").samples] == ["4", "5"]

    from transformers import AutoTokenizer

    strict = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    strict.chat_template = "{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tools') }}" \
                           "{% endif %}{{ m['content'] }}{% endfor %}"
    rows = write_jsonl(tmp_path / "t.jsonl", [{"input": "ok"}, {"input": [{"role": "tool", "content": "r"}]}])
    with pytest.raises(ValueError, match=r"t\.jsonl:2: --apply-chat-template failed on this row .*no tools"):
        load_prompt_dataset(str(rows), tokenizer=strict, apply_chat_template=True)


def test_cli_prints_summary(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"q": "1+2=", "a": "3"}, {"q": ""}])
    result = subprocess.run(
        [sys.executable, "-m", "slime.data.dataset", "--prompt-data", str(path), "--input-key", "q", "--show", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].endswith("1 prompts (1 empty and 0 too long dropped)")
    assert json.loads(lines[1])["prompt"] == "1+2="
    missing = subprocess.run([sys.executable, "-m", "slime.data.dataset", "--prompt-data", str(tmp_path / "no.jsonl")],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "error: --prompt-data: file not found" in missing.stderr
    assert "Traceback" not in missing.stderr
