"""SFT "rollout": chat conversations from the data source become tokens + a loss mask over assistant turns. No engine.

    python train.py --loss-type sft_loss --rollout-function-path slime.rollout.sft_rollout.generate_rollout \
        --prompt-data conversations.jsonl --input-key messages --loss-mask-type qwen ...

Each prompt must be a list of chat messages (leave --apply-chat-template off so the data source keeps
the messages), `{"role", "content"}` each. The response starts at the first assistant token; `loss_mask` covers the response and is
0 on user/system/tool turns in between and on each assistant header.
"""

from __future__ import annotations

import logging

from slime.utils.types import Sample

from .base_types import RolloutFnTrainOutput
from .mask_utils import MultiTurnLossMaskGenerator
from .tokenization import get_tokenizer

__all__ = ["generate_rollout", "conversation_to_sample"]

logger = logging.getLogger(__name__)

_GENERATORS: dict[tuple[str, str], MultiTurnLossMaskGenerator] = {}


def _mask_generator(args) -> MultiTurnLossMaskGenerator:
    key = (args.hf_checkpoint, getattr(args, "loss_mask_type", None) or "qwen")
    if key not in _GENERATORS:
        _GENERATORS[key] = MultiTurnLossMaskGenerator(get_tokenizer(key[0]), tokenizer_type=key[1])
    return _GENERATORS[key]


def conversation_to_sample(generator: MultiTurnLossMaskGenerator, sample: Sample) -> Sample:
    messages = sample.prompt
    if not isinstance(messages, list):
        raise ValueError(
            f"SFT sample {sample.index}: the prompt is {type(messages).__name__}, not a list of chat messages; "
            "point --input-key at the messages field and leave --apply-chat-template off"
        )
    tools = sample.metadata.get("tools") if isinstance(sample.metadata, dict) else None
    try:
        token_ids, loss_mask = generator.get_loss_mask(messages, tools=tools)
    except ValueError as e:
        raise ValueError(f"SFT sample {sample.index}: {e}") from e
    if 1 not in loss_mask:
        raise ValueError(f"SFT sample {sample.index} has no trainable assistant turn (roles: "
                         f"{[m.get('role') for m in messages]})")
    start = loss_mask.index(1)
    sample.tokens = token_ids
    sample.response_length = len(token_ids) - start
    sample.loss_mask = loss_mask[start:]
    sample.response = generator.tokenizer.decode(token_ids[start:])
    sample.reward = 0
    sample.status = Sample.Status.COMPLETED
    return sample


def generate_rollout(args, rollout_id: int, data_source, evaluation: bool = False) -> RolloutFnTrainOutput:
    if evaluation:
        raise ValueError("the SFT rollout (slime.rollout.sft_rollout.generate_rollout) has no evaluation mode; "
                         "set --eval-function-path to a generating rollout or drop --eval-prompt-data")
    generator = _mask_generator(args)
    groups = data_source.get_samples(args.rollout_batch_size)
    for group in groups:
        for sample in group:
            conversation_to_sample(generator, sample)
    if rollout_id == getattr(args, "start_rollout_id", 0) and groups and groups[0]:
        first = groups[0][0]
        logger.info("SFT sample: %d tokens, %d trained: %r", len(first.tokens), sum(first.loss_mask),
                    generator.get_text_from_loss_mask(first.tokens[-first.response_length:], first.loss_mask)[:2])
    samples = [s for group in groups for s in group]
    metrics = {
        "rollout/sft/tokens_mean": sum(len(s.tokens) for s in samples) / max(1, len(samples)),
        "rollout/sft/trained_tokens": sum(sum(s.loss_mask) for s in samples),
    }
    return RolloutFnTrainOutput(samples=groups, metrics=metrics)
