"""Training throughput and model-FLOPs utilisation of the FSDP trainer, against a plain Hugging Face loop.

    python benchmarks/train_throughput.py --presets qwen3-0.6b,qwen3-4b --num-gpus 1 --out $OUT/train.json
    python benchmarks/train_throughput.py --presets qwen3-4b --num-gpus 4 --out $OUT/train_4b_x4.json
    python benchmarks/train_throughput.py --presets qwen3-4b --num-gpus 4 --variants eager,layer --no-baseline
    python benchmarks/train_throughput.py --smoke            # CPU, tiny preset, gloo, 1 step (the CPU test)

For each preset: a random-weight checkpoint from `tools/make_tiny_model.py`, then `--num-gpus`
spawned ranks (NCCL; gloo on CPU) each run the real `FSDPTrainer.train(rollout_id, rollout_data)`
(the code `train.py` runs) on synthetic rollouts: random token ids, sample lengths uniform in
[--min-len, --max-len], packed by `--use-dynamic-batch-size` into micro-batches of at most
`--max-tokens-per-gpu` (4096) tokens, one optimizer step per rollout, GRPO policy loss with
`--use-rollout-logprobs` (so `train()` is forward + backward + optimizer only, no extra
old-log-prob forward). `--warmup` rollouts are excluded from the timing.

Model FLOPs (stated in the JSON under `flops_formula`) per rollout, summed over ranks:
6 * N_dense * tokens + 6 * V * H * response_tokens (the log-prob head runs on response tokens
only) + 6 * layers * heads * head_dim * sum(len^2) (causal attention: 12 * ... * len^2 / 2).
N_dense excludes the embedding and lm-head matrices. Recomputation (activation checkpointing,
chosen by `--recompute auto` when the estimated memory does not fit) is not counted. MFU divides
the achieved model FLOP/s per GPU by the bf16 peak: both the 8192^3 matmul rate measured in the
same run and the 989 TFLOP/s H100 SXM datasheet figure.

Baseline, same GPU and the same tokens as rank 0: a plain HF loop (fp32 weights, bf16 autocast,
sdpa, one sample per forward, gradient accumulation over the step, torch AdamW, grad clipping).
`--profile [VARIANTS]` adds one profiled rollout on rank 0 (of every variant, or of those named) and prints two
torch.profiler tables (by GPU time, by host time) and the kernel time by kind (matmul, attention, nccl, ...)
against the rollout's wall time. `--variants` runs the trainer once per variant on the same checkpoint and rollouts (one
baseline): `eager`, `fused` (SLIME_FSDP_COMPILE=1, slime/backends/fsdp/fused_ops.py), `layer`
(SLIME_FSDP_COMPILE=layer, slime/backends/fsdp/layer_compile.py), `layer-dynamic` (the same with
dynamic=True from the first call); the JSON keeps each under `variants` (`slime` is the fastest, named by
`slime_variant`) and
a table of them is printed last, on stderr. The default `env` keeps whatever SLIME_FSDP_COMPILE says.
Prints one JSON object; `--out` also writes it. On one H100 (torch 2.11) a preset takes 2-5 minutes,
most of it writing / loading the checkpoint and the HF baseline: run one preset per command.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

H100_DATASHEET_BF16_TFLOPS = 989.0
FLOPS_FORMULA = ("6*N_dense*tokens + 6*vocab*hidden*response_tokens + 6*layers*heads*head_dim*sum(seq_len^2) "
                 "(causal attention = 12*layers*heads*head_dim*seq_len^2/2); N_dense = parameters without the "
                 "embedding / lm-head matrix; recomputation not counted")


# variant -> environment of its ranks (None: leave the variable as the caller set it)
VARIANTS: dict[str, dict[str, str | None]] = {
    "env": {},
    "eager": {"SLIME_FSDP_COMPILE": "0"},
    "fused": {"SLIME_FSDP_COMPILE": "1"},
    "layer": {"SLIME_FSDP_COMPILE": "layer", "SLIME_FSDP_COMPILE_DYNAMIC": "0"},
    "layer-dynamic": {"SLIME_FSDP_COMPILE": "layer", "SLIME_FSDP_COMPILE_DYNAMIC": "1"},
}
# variant -> trainer flags added to every rank's command line (these variants run with "layer"'s environment)
_KEEP, _ONCE = ["--fsdp-reshard-after-forward", "false"], ["--fsdp-reduce-grads-per-step"]
_BF16, _CHUNK = ["--fsdp-grad-reduce-dtype", "bfloat16"], ["--log-probs-chunk-size", "1024"]
VARIANT_FLAGS: dict[str, list[str]] = {
    "layer-keep": _KEEP,
    "layer-reduce-once": _ONCE,
    "layer-keep-reduce-once": _KEEP + _ONCE,
    "layer-keep-bf16-reduce": _KEEP + _BF16,
    "layer-keep-reduce-once-chunked": _KEEP + _ONCE + _CHUNK,
    "layer-keep-reduce-once-bf16-chunked": _KEEP + _ONCE + _BF16 + _CHUNK,
}
VARIANTS.update({name: VARIANTS["layer"] for name in VARIANT_FLAGS})
# each flag variant also with dynamic shapes from the first call ("<variant>-dynamic") and with the compiled
# vocabulary head (SLIME_FSDP_COMPILE_HEAD=1, slime/backends/fsdp/log_probs.py: "<variant>-head")
for _name, _flags in list(VARIANT_FLAGS.items()):
    VARIANT_FLAGS[f"{_name}-dynamic"] = VARIANT_FLAGS[f"{_name}-head"] = _flags
    VARIANTS[f"{_name}-dynamic"] = VARIANTS["layer-dynamic"]
    VARIANTS[f"{_name}-head"] = dict(VARIANTS["layer"], SLIME_FSDP_COMPILE_HEAD="1")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="qwen3-0.6b,qwen3-4b", help="comma-separated tools/make_tiny_model.py presets")
    p.add_argument("--num-gpus", type=int, default=1, help="ranks (one per GPU; CPU processes with --smoke)")
    p.add_argument("--max-tokens-per-gpu", type=int, default=4096)
    p.add_argument("--samples-per-rank", type=int, default=32, help="samples per rank per rollout (one optimizer step)")
    p.add_argument("--min-len", type=int, default=256)
    p.add_argument("--max-len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=3, help="timed rollouts")
    p.add_argument("--warmup", type=int, default=1, help="untimed rollouts first")
    p.add_argument("--balance-data", action="store_true",
                   help="every rank draws the whole rollout and takes its token-balanced share (train.py's "
                        "--balance-data); default: each rank draws its own samples (ranks wait for the longest)")
    p.add_argument("--recompute", choices=["auto", "on", "off"], default="auto")
    p.add_argument("--log-probs-chunk-size", type=int, default=-1)
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--variants", default="env", help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--alloc-conf", default="expandable_segments:True",
                   help="PYTORCH_CUDA_ALLOC_CONF for the run (micro-batch sizes vary; '' leaves it unset)")
    p.add_argument("--profile", nargs="?", const="all", default="",
                   help="print torch.profiler tables of one extra rollout (of every variant, or of the "
                        "comma-separated variants given)")
    p.add_argument("--model-dir", default=None, help="where to write the checkpoints (default: a temp dir)")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny preset, gloo, 1 timed step, no warmup")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.smoke:
        args.presets, args.max_tokens_per_gpu, args.samples_per_rank = "tiny", 256, 6
        args.min_len, args.max_len, args.steps, args.warmup = 16, 96, 1, 0
    args.variant_list = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variant_list if v not in VARIANTS]
    if unknown or not args.variant_list or len(set(args.variant_list)) != len(args.variant_list):
        raise ValueError(f"--variants {args.variants!r}: expected distinct names from {', '.join(VARIANTS)}")
    args.profile_variants = set(args.variant_list if args.profile == "all" else
                                [v.strip() for v in args.profile.split(",") if v.strip()])
    if args.profile_variants - set(args.variant_list):
        raise ValueError(f"--profile {args.profile!r}: not among --variants {args.variants!r}")
    if not 0 < args.min_len <= args.max_len <= args.max_tokens_per_gpu:
        raise ValueError("need 0 < --min-len <= --max-len <= --max-tokens-per-gpu")
    return args


# ----------------------------------------------------------------------------- workload
def synthetic_rollout(num_samples: int, seed: int, vocab: int, min_len: int, max_len: int) -> dict[str, list]:
    """Random token ids; prompt = a quarter of the sample (at most 256 tokens), the rest is the response."""
    rng = random.Random(seed)
    data: dict[str, list] = {k: [] for k in ("tokens", "response_lengths", "loss_masks", "rewards", "raw_reward",
                                             "rollout_log_probs", "truncated", "sample_indices")}
    for i in range(num_samples):
        length = rng.randint(min_len, max_len)
        response = length - min(256, max(1, length // 4))
        data["tokens"].append([rng.randrange(0, vocab) for _ in range(length)])
        data["response_lengths"].append(response)
        data["loss_masks"].append([1] * response)
        reward = float(rng.choice([0.0, 1.0]))
        data["rewards"].append(reward)
        data["raw_reward"].append(reward)
        data["rollout_log_probs"].append([-rng.uniform(8.0, 13.0) for _ in range(response)])
        data["truncated"].append(0)
        data["sample_indices"].append(i)
    return data


def rollout_seed(step: int, rank: int) -> int:
    return 1000 * step + rank


def rank_rollout(cfg: dict[str, Any], step: int, rank: int) -> dict[str, list]:
    """This rank's samples of rollout `step`: its own draw, or (--balance-data) its token-balanced share of
    one draw of every rank's samples, split as train.py splits a rollout."""
    shape = cfg["shape"]
    if not cfg.get("balance"):
        return synthetic_rollout(cfg["samples_per_rank"], rollout_seed(step, rank), shape["vocab"], cfg["min_len"],
                                 cfg["max_len"])
    from slime.ray.data_split import split_rollout_data

    total = cfg["samples_per_rank"] * cfg["world"]
    data = synthetic_rollout(total, rollout_seed(step, 0), shape["vocab"], cfg["min_len"], cfg["max_len"])
    return split_rollout_data(data, cfg["world"], total, balance=True)[rank]


