"""CPU generation throughput of the built-in engine against Hugging Face `generate` on the same prompts.

    python benchmarks/engine_cpu.py                       # makes the `small` preset in a temp dir
    python benchmarks/engine_cpu.py --model /tmp/small --num-prompts 64 --samples 16 --max-new-tokens 24

The CPU quickstart's rollout shape: `--num-prompts` random prompts (lengths uniform in
[--min-prompt-len, --max-prompt-len]), each sampled `--samples` times at temperature 1 with a seed,
EOS ignored so every sequence produces exactly `--max-new-tokens` tokens. Ours is `LLMEngine.generate`
(no HTTP) after a short warm-up; the baseline is HF `generate` in the same process on the same
prompts (left-padded batches of `--hf-batch-prompts` prompts, `num_return_sequences=--samples`,
`min_new_tokens == max_new_tokens`). Rates are generated tokens / wall seconds, and per CPU second of
this process (steadier on a shared machine; one thread by default). `--profile` adds
cProfile's top functions of our run (by own time) to the JSON.

Prints one JSON object (and writes it to --output when given).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import platform
import pstats
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="HF checkpoint directory; default: the `small` preset, made now")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--min-prompt-len", type=int, default=16)
    parser.add_argument("--max-prompt-len", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads for both runs")
    parser.add_argument("--hf-batch-prompts", type=int, default=16)
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    for name in ("num_prompts", "samples", "max_new_tokens", "min_prompt_len", "threads", "hf_batch_prompts"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_prompt_len < args.min_prompt_len:
        parser.error("--max-prompt-len must be >= --min-prompt-len")
    return args


def make_prompts(args: argparse.Namespace, vocab_size: int) -> list[list[int]]:
    rng = random.Random(args.seed)
    lengths = [rng.randint(args.min_prompt_len, args.max_prompt_len) for _ in range(args.num_prompts)]
    return [[rng.randrange(3, vocab_size) for _ in range(n)] for n in lengths]  # ids 0-2 are special


def run_engine(model: str, prompts: list[list[int]], args: argparse.Namespace) -> dict[str, Any]:
    from slime.engine import EngineConfig, LLMEngine, SamplingParams

    engine = LLMEngine(EngineConfig(model, device="cpu", seed=args.seed))
    engine.generate(prompts[:2], SamplingParams(max_new_tokens=2, seed=0))  # warm-up
    flat = [p for p in prompts for _ in range(args.samples)]
    params = [SamplingParams(temperature=1.0, max_new_tokens=args.max_new_tokens, ignore_eos=True, seed=1000 + i)
              for i in range(len(flat))]
    profiler = cProfile.Profile() if args.profile else None
    start, cpu_start = time.perf_counter(), time.process_time()
    if profiler is not None:
        profiler.enable()
    results = engine.generate(flat, params)
    if profiler is not None:
        profiler.disable()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    tokens = sum(len(r["token_ids"]) for r in results)
    out: dict[str, Any] = {"sequences": len(flat), "tokens": tokens, "seconds": round(seconds, 3),
                           "tokens_per_s": round(tokens / seconds, 1), "cpu_seconds": round(cpu_seconds, 3),
                           "tokens_per_cpu_s": round(tokens / cpu_seconds, 1)}
    if profiler is not None:
        stream = io.StringIO()
        pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(15)
        out["profile_top_tottime"] = stream.getvalue().splitlines()
    return out


def run_hf(model: str, prompts: list[list[int]], args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    pad = hf.generation_config.pad_token_id if hf.generation_config.pad_token_id is not None else 0
    torch.manual_seed(args.seed)
    tokens, start, cpu_start = 0, time.perf_counter(), time.process_time()
    for i in range(0, len(prompts), args.hf_batch_prompts):
        batch = prompts[i:i + args.hf_batch_prompts]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                              num_return_sequences=args.samples, max_new_tokens=args.max_new_tokens,
                              min_new_tokens=args.max_new_tokens, pad_token_id=pad)
        tokens += (out.shape[1] - width) * out.shape[0]
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return {"method": f"generate, left-padded batches of {args.hf_batch_prompts} prompts x num_return_sequences",
            "tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1),
            "cpu_seconds": round(cpu_seconds, 3), "tokens_per_cpu_s": round(tokens / cpu_seconds, 1)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        model = args.model
        if model is None:
            from tools.make_tiny_model import make_model

            model = str(make_model("small", Path(scratch) / "small", seed=args.seed))
        elif not os.path.isfile(os.path.join(model, "config.json")):
            raise SystemExit(f"--model {model!r} has no config.json")
        from transformers import AutoConfig

        prompts = make_prompts(args, AutoConfig.from_pretrained(model).vocab_size)
        result: dict[str, Any] = {
            "workload": {"model": args.model or "small preset (tools/make_tiny_model.py)", "prompts": args.num_prompts,
                         "samples_per_prompt": args.samples, "max_new_tokens": args.max_new_tokens,
                         "prompt_len": [args.min_prompt_len, args.max_prompt_len], "temperature": 1.0,
                         "ignore_eos": True},
            "threads": args.threads, "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
            "ours": run_engine(model, prompts, args),
        }
        if not args.skip_hf:
            result["hf"] = run_hf(model, prompts, args)
            result["speedup_vs_hf"] = round(result["ours"]["tokens_per_s"] / result["hf"]["tokens_per_s"], 2)
            result["cpu_speedup_vs_hf"] = round(result["ours"]["tokens_per_cpu_s"] / result["hf"]["tokens_per_cpu_s"], 2)
    from benchmarks.report import emit_json

    return emit_json(result, args.output, indent=1)


if __name__ == "__main__":
    main()
