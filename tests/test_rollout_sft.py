"""SFT rollout + loss masks: assistant turns only, per --loss-mask-type, on the shipped examples/sft data.

    python -m pytest -q tests/test_rollout_sft.py
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from slime.data.data_source import RolloutDataSourceWithBuffer
from slime.rollout.base_types import RolloutFnTrainOutput
from slime.rollout.mask_utils import MultiTurnLossMaskGenerator, get_response_lengths
from slime.rollout.sft_rollout import generate_rollout
from slime.rollout.tokenization import get_tokenizer
from slime.utils.types import Sample

ROOT = Path(__file__).resolve().parents[1]
SFT_DATA = ROOT / "examples" / "sft" / "conversations.jsonl"

CONVERSATION = [
    {"role": "system", "content": "S"},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "yo"},
    {"role": "user", "content": "q"},
    {"role": "assistant", "content": "ok!"},
]


def sft_args(model_dir, tmp_path=None, **kw):
    base = dict(hf_checkpoint=str(model_dir), prompt_data=str(SFT_DATA), input_key="messages", label_key=None,
                metadata_key="metadata", tool_key="tools", apply_chat_template=False, rollout_batch_size=4,
                n_samples_per_prompt=1, rollout_shuffle=False, rollout_seed=42, loss_mask_type="qwen",
                rollout_max_prompt_len=None, buffer_filter_path=None, start_rollout_id=0)
    base.update(kw)
    return SimpleNamespace(**base)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return get_tokenizer(str(tiny_model_dir))


@pytest.mark.parametrize("mask_type", ["qwen", "qwen3"])
def test_multi_turn_mask_covers_exactly_the_assistant_turns(tokenizer, mask_type):
    generator = MultiTurnLossMaskGenerator(tokenizer, tokenizer_type=mask_type)
    token_ids, loss_mask = generator.get_loss_mask(CONVERSATION)
    assert len(token_ids) == len(loss_mask)
    assert tokenizer.decode(token_ids) == tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert generator.get_text_from_loss_mask(token_ids, loss_mask) == ["yo<|im_end|>\n", "ok!<|im_end|>\n"]
    # the assistant headers are not trained
    header = tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    for start in range(len(token_ids) - len(header)):
        if token_ids[start:start + len(header)] == header:
            assert loss_mask[start:start + len(header)] == [0] * len(header)


def test_step_loss_mask_zero_excludes_a_turn(tokenizer):
    conversation = [dict(m) for m in CONVERSATION]
    conversation[2]["step_loss_mask"] = 0
    token_ids, loss_mask = MultiTurnLossMaskGenerator(tokenizer, "qwen").get_loss_mask(conversation)
    assert MultiTurnLossMaskGenerator(tokenizer, "qwen").get_text_from_loss_mask(token_ids, loss_mask) == [
        "ok!<|im_end|>\n"]


def test_distill_qwen_trains_only_the_final_answer_text(tokenizer):
    generator = MultiTurnLossMaskGenerator(tokenizer, "distill_qwen")
    token_ids, loss_mask = generator.get_loss_mask(CONVERSATION)
    assert generator.get_text_from_loss_mask(token_ids, loss_mask) == ["ok!"]
    prompt = tokenizer.apply_chat_template(CONVERSATION[:-1], tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(token_ids) == prompt + "ok!"


def test_bad_mask_inputs_are_clear_errors(tokenizer):
    with pytest.raises(ValueError, match="--loss-mask-type"):
        MultiTurnLossMaskGenerator(tokenizer, "llama")
    with pytest.raises(ValueError, match="'role' and 'content'"):
        MultiTurnLossMaskGenerator(tokenizer, "qwen").get_loss_mask([{"role": "user"}])
    assert get_response_lengths([[0, 0, 1, 0, 1], [0, 0]]) == [3, 0]


@pytest.mark.parametrize("mask_type", ["qwen", "qwen3", "distill_qwen"])
def test_sft_rollout_on_shipped_conversations(tiny_model_dir, tokenizer, mask_type):
    args = sft_args(tiny_model_dir, loss_mask_type=mask_type, rollout_batch_size=6)
    data_source = RolloutDataSourceWithBuffer(args)
    rows = [json.loads(line) for line in SFT_DATA.read_text().splitlines()]
    seen = 0
    for rollout_id in range(2):
        output = generate_rollout(args, rollout_id, data_source)
        assert isinstance(output, RolloutFnTrainOutput) and len(output.samples) == 6
        for group in output.samples:
            (sample,) = group
            messages = rows[seen]["messages"]
            seen += 1
            assert sample.status == Sample.Status.COMPLETED and sample.reward == 0
            assert len(sample.loss_mask) == sample.response_length and sample.loss_mask[0] == 1
            response_ids = sample.tokens[-sample.response_length:]
            trained = [t for t, m in zip(response_ids, sample.loss_mask) if m]
            assistant = [m["content"] for m in messages if m["role"] == "assistant"]
            if mask_type == "distill_qwen":
                assert tokenizer.decode(trained) == assistant[-1]
            else:
                assert tokenizer.decode(trained) == "".join(a + "<|im_end|>\n" for a in assistant)
                assert tokenizer.decode(sample.tokens) == tokenizer.apply_chat_template(messages, tokenize=False)
    assert output.metrics["rollout/sft/trained_tokens"] > 0


def test_sft_rollout_rejects_text_prompts_and_missing_assistant(tiny_model_dir, tmp_path):
    text_data = tmp_path / "text.jsonl"
    text_data.write_text(json.dumps({"messages": "just a string"}) + "\n")
    args = sft_args(tiny_model_dir, prompt_data=str(text_data), rollout_batch_size=1)
    with pytest.raises(ValueError, match="not a list of chat messages"):
        generate_rollout(args, 0, RolloutDataSourceWithBuffer(args))
    no_assistant = tmp_path / "user_only.jsonl"
    no_assistant.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    args = sft_args(tiny_model_dir, prompt_data=str(no_assistant), rollout_batch_size=1)
    with pytest.raises(ValueError, match="no trainable assistant turn"):
        generate_rollout(args, 0, RolloutDataSourceWithBuffer(args))
    with pytest.raises(ValueError, match="no evaluation mode"):
        generate_rollout(args, 0, None, evaluation=True)