def shape_of(config: Any) -> dict[str, int]:
    heads = int(config.num_attention_heads)
    return {"hidden": int(config.hidden_size), "layers": int(config.num_hidden_layers), "heads": heads,
            "head_dim": int(getattr(config, "head_dim", None) or config.hidden_size // heads),
            "kv_heads": int(config.num_key_value_heads), "intermediate": int(config.intermediate_size),
            "vocab": int(config.vocab_size)}


def dense_params(shape: dict[str, int]) -> int:
    """Decoder-layer parameters (attention, q/k norms, MLP, layer norms) plus the final norm."""
    h, d = shape["hidden"], shape["head_dim"]
    attn = h * shape["heads"] * d * 2 + h * shape["kv_heads"] * d * 2 + 2 * d
    mlp = 3 * h * shape["intermediate"]
    return shape["layers"] * (attn + mlp + 2 * h) + h


def rollout_flops(shape: dict[str, int], data: dict[str, list]) -> float:
    lengths = [len(t) for t in data["tokens"]]
    responses = sum(data["response_lengths"])
    attn = 6.0 * shape["layers"] * shape["heads"] * shape["head_dim"] * sum(n * n for n in lengths)
    return 6.0 * dense_params(shape) * sum(lengths) + 6.0 * shape["vocab"] * shape["hidden"] * responses + attn


def needs_recompute(shape: dict[str, int], world: int, max_tokens: int, gpu_bytes: float) -> bool:
    """Rough: fp32 params + grads + Adam moments (16 B/param, sharded) + bf16 activations of one micro-batch."""
    params = dense_params(shape) + shape["vocab"] * shape["hidden"]
    per_token_layer = 2 * (10 * shape["hidden"] + 4 * shape["intermediate"] + 4 * shape["heads"] * shape["head_dim"])
    activations = max_tokens * shape["layers"] * per_token_layer + 3 * 4 * max_tokens * shape["vocab"]
    return 16 * params / world + activations > 0.8 * gpu_bytes


# ----------------------------------------------------------------------------- measurements
def peak_matmul_tflops(device: str) -> float:
    """bf16 8192^3 matmul rate on GPU (fp32 512^3 on CPU, for the smoke mode only)."""
    n, dtype = (8192, torch.bfloat16) if device == "cuda" else (512, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    iters = 20 if device == "cuda" else 3
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        a @ b
    _sync(device)
    return 2 * n ** 3 * iters / (time.perf_counter() - start) / 1e12


def packed_attention_check(device: str) -> dict[str, Any]:
    """The packed attention kernel the trainer uses on this device against one sdpa per sample."""
    from slime.backends.fsdp.packed_attention import _per_sample_attention, has_varlen_kernel, packed_attention_forward
    from slime.backends.fsdp.packed_attention import packed_attention_kwargs

    lengths, heads, kv_heads, dim = [100, 300, 37, 611], 16, 8, 128
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(1, h, sum(lengths), dim, generator=g).to(device, dtype) for h in (heads, kv_heads, kv_heads))
    out, _ = packed_attention_forward(torch.nn.Module(), q, k, v, None, scaling=dim ** -0.5,
                                      **packed_attention_kwargs(lengths, device))
    ref = _per_sample_attention(q, k, v, lengths, dim ** -0.5).transpose(1, 2)
    kernel = "varlen_attn" if device == "cuda" and has_varlen_kernel() else "per-sample sdpa"
    return {"kernel": kernel, "max_abs_diff_vs_per_sample_sdpa": float((out.float() - ref.float()).abs().max())}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _init_rank(rank: int, world: int, port: int, device: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    if device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=rank, world_size=world)


def trainer_args(model_dir: str, cfg: dict[str, Any], recompute: bool):
    from slime.utils.arguments import parse_args as slime_args

    world = cfg["world"]
    flags = ["--hf-checkpoint", model_dir, "--rollout-batch-size", str(cfg["samples_per_rank"] * world),
             "--n-samples-per-prompt", "1", "--num-steps-per-rollout", "1", "--actor-num-gpus-per-node", str(world),
             "--use-dynamic-batch-size", "--max-tokens-per-gpu", str(cfg["max_tokens"]),
             "--use-rollout-logprobs", "--advantage-estimator", "grpo", "--lr", "1e-6",
             "--log-probs-chunk-size", str(cfg["chunk"]), "--num-rollout", "1000"]
    if recompute:
        flags += ["--recompute-granularity", "full"]
    args = slime_args(flags + cfg.get("flags", []))
    args.device = cfg["device"]
    return args


def slime_worker(rank: int, cfg: dict[str, Any], model_dir: str, port: int, result_path: str) -> None:
    import torch.distributed as dist

    from slime.backends.fsdp.trainer import FSDPTrainer

    device, world = cfg["device"], cfg["world"]
    _init_rank(rank, world, port, device)
    trainer = FSDPTrainer(trainer_args(model_dir, cfg, cfg["recompute"]))
    trainer.init()
    shape = cfg["shape"]
    times, warmup_times, tokens, flops = [], [], 0, 0.0
    for step in range(cfg["warmup"] + cfg["steps"]):
        data = rank_rollout(cfg, step, rank)
        _sync(device)
        dist.barrier()
        start = time.perf_counter()
        metrics = trainer.train(step, data)
        _sync(device)
        elapsed = time.perf_counter() - start
        if step >= cfg["warmup"]:
            times.append(elapsed)
            tokens += sum(len(t) for t in data["tokens"])
            flops += rollout_flops(shape, data)
        else:
            warmup_times.append(elapsed)
    totals = torch.tensor([float(tokens), flops, max(times)], dtype=torch.float64,
                          device=device if device == "cuda" else "cpu")
    dist.all_reduce(totals[:2])
    dist.all_reduce(totals[2:], op=dist.ReduceOp.MAX)
    profile = _profile_rollout(trainer, cfg, rank) if cfg["profile"] else None
    if rank == 0:
        seconds = sum(times)
        result = {"seconds_per_rollout": seconds / len(times), "tokens_per_rollout_all_ranks": totals[0].item() / len(times),
                  "tokens_per_s_per_gpu": totals[0].item() / seconds / world,
                  "model_tflops_per_s_per_gpu": totals[1].item() / seconds / world / 1e12,
                  "attention": trainer.model.hf.config._attn_implementation, "recompute": cfg["recompute"],
                  "final_loss": float(metrics.get("train/loss", float("nan"))),
                  "compile_mode": os.environ.get("SLIME_FSDP_COMPILE", "0"), "trainer_flags": cfg.get("flags", []),
                  "compiled_layers": _compiled_layers(trainer.model), "warmup_seconds": warmup_times,
                  **_compile_counters(),
                  "peak_memory_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if device == "cuda" else None}
        if profile:
            result["profile"] = profile
        Path(result_path).write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def _compile_counters() -> dict[str, int]:
    """dynamo's counters of this rank: graphs compiled, graph breaks, frames traced / traced without error."""
    from torch._dynamo.utils import counters

    return {"compiled_graphs": int(counters["stats"].get("unique_graphs", 0)),
            "graph_breaks": int(sum(counters["graph_break"].values())),
            "dynamo_frames": [int(counters["frames"].get("total", 0)), int(counters["frames"].get("ok", 0))]}


def _compiled_layers(model) -> int:
    from slime.backends.fsdp.layer_compile import compiled_layer_count

    return compiled_layer_count(model)


def _profile_rollout(trainer, cfg: dict[str, Any], rank: int) -> dict[str, Any] | None:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cfg["device"] == "cuda" else [])
    data = rank_rollout(cfg, 999, rank)
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        trainer.train(999, data)
        _sync(cfg["device"])
    wall = time.perf_counter() - start
    if rank != 0:
        return None
    events = prof.key_averages()
    by_cpu = events.table(sort_by="self_cpu_time_total", row_limit=20)
    print(f"== torch.profiler, {cfg['preset']}: profiled rollout wall {wall:.3f} s; by self CPU time ==\n{by_cpu}",
          flush=True)
    sort = "self_cuda_time_total" if cfg["device"] == "cuda" else "self_cpu_time_total"
    try:
        table = events.table(sort_by=sort, row_limit=30)
    except (AttributeError, KeyError):
        sort = "self_device_time_total"
        table = events.table(sort_by=sort, row_limit=30)
    print(f"== torch.profiler, one rollout, rank 0, {cfg['preset']} (sorted by {sort}) ==\n{table}", flush=True)
    top = []
    for e in events:
        dev = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        top.append({"name": e.key, "self_device_ms": dev / 1e3, "self_cpu_ms": e.self_cpu_time_total / 1e3,
                    "count": e.count})
    key = "self_device_ms" if cfg["device"] == "cuda" else "self_cpu_ms"
    by_kind = kernel_ms_by_kind(top) if cfg["device"] == "cuda" else {}
    print(f"== kernel time by kind (ms), profiled rollout wall {1e3 * wall:.0f} ms: {json.dumps(by_kind)}", flush=True)
    return {"wall_ms": 1e3 * wall, "kernel_ms_by_kind": by_kind, "top": sorted(top, key=lambda r: -r[key])[:15]}


KERNEL_KINDS = (("nccl", ("nccl",)), ("attention", ("flash", "fmha", "attn")),
                ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "sm90_")),
                ("adam", ("adam",)), ("triton", ("triton",)))


