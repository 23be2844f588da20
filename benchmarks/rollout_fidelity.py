"""Does the built-in engine sample what the Hugging Face model samples? Task accuracy and log-prob agreement.

    python benchmarks/rollout_fidelity.py --workdir /tmp/fid --out fidelity.json            # GPU: SFT first
    python benchmarks/rollout_fidelity.py --workdir /tmp/fid --sft-model DIR --out fid.json  # an SFT-warmed model
    python benchmarks/rollout_fidelity.py --smoke --workdir /tmp/fid_smoke                  # CPU, tiny preset

RL only learns what its rollouts show it: an engine that samples from a different distribution than the
trained policy gives lower rewards and off-policy gradients. This script takes the SFT-warmed checkpoint of
`benchmarks/rl_step.py` (made here unless --sft-model is given), renders the task's prompts as the rollout
does (chat template), and samples the same prompts x samples at the same temperature with
- the engine in each of --engine-dtypes (e.g. bfloat16 and float32),
- HF `generate` in each of --hf-modes (`autocast`: fp32 weights under bf16 autocast, as TRL's GRPOTrainer
  generates; `bfloat16`; `float32`),
then scores every response with the task's exact-answer check and prints one JSON object: per sampler the
accuracy, mean length, finish reasons, a few wrong answers; per engine dtype the mean |engine log-prob - HF
float32 log-prob| of the engine's own tokens and the share of tokens off by more than 1 nat.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

WRONG_EXAMPLES = 4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--out", default=None)
    p.add_argument("--sft-model", default=None, help="SFT-warmed HF checkpoint (default: made here, as rl_step does)")
    p.add_argument("--rl-step-args", default="", help="rl_step.py flags for the task and the SFT stage")
    p.add_argument("--num-prompts", type=int, default=128)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--engine-dtypes", default="bfloat16,float32")
    p.add_argument("--hf-modes", default="autocast,float32")
    p.add_argument("--smoke", action="store_true", help="CPU: tiny preset, a few prompts, float32 only")
    o = p.parse_args(argv)
    if o.smoke:
        o.num_prompts, o.samples, o.max_new_tokens = 4, 2, 8
        o.engine_dtypes, o.hf_modes = "float32", "float32"
    return o


def task_prompts(o: argparse.Namespace, workdir: Path) -> tuple[Path, list[dict[str, Any]], dict[str, Any]]:
    """(SFT model, the first --num-prompts train rows, SFT info), running rl_step's task and SFT stage."""
    import rl_step

    rl = rl_step.parse_args(["--workdir", str(workdir)] + (["--smoke"] if o.smoke else []) + o.rl_step_args.split())
    data = rl_step.make_task(rl, workdir)
    if o.sft_model:
        model, info = Path(o.sft_model), {"from": o.sft_model}
    else:
        model, info = rl_step.run_sft(rl, workdir, data)
    rows = [json.loads(line) for line in Path(data["train"]).read_text().splitlines() if line.strip()]
    return model, rows[:o.num_prompts], info


def rendered_prompts(model: Path | str, rows: list[dict[str, Any]], samples: int
                     ) -> tuple[Any, list[list[int]], list[str], list[int], int]:
    """(tokenizer, prompt ids, labels, eos ids, pad id): each task row's messages rendered with the model's chat
    template as the rollout renders them, repeated `samples` times."""
    from slime.data.chat_template import load_tokenizer, render_chat
    from slime.engine.llm_engine import read_eos_token_ids
    from transformers import AutoConfig

    tokenizer = load_tokenizer(str(model))
    rendered = [tokenizer.encode(render_chat(tokenizer, r["messages"]), add_special_tokens=False) for r in rows]
    prompts = [p for p in rendered for _ in range(samples)]
    labels = [str(r["label"]) for r in rows for _ in range(samples)]
    eos = read_eos_token_ids(str(model), AutoConfig.from_pretrained(str(model)))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    return tokenizer, prompts, labels, eos, pad


def engine_samples(model: Path, dtype: str, prompts: list[list[int]], o: argparse.Namespace, device: str
                   ) -> tuple[list[dict], float]:
    from slime.engine import EngineConfig, LLMEngine, SamplingParams

    kwargs = {"mem_fraction_static": 0.5} if device == "cuda" else {"kv_cache_tokens": 8192}
    engine = LLMEngine(EngineConfig(str(model), device=device, dtype=dtype, **kwargs))
    try:
        params = [SamplingParams(temperature=o.temperature, max_new_tokens=o.max_new_tokens, seed=i)
                  for i in range(len(prompts))]
        started = time.perf_counter()
        out = engine.generate(prompts, params)
        return out, time.perf_counter() - started
    finally:
        engine.close()
        del engine
        _free_gpu_memory(device)


