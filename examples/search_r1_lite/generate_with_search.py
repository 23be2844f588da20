"""Search-R1-lite: multi-turn generation with a local BM25 search tool, for `--custom-generate-function-path`.

    PYTHONPATH=examples/search_r1_lite python train.py ... \
        --custom-generate-function-path generate_with_search.generate \
        --custom-rm-path generate_with_search.reward_func

Each turn asks the engine (SGLang `/generate`, token ids in and out) to continue until `</search>`,
`</answer>` or EOS. A `<search>query</search>` gets `<information>top-k docs</information>` appended;
anything else that is not an answer gets a short correction. Model tokens keep their log-probs and
loss mask 1; appended tool/environment tokens get loss mask 0 and log-prob 0. The whole trajectory
(model + tool tokens) counts against `--rollout-max-response-len`.
"""

from __future__ import annotations

import re

from qa_em_format import compute_score
from retriever import format_passages, search

from slime.rollout.tokenization import encode, get_tokenizer, render_chat
from slime.utils.http_utils import post
from slime.utils.types import Sample

MAX_TURNS = 3
TOPK = 3
STOP_STRINGS = ["</search>", "</answer>"]
INSTRUCTION = (
    "Answer the question below. Think inside <think> </think>. When you need a fact, search for it by "
    "writing <search> your query </search>; the results come back inside <information> </information>. "
    "Search as often as you need. Give the final answer, a few words only, inside <answer> </answer>, "
    "for example <answer> Paris </answer>.\nQuestion: {question}\n"
)
INVALID_ACTION = (
    "\nThat was not a valid action. To search, write the query between <search> and </search>. "
    "To answer, write it between <answer> and </answer>.\n"
)
_ACTION = re.compile(r"<(search|answer)>(.*?)</\1>", re.DOTALL)


def parse_action(text: str) -> tuple[str | None, str]:
    """The first complete <search>/<answer> block of one turn's text: (action, content)."""
    match = _ACTION.search(text)
    return (match.group(1), match.group(2).strip()) if match else (None, "")


def observation_for(action: str | None, content: str) -> str:
    if action == "search":
        return f"\n\n<information>{format_passages(search(content, TOPK))}</information>\n\n"
    return INVALID_ACTION


def build_prompt(tokenizer, sample: Sample) -> str:
    if isinstance(sample.prompt, list):  # chat messages prepared by the data source
        return render_chat(tokenizer, sample.prompt, add_generation_prompt=True)
    messages = [{"role": "user", "content": INSTRUCTION.format(question=sample.prompt.strip())}]
    return render_chat(tokenizer, messages, add_generation_prompt=True)


async def generate(args, sample: Sample, sampling_params) -> Sample:
    if getattr(args, "partial_rollout", False):
        raise ValueError("search_r1_lite's generate does not support --partial-rollout")
    tokenizer = get_tokenizer(args.hf_checkpoint)
    url = f"http://{args.sglang_router_ip}:{args.sglang_router_port}/generate"
    prompt_ids = encode(tokenizer, build_prompt(tokenizer, sample))
    budget = int(sampling_params["max_new_tokens"])
    response_ids: list[int] = []
    loss_mask: list[int] = []
    log_probs: list[float] = []
    text = ""
    status = Sample.Status.COMPLETED
    for _ in range(MAX_TURNS):
        remaining = budget - len(response_ids)
        if remaining <= 0:
            status = Sample.Status.TRUNCATED
            break
        params = dict(sampling_params, max_new_tokens=remaining, stop=STOP_STRINGS, no_stop_trim=True)
        output = await post(url, {"input_ids": prompt_ids + response_ids, "sampling_params": params,
                                  "return_logprob": True})
        meta = output["meta_info"]
        pairs = meta["output_token_logprobs"]
        response_ids += [int(p[1]) for p in pairs]
        log_probs += [float(p[0]) for p in pairs]
        loss_mask += [1] * len(pairs)
        text += output["text"]
        finish = meta.get("finish_reason") or {}
        if finish.get("type") == "length":
            status = Sample.Status.TRUNCATED
            break
        if finish.get("type") == "abort":
            status = Sample.Status.ABORTED
            break
        action, content = parse_action(output["text"])
        if action == "answer" or not isinstance(finish.get("matched"), str):
            break  # answered, or the model ended its turn (EOS)
        observation = observation_for(action, content)
        obs_ids = encode(tokenizer, observation)[: budget - len(response_ids)]
        response_ids += obs_ids
        loss_mask += [0] * len(obs_ids)
        log_probs += [0.0] * len(obs_ids)
        text += tokenizer.decode(obs_ids)
    sample.tokens = prompt_ids + response_ids
    sample.response = text
    sample.response_length = len(response_ids)
    sample.loss_mask = loss_mask
    sample.rollout_log_probs = log_probs
    sample.status = status
    return sample


async def reward_func(args, sample: Sample, **kwargs) -> float:
    label = sample.label
    targets = label.get("target") if isinstance(label, dict) else label
    if targets is None:
        raise ValueError(f"sample {sample.index}: label needs a 'target' (string or list of strings)")
    return compute_score(sample.response, targets)