def kernel_ms_by_kind(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Device time of the GPU kernels (rows with no host time of their own) summed by kind of kernel name;
    set against the profiled wall time, the compute kinds show how much of it the GPU computed."""
    out: dict[str, float] = {}
    for row in rows:
        if row["self_cpu_ms"] > 0 or row["self_device_ms"] <= 0:
            continue  # an operator (its kernels are their own rows) or a host-only event
        name = row["name"].lower()
        kind = next((k for k, needles in KERNEL_KINDS if any(n in name for n in needles)), "other")
        out[kind] = out.get(kind, 0.0) + row["self_device_ms"]
    out["compute_total"] = sum(v for k, v in out.items() if k != "nccl")
    return {k: round(v, 1) for k, v in out.items()}


def baseline_worker(cfg: dict[str, Any], model_dir: str, result_path: str) -> None:
    """Plain HF training loop on rank 0's rollouts: fp32 weights + bf16 autocast (pure bf16 weights and Adam
    state if that runs out of memory), sdpa, one sample per forward."""
    import gc

    result = _baseline(cfg, model_dir, torch.bfloat16 if cfg["baseline_bf16"] else torch.float32)
    if "error" in result and cfg["device"] == "cuda" and not cfg["baseline_bf16"]:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        result = dict(_baseline(cfg, model_dir, torch.bfloat16), fp32_error=result["error"])
    Path(result_path).write_text(json.dumps(result))


def _baseline(cfg: dict[str, Any], model_dir: str, dtype: torch.dtype) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    device = cfg["device"]
    model = optimizer = None
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa")
        model.to(device).train()
        if cfg["recompute"]:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
        times, tokens = [], 0
        for step in range(cfg["warmup"] + cfg["steps"]):
            data = rank_rollout(cfg, step, 0)  # rank 0's tokens
            _sync(device)
            start = time.perf_counter()
            for toks, resp in zip(data["tokens"], data["response_lengths"]):
                ids = torch.tensor([toks], device=device)
                with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
                    logits = model(input_ids=ids, use_cache=False).logits[0, -resp - 1:-1].float()
                loss = torch.nn.functional.cross_entropy(logits, ids[0, -resp:]) / len(data["tokens"])
                loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            _sync(device)
            if step >= cfg["warmup"]:
                times.append(time.perf_counter() - start)
                tokens += sum(len(t) for t in data["tokens"])
        weights = "fp32 weights + bf16 autocast" if dtype == torch.float32 else "bf16 weights and Adam state"
        return {"tokens_per_s": tokens / sum(times), "seconds_per_rollout": sum(times) / len(times),
                "method": f"HF AutoModelForCausalLM, {weights}, sdpa, one sample per forward, grad accumulation, "
                          "torch.optim.AdamW, clip 1.0" + (", gradient checkpointing" if cfg["recompute"] else ""),
                "peak_memory_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if device == "cuda" else None}
    except torch.OutOfMemoryError as exc:
        return {"error": f"out of memory: {str(exc).splitlines()[0][:200]}"}
    finally:
        del model, optimizer


# ----------------------------------------------------------------------------- driver
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, nprocs: int, fn_args: tuple) -> None:
    import torch.multiprocessing as mp

    mp.start_processes(fn, args=fn_args, nprocs=nprocs, join=True, start_method="spawn")


def _single(rank: int, fn, *fn_args) -> None:
    fn(*fn_args)


def run_preset(preset: str, args: argparse.Namespace, device: str, work: Path, peak_measured: float
               ) -> dict[str, Any]:
    from transformers import AutoConfig

    from tools.make_tiny_model import make_model

    model_dir = work / preset
    t0 = time.perf_counter()
    make_model(preset, model_dir, seed=0, dtype="bfloat16" if device == "cuda" else "float32", device=device)
    checkpoint_seconds = time.perf_counter() - t0
    if device == "cuda":
        torch.cuda.empty_cache()
    shape = shape_of(AutoConfig.from_pretrained(model_dir))
    gpu_bytes = torch.cuda.get_device_properties(0).total_memory if device == "cuda" else float("inf")
    recompute = args.recompute == "on" or (args.recompute == "auto" and needs_recompute(
        shape, args.num_gpus, args.max_tokens_per_gpu, gpu_bytes))
    cfg = {"preset": preset, "device": device, "world": args.num_gpus, "shape": shape, "recompute": recompute,
           "samples_per_rank": args.samples_per_rank, "min_len": args.min_len, "max_len": args.max_len,
           "max_tokens": args.max_tokens_per_gpu, "chunk": args.log_probs_chunk_size, "steps": args.steps,
           "warmup": args.warmup, "balance": args.balance_data,
           # fp32 weights + grads + Adam (16 B/param) would not leave room for activations: pure bf16 baseline
           "baseline_bf16": 16 * (dense_params(shape) + shape["vocab"] * shape["hidden"]) > 0.7 * gpu_bytes}
    out: dict[str, Any] = {"shape": shape, "dense_params": dense_params(shape), "num_gpus": args.num_gpus,
                           "checkpoint_seconds": checkpoint_seconds, "variants": {}}
    for variant in args.variant_list:
        slime_path = work / f"{preset}.{variant}.slime.json"
        try:
            with _variant_env(variant):
                variant_cfg = dict(cfg, flags=VARIANT_FLAGS.get(variant, []), profile=variant in args.profile_variants)
                _spawn(slime_worker, args.num_gpus, (variant_cfg, str(model_dir), _free_port(), str(slime_path)))
            slime = json.loads(slime_path.read_text())
        except Exception as exc:  # one failing variant must not lose the others' numbers
            if len(args.variant_list) == 1:
                raise
            out["variants"][variant] = {"error": f"{type(exc).__name__}: {str(exc)[-1500:]}"}
            print(f"variant {variant} failed: {exc}", file=sys.stderr, flush=True)
            continue
        achieved = slime["model_tflops_per_s_per_gpu"]
        slime["mfu_vs_measured_peak"] = achieved / peak_measured
        slime["mfu_vs_datasheet_989"] = achieved / H100_DATASHEET_BF16_TFLOPS if device == "cuda" else None
        out["variants"][variant] = slime
        print(json.dumps({preset: {variant: {k: v for k, v in slime.items() if k != "profile"}}}),
              file=sys.stderr, flush=True)
    ok = [v for v in args.variant_list if "error" not in out["variants"][v]]
    if not ok:
        raise RuntimeError(f"{preset}: every variant failed: {out['variants']}")
    out["slime_variant"] = max(ok, key=lambda name: out["variants"][name]["tokens_per_s_per_gpu"])
    slime = out["slime"] = out["variants"][out["slime_variant"]]
    out["mfu_vs_measured_peak"] = slime["mfu_vs_measured_peak"]
    out["mfu_vs_datasheet_989"] = slime["mfu_vs_datasheet_989"]
    base_path = work / f"{preset}.hf.json"
    if not args.no_baseline:
        _spawn(_single, 1, (baseline_worker, cfg, str(model_dir), str(base_path)))
        base = json.loads(base_path.read_text())
        out["hf_baseline"] = base
        if "tokens_per_s" in base:
            out["speedup_vs_hf_per_gpu"] = slime["tokens_per_s_per_gpu"] / base["tokens_per_s"]
            for result in out["variants"].values():
                if "error" not in result:
                    result["speedup_vs_hf_per_gpu"] = result["tokens_per_s_per_gpu"] / base["tokens_per_s"]
    return out


@contextlib.contextmanager
def _variant_env(variant: str) -> Iterator[None]:
    """The variant's environment for the ranks spawned inside (they copy os.environ at start)."""
    saved = {k: os.environ.get(k) for k in VARIANTS[variant]}
    try:
        for key, value in VARIANTS[variant].items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def summary_table(result: dict[str, Any]) -> str:
    """One line per preset and variant: tokens/s/GPU, model TFLOP/s/GPU, MFU, warmup (compile) time."""
    lines = [f"{'preset':<12} {'variant':<36} {'tok/s/GPU':>10} {'TFLOP/s':>8} {'MFU meas':>8} {'MFU 989':>8} "
             f"{'vs eager':>8} {'warmup s':>8} {'graphs':>6} {'breaks':>6}"]
    for preset, out in result["presets"].items():
        variants = out.get("variants", {})
        reference = next((v.get("tokens_per_s_per_gpu") for v in variants.values() if "error" not in v), None)
        if "eager" in variants and "error" not in variants["eager"]:
            reference = variants["eager"]["tokens_per_s_per_gpu"]
        for name, v in variants.items():
            if "error" in v:
                lines.append(f"{preset:<12} {name:<36} FAILED: {v['error'][-80:]}")
                continue
            mfu989 = v.get("mfu_vs_datasheet_989")
            lines.append(f"{preset:<12} {name:<36} {v['tokens_per_s_per_gpu']:>10.0f} "
                         f"{v['model_tflops_per_s_per_gpu']:>8.1f} {100 * v['mfu_vs_measured_peak']:>7.1f}% "
                         + (f"{100 * mfu989:>7.1f}% " if mfu989 is not None else f"{'-':>8} ")
                         + f"{v['tokens_per_s_per_gpu'] / reference:>7.2f}x {sum(v.get('warmup_seconds') or [0]):>8.1f} "
                         f"{v.get('compiled_graphs', 0):>6} {v.get('graph_breaks', 0):>6}")
        base = out.get("hf_baseline")
        if base and "tokens_per_s" in base:
            lines.append(f"{preset:<12} {'hf-baseline':<36} {base['tokens_per_s']:>10.0f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.alloc_conf and "PYTORCH_CUDA_ALLOC_CONF" not in os.environ:  # before CUDA starts; ranks inherit it
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = args.alloc_conf
    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    if device == "cuda" and torch.cuda.device_count() < args.num_gpus:
        raise ValueError(f"--num-gpus {args.num_gpus} but only {torch.cuda.device_count()} GPU(s) are visible")
    peak = peak_matmul_tflops(device)
    result: dict[str, Any] = {
        "benchmark": "train_throughput", "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "torch": torch.__version__, "num_gpus": args.num_gpus,
        "variants": args.variant_list, "slime_fsdp_compile_env": os.environ.get("SLIME_FSDP_COMPILE", "0"),
        "cuda_alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""), "max_tokens_per_gpu": args.max_tokens_per_gpu,
        "sample_lengths": [args.min_len, args.max_len], "samples_per_rank_per_rollout": args.samples_per_rank,
        "timed_rollouts": args.steps, "warmup_rollouts": args.warmup, "balance_data": args.balance_data,
        "measured_peak_tflops": peak, "datasheet_peak_tflops": H100_DATASHEET_BF16_TFLOPS if device == "cuda" else None,
        "peak_method": "bf16 8192^3 torch.matmul" if device == "cuda" else "fp32 512^3 torch.matmul (CPU smoke)",
        "flops_formula": FLOPS_FORMULA, "packed_attention_check": packed_attention_check(device), "presets": {},
    }
    if args.model_dir:
        os.makedirs(args.model_dir, exist_ok=True)  # a fresh folder is fine: the checkpoints go in a temp dir inside it
    with tempfile.TemporaryDirectory(dir=args.model_dir) as tmp:
        for preset in [p for p in args.presets.split(",") if p]:
            result["presets"][preset] = run_preset(preset, args, device, Path(tmp), peak)
            print(json.dumps({preset: result["presets"][preset]}, default=str), file=sys.stderr, flush=True)
    from benchmarks.report import emit_json

    emit_json(result, args.out)
    print(summary_table(result), file=sys.stderr, flush=True)
    return result


if __name__ == "__main__":
    main()
