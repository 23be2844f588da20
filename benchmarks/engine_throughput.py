"""Offline generation throughput of the built-in engine against Hugging Face `generate`, on one GPU (or --tp-size).

    python tools/make_tiny_model.py --preset qwen3-0.6b --output /tmp/q06 --dtype bfloat16 --device cuda
    python benchmarks/engine_throughput.py --model /tmp/q06 --output benchmarks/results/engine_throughput_h100.json

The standard offline workload: 256 sequences, prompt and output lengths uniform in [100, 1024],
random prompt token ids, EOS ignored (every sequence produces exactly its output length),
temperature 0.6. Ours is `LLMEngine` driven directly (no HTTP). HF is `generate` on the same GPU in
the same process, batched with left padding, `min_new_tokens == max_new_tokens`; because the full
workload would take HF far too long, HF runs the first `--hf-num-seqs` prompts as one batch, each
generating the rounded mean output length of that subset, and its rate is generated tokens / wall
time (documented in the JSON under `hf.method`). `fraction_of_bandwidth_bound` divides, over all
decode steps, the bytes a step must read (every weight once plus the live KV of each sequence) by
the measured device-to-device copy bandwidth times our measured decode time. With `--tp-size N` the
engine shards the model over GPUs 0..N-1 (HF stays on GPU 0); the bytes are then those of the rank-0
shard (its heads / MLP columns plus the replicated embedding and lm_head), against one GPU's bandwidth.

    python benchmarks/engine_throughput.py --model /tmp/q06 --tp-size 2 --output /tmp/engine_tp2.json

Prints one JSON object (and writes it to --output when given).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="HF checkpoint directory (e.g. the qwen3-0.6b preset)")
    parser.add_argument("--num-seqs", type=int, default=256)
    parser.add_argument("--min-len", type=int, default=100)
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument("--prompt-vocab", type=int, default=10000, help="prompt ids are drawn from [0, this)")
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hf-num-seqs", type=int, default=None,
                        help="prompts HF generates for (default min(64, --num-seqs)); 0 skips the HF baseline")
    parser.add_argument("--max-num-batched-tokens", type=int, default=16384)
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs (for comparison)")
    parser.add_argument("--enable-overlap-schedule", action="store_true",
                        help="enqueue decode step N+1 before step N's tokens reach the host (tp 1)")
    parser.add_argument("--tp-size", type=int, default=1, help="tensor-parallel GPUs of the engine (0..N-1)")
    parser.add_argument("--output", default=None, help="also write the JSON object here")
    args = parser.parse_args(argv)
    if args.hf_num_seqs is None:
        args.hf_num_seqs = min(64, args.num_seqs)
    if not 1 <= args.min_len <= args.max_len:
        raise SystemExit(f"--min-len {args.min_len} / --max-len {args.max_len}: need 1 <= min <= max")
    if args.num_seqs < 1 or args.hf_num_seqs < 0 or args.hf_num_seqs > args.num_seqs:
        raise SystemExit("--num-seqs must be >= 1 and --hf-num-seqs within [0, --num-seqs]")
    return args


def make_workload(args: argparse.Namespace) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(args.seed)
    prompts = [[rng.randrange(args.prompt_vocab) for _ in range(rng.randint(args.min_len, args.max_len))]
               for _ in range(args.num_seqs)]
    output_lens = [rng.randint(args.min_len, args.max_len) for _ in range(args.num_seqs)]
    return prompts, output_lens


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus bytes written (median of 10)."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * nbytes / sorted(times)[len(times) // 2]


def run_ours(args: argparse.Namespace, prompts: list[list[int]], output_lens: list[int]) -> dict[str, Any]:
    from slime.engine import EngineConfig, LLMEngine, SamplingParams

    config = EngineConfig(args.model, device="cuda", dtype="bfloat16", max_num_seqs=args.num_seqs,
                          max_num_batched_tokens=args.max_num_batched_tokens, enforce_eager=args.enforce_eager,
                          overlap_schedule=args.enable_overlap_schedule,
                          tp_size=args.tp_size)
    started = time.perf_counter()
    engine = LLMEngine(config)
    warm = [SamplingParams(temperature=args.temperature, max_new_tokens=4, ignore_eos=True, seed=i) for i in range(8)]
    engine.generate([p[:64] for p in prompts[:8]], warm)  # kernels compiled, graphs captured
    torch.cuda.synchronize()
    setup_s = time.perf_counter() - started

    runner = engine.runner
    steps: list[tuple[bool, int, int, float]] = []  # (is_prefill, seqs, live KV tokens read, seconds)
    original_run, original_launch = runner.run, runner.launch
    in_run = [False]

    def timed_run(seqs, is_prefill):
        live = sum(len(seq) for seq in seqs)
        t0 = time.perf_counter()
        in_run[0] = True
        result = original_run(seqs, is_prefill)  # returns host lists: the step is complete on the GPU
        in_run[0] = False
        steps.append((is_prefill, len(seqs), live, time.perf_counter() - t0))
        return result

    def counted_launch(seqs, is_prefill, *rest):  # overlap schedule: decode steps are launched, collected later
        if not in_run[0]:
            steps.append((is_prefill, len(seqs), sum(len(seq) for seq in seqs), 0.0))
        return original_launch(seqs, is_prefill, *rest)

    runner.run = timed_run
    if args.enable_overlap_schedule:
        runner.launch = counted_launch
    params = [SamplingParams(temperature=args.temperature, max_new_tokens=n, ignore_eos=True, seed=args.seed + i)
              for i, n in enumerate(output_lens)]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    results = engine.generate(prompts, params)
    elapsed = time.perf_counter() - t0
    runner.run, runner.launch = original_run, original_launch
    produced = sum(len(r["token_ids"]) for r in results)
    assert [len(r["token_ids"]) for r in results] == output_lens, "ignore_eos run produced wrong lengths"

    model = runner.model
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    layer = model.attention_layers()[0]
    kv_bytes_per_token = 2 * len(model.attention_layers()) * layer.num_kv_heads * layer.head_dim * 2
    decode = [s for s in steps if not s[0]]
    info = {
        "tokens_per_s": produced / elapsed, "output_tokens": produced, "elapsed_s": elapsed, "setup_s": setup_s,
        "prefill_steps": len(steps) - len(decode), "prefill_s": sum(s[3] for s in steps if s[0]),
        # overlapped decode steps have no time of their own: all that is not prefill (host time included)
        "decode_steps": len(decode), "decode_s": (elapsed - sum(s[3] for s in steps if s[0])
                                                  if args.enable_overlap_schedule else sum(s[3] for s in decode)),
        "decode_bytes": sum(weight_bytes + s[2] * kv_bytes_per_token for s in decode),
        "weight_bytes": weight_bytes, "kv_bytes_per_token": kv_bytes_per_token,
        "num_kv_blocks": runner.num_blocks, "preemptions": engine.num_preemptions,
        "cuda_graphs": not args.enforce_eager, "overlap_schedule": args.enable_overlap_schedule,
        "attention_backend": type(layer.backend).__name__,
        "max_decode_batch": max((s[1] for s in decode), default=0), "tp_size": args.tp_size,
    }
    full = [s for s in decode if s[1] == info["max_decode_batch"]]
    if full:
        info["full_batch_decode_step_ms"] = 1e3 * sorted(s[3] for s in full)[len(full) // 2]
    engine.close()  # stops the tensor-parallel workers, freeing GPUs 1..N-1
    del engine, runner, model
    torch.cuda.empty_cache()
    return info


def run_hf(args: argparse.Namespace, prompts: list[list[int]], output_lens: list[int]) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    subset = prompts[:args.hf_num_seqs]
    new_tokens = round(sum(output_lens[:args.hf_num_seqs]) / args.hf_num_seqs)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).cuda().eval()
    pad = model.generation_config.pad_token_id or 0
    width = max(len(p) for p in subset)
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in subset], device="cuda")
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in subset], device="cuda")
    kwargs = dict(do_sample=True, temperature=args.temperature, top_k=0, top_p=1.0, pad_token_id=pad)
    with torch.inference_mode():
        model.generate(input_ids[:, -32:], attention_mask=attention_mask[:, -32:], min_new_tokens=4,
                       max_new_tokens=4, **kwargs)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model.generate(input_ids, attention_mask=attention_mask, min_new_tokens=new_tokens,
                             max_new_tokens=new_tokens, **kwargs)
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
    produced = (out.shape[1] - width) * len(subset)
    del model, out
    torch.cuda.empty_cache()
    return {"tokens_per_s": produced / elapsed, "output_tokens": produced, "elapsed_s": elapsed,
            "method": (f"HF generate, first {len(subset)} prompts of the workload as one left-padded batch "
                       f"(padded to {width} tokens), each forced to {new_tokens} new tokens (the subset's mean "
                       "output length; min_new_tokens == max_new_tokens), sampling at the same temperature, "
                       "top_k=0, sdpa attention; rate = generated tokens / wall time")}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("engine_throughput.py needs a CUDA GPU")
    device = torch.device("cuda")
    prompts, output_lens = make_workload(args)
    bandwidth = copy_bandwidth(device)
    ours = run_ours(args, prompts, output_lens)
    hf = run_hf(args, prompts, output_lens) if args.hf_num_seqs else None
    result: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(device),
        "ours_tokens_per_s": round(ours["tokens_per_s"], 1),
        "hf_tokens_per_s": round(hf["tokens_per_s"], 1) if hf else None,
        "speedup_vs_hf": round(ours["tokens_per_s"] / hf["tokens_per_s"], 2) if hf else None,
        "fraction_of_bandwidth_bound": round(ours["decode_bytes"] / (bandwidth * ours["decode_s"]), 3),
        "copy_bandwidth_GBps": round(bandwidth / 1e9, 1),
        "workload": {"num_seqs": args.num_seqs, "prompt_len": [args.min_len, args.max_len],
                     "output_len": [args.min_len, args.max_len], "prompt_tokens": sum(len(p) for p in prompts),
                     "output_tokens": sum(output_lens), "temperature": args.temperature, "ignore_eos": True,
                     "seed": args.seed, "model": args.model, "tp_size": args.tp_size},
        "ours": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in ours.items()},
        "hf": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in hf.items()} if hf else None,
        "versions": {"torch": torch.__version__, "triton": _version("triton"),
                     "transformers": _version("transformers")},
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        with open(args.output, "w") as handle:
            handle.write(text + "\n")
    return result


def _version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001 - reporting only
        return None


if __name__ == "__main__":
    from slime.engine.parallel import exit_process

    main()
    exit_process(0)  # with --tp-size > 1: without the NCCL teardown that aborts at exit