def _free_gpu_memory(device: str) -> None:
    """The next engine sizes its KV cache from the free device memory: give back what this one cached."""
    import gc

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def hf_samples(model_dir: Path, mode: str, prompts: list[list[int]], o: argparse.Namespace, device: str,
               eos: list[int], pad: int) -> tuple[list[dict], float]:
    """Left-padded batched `generate`, sampling at --temperature (top-p 1, no top-k)."""
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if mode == "bfloat16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(device).eval()
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    torch.manual_seed(0)
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=mode == "autocast")
    started = time.perf_counter()
    with torch.no_grad(), autocast:
        gen = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=o.temperature, top_p=1.0,
                             top_k=0, max_new_tokens=o.max_new_tokens, eos_token_id=eos, pad_token_id=pad)
    seconds = time.perf_counter() - started
    out = []
    for row in gen[:, width:].tolist():
        tokens, reason = [], "length"
        for t in row:
            tokens.append(t)
            if t in eos:
                reason = "stop"
                break
        out.append({"token_ids": tokens, "finish_reason": {"type": reason}})
    del model
    _free_gpu_memory(device)
    return out, seconds


def hf_log_probs(model: Any, prompts: list[list[int]], responses: list[list[int]], device: str) -> list[list[float]]:
    """Float32 HF log-probs of each response token given its prompt (teacher forcing), one sequence at a time."""
    out = []
    with torch.no_grad():
        for prompt, response in zip(prompts, responses, strict=True):
            if not response:
                out.append([])
                continue
            ids = torch.tensor([prompt + response], device=device)
            logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float()
            lp = torch.log_softmax(logits, -1).gather(-1, ids[0, len(prompt):, None])[:, 0]
            out.append(lp.tolist())
    return out


def score(name: str, results: list[dict], labels: list[str], tokenizer: Any, seconds: float) -> dict[str, Any]:
    from slime.data.synthetic import is_correct_answer

    texts = [tokenizer.decode(r["token_ids"], skip_special_tokens=False) for r in results]
    correct = [is_correct_answer(t, lab) for t, lab in zip(texts, labels, strict=True)]
    reasons: dict[str, int] = {}
    for r in results:
        key = (r.get("finish_reason") or {}).get("type", "none")
        reasons[key] = reasons.get(key, 0) + 1
    wrong = [{"label": lab, "response": t} for t, lab, ok in zip(texts, labels, correct, strict=True) if not ok]
    return {"sampler": name, "accuracy": round(sum(correct) / len(correct), 4),
            "mean_length": round(statistics.fmean(len(r["token_ids"]) for r in results), 2),
            "finish_reasons": reasons, "seconds": round(seconds, 2), "wrong_examples": wrong[:WRONG_EXAMPLES]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    o = parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and not o.smoke else "cpu"
    workdir = Path(o.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    model, rows, sft = task_prompts(o, workdir)
    tokenizer, prompts, labels, eos, pad = rendered_prompts(model, rows, o.samples)
    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    result: dict[str, Any] = {"benchmark": "rollout_fidelity", "device": device_name, "model": str(model),
                              "sft": sft, "eos_token_ids": eos, "sequences": len(prompts), "temperature": o.temperature,
                              "samplers": [], "engine_vs_hf_float32": {}}
    engine_dtypes = [d for d in o.engine_dtypes.split(",") if d]
    scorer = None  # HF in float32, loaded once to score every engine's samples
    if engine_dtypes:
        from transformers import AutoModelForCausalLM

        scorer = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32).to(device).eval()
    for dtype in engine_dtypes:
        out, seconds = engine_samples(model, dtype, prompts, o, device)
        result["samplers"].append(score(f"engine_{dtype}", out, labels, tokenizer, seconds))
        reference = hf_log_probs(scorer, prompts, [r["token_ids"] for r in out], device)
        diffs = [abs(a - b) for r, ref in zip(out, reference, strict=True) for a, b in zip(r["logprobs"], ref)]
        engine_mean = statistics.fmean(x for r in out for x in r["logprobs"]) if diffs else 0.0
        hf_mean = statistics.fmean(x for ref in reference for x in ref) if diffs else 0.0
        result["engine_vs_hf_float32"][dtype] = {
            "tokens": len(diffs), "mean_abs_diff": round(statistics.fmean(diffs), 5) if diffs else None,
            "share_off_by_more_than_1": round(sum(d > 1 for d in diffs) / max(1, len(diffs)), 5),
            "mean_engine_log_prob": round(engine_mean, 5), "mean_hf_log_prob": round(hf_mean, 5)}
        print(json.dumps(result["samplers"][-1]), json.dumps(result["engine_vs_hf_float32"][dtype]), flush=True)
    del scorer
    _free_gpu_memory(device)
    for mode in [m for m in o.hf_modes.split(",") if m]:
        out, seconds = hf_samples(model, mode, prompts, o, device, eos, pad)
        result["samplers"].append(score(f"hf_{mode}", out, labels, tokenizer, seconds))
        print(json.dumps(result["samplers"][-1]), flush=True)
    from benchmarks.report import emit_json

    return emit_json(result, o.out)


if __name__ == "__main__":
    main()
