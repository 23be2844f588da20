"""Host overhead of the HTTP path: the same requests through `/generate` and through `LLMEngine.generate` offline.

    python benchmarks/server_overhead.py                                   # CPU, makes the `tiny` preset
    python benchmarks/server_overhead.py --device cuda --model DIR --num-prompts 32 --samples 8 \
        --max-new-tokens 128 --out server_overhead.json                    # the rollout shape, on a GPU

Both runs generate `--num-prompts` x `--samples` sequences of exactly `--max-new-tokens` tokens (EOS
ignored, temperature 1). Offline: `LLMEngine.generate` in this process. Server: a `python -m
slime.engine.server` subprocess (same engine flags), the requests sent all at once as the rollout does
(`slime.utils.http_utils.post`, one `/generate` per sample with `input_ids` and `return_logprob`; with
`--grouped` one batched `/generate` per prompt's samples, as `--rollout-group-requests` sends them).
Both are warmed up first. Reports wall seconds of each, their ratio, engine steps and milliseconds per
step, the server's time inside `engine.step()` (from `/get_server_info`), and per_step_host_ms: the
server's extra milliseconds per step over the offline engine. Prints one JSON object (`--out` writes it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run as a script from anywhere


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint dir (default: make --preset in a temp dir)")
    parser.add_argument("--preset", default="tiny", help="tools/make_tiny_model.py preset when --model is not given")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=24)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--context-length", type=int, default=1024)
    parser.add_argument("--mem-fraction-static", type=float, default=0.5, help="GPU only")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each side; the best is reported")
    parser.add_argument("--via-router", action="store_true",
                        help="also time the requests through the fallback router (slime.ray.router) in front")
    parser.add_argument("--server-args", default="", help="extra engine server flags, e.g. '--prefill-wait-ratio 0'")
    parser.add_argument("--client-shards", type=int, default=None,
                        help="httpx pools of the client (slime.utils.http_utils; 1 = one pool, as before the fix)")
    parser.add_argument("--grouped", action="store_true",
                        help="one batched /generate per prompt's --samples (the rollout's --rollout-group-requests)")
    parser.add_argument("--profile", action="store_true",
                        help="add a cProfile of one more offline run (own time per engine step) under offline_profile")
    parser.add_argument("--out", default=None)
    return parser.parse_args(argv)


def make_prompts(args: argparse.Namespace, vocab_limit: int) -> list[list[int]]:
    rng = random.Random(0)
    prompts = [[rng.randrange(3, vocab_limit) for _ in range(args.prompt_len)] for _ in range(args.num_prompts)]
    return [p for p in prompts for _ in range(args.samples)]


def sampling(args: argparse.Namespace) -> dict[str, Any]:
    """What the rollout sends (slime.rollout.generate.base_sampling_params), EOS ignored for a fixed length."""
    return {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "max_new_tokens": args.max_new_tokens,
            "skip_special_tokens": False, "no_stop_trim": True, "spaces_between_special_tokens": False,
            "ignore_eos": True}


def engine_flags(args: argparse.Namespace, num_seqs: int) -> dict[str, Any]:
    flags: dict[str, Any] = {"context_length": args.context_length, "max_num_seqs": max(256, num_seqs),
                             "overlap_schedule": "--enable-overlap-schedule" in args.server_args.split()}
    if args.device == "cpu":
        flags["kv_cache_tokens"] = num_seqs * (args.prompt_len + args.max_new_tokens + 32)
    else:
        flags["mem_fraction_static"] = args.mem_fraction_static
    return flags


def run_offline(args: argparse.Namespace, prompts: list[list[int]]) -> dict[str, Any]:
    from slime.engine.config import EngineConfig
    from slime.engine.llm_engine import LLMEngine
    from slime.engine.sampling_params import SamplingParams

    engine = LLMEngine(EngineConfig(args.model, device=args.device, **engine_flags(args, len(prompts))))
    steps = [0]
    step = engine.step

    def counted_step():
        steps[0] += 1
        return step()

    engine.step = counted_step  # type: ignore[method-assign]
    params = {k: v for k, v in sampling(args).items() if k in ("temperature", "top_p", "top_k", "max_new_tokens",
                                                                "ignore_eos")}
    engine.generate(prompts[:8], SamplingParams(**{**params, "max_new_tokens": 4}))  # warm-up
    best: dict[str, Any] | None = None
    for _ in range(args.repeats):
        steps[0] = 0
        _sync(args.device)
        started = time.perf_counter()
        results = engine.generate(prompts, SamplingParams(**params))
        _sync(args.device)
        seconds = time.perf_counter() - started
        tokens = sum(len(r["token_ids"]) for r in results)
        if best is None or seconds < best["seconds"]:
            best = {"seconds": seconds, "steps": steps[0], "tokens": tokens}
    if args.profile:
        best["profile_top"] = profile_top(lambda: engine.generate(prompts, SamplingParams(**params)), steps)
        if args.device.startswith("cuda"):
            best["kernels_top"] = kernels_top(lambda: engine.generate(prompts, SamplingParams(**params)), steps)
    del engine.step  # the counting wrapper holds the bound method, and so the engine and its KV cache
    engine.close()
    return best


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def profile_top(run: Any, steps: list[int], limit: int = 30) -> list[dict[str, Any]]:
    """cProfile of one more offline run: the functions with the most own time, in microseconds per engine step."""
    import cProfile
    import pstats

    steps[0] = 0
    profiler = cProfile.Profile()
    profiler.runcall(run)
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:limit]
    per_step = max(1, steps[0])
    return [{"function": f"{Path(file).name}:{line}({name})", "calls_per_step": round(calls / per_step, 2),
             "own_us_per_step": round(1e6 * own / per_step, 1), "cum_us_per_step": round(1e6 * cum / per_step, 1)}
            for (file, line, name), (_, calls, own, cum, _) in rows]


def kernels_top(run: Any, steps: list[int], limit: int = 15) -> dict[str, Any]:
    """torch.profiler of one more offline run: GPU time per engine step, and the kernels that take it."""
    from torch.profiler import ProfilerActivity, profile

    steps[0] = 0
    started = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run()
    wall = time.perf_counter() - started
    per_step = max(1, steps[0])
    events = [e for e in prof.key_averages() if e.self_device_time_total > 0]
    events.sort(key=lambda e: -e.self_device_time_total)
    gpu_us = sum(e.self_device_time_total for e in events)
    return {"profiled_wall_ms_per_step": round(1000 * wall / per_step, 3),
            "gpu_busy_ms_per_step": round(gpu_us / 1000 / per_step, 3),
            "kernels": [{"name": e.key[:80], "calls_per_step": round(e.count / per_step, 2),
                         "us_per_step": round(e.self_device_time_total / per_step, 1)} for e in events[:limit]]}


def start_server(args: argparse.Namespace, num_seqs: int) -> tuple[subprocess.Popen, str, Any]:
    port = free_port()
    flags = engine_flags(args, num_seqs)
    argv = [sys.executable, "-m", "slime.engine.server", "--model-path", args.model, "--port", str(port),
            "--device", args.device, "--context-length", str(flags["context_length"]),
            "--max-running-requests", str(flags["max_num_seqs"]), "--log-level", "warning", *args.server_args.split()]
    if "kv_cache_tokens" in flags:
        argv += ["--max-total-tokens", str(flags["kv_cache_tokens"])]
    else:
        argv += ["--mem-fraction-static", str(flags["mem_fraction_static"])]
    log = tempfile.NamedTemporaryFile("w+", prefix="server-overhead-", suffix=".log", delete=False)  # noqa: SIM115
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(proc, url, "engine server")
    except RuntimeError as e:
        raise RuntimeError(f"{e}:\n{Path(log.name).read_text()}") from e
    return proc, url, log


async def fire(url: str, prompts: list[list[int]], params: dict[str, Any], group_size: int = 1) -> tuple[float, int]:
    """All requests at once: one per sample, or (group_size > 1) one batched request per group of prompts."""
    from slime.utils.http_utils import post

    bodies = [{"input_ids": prompts[i] if group_size == 1 else prompts[i:i + group_size],
               "sampling_params": dict(params), "return_logprob": True} for i in range(0, len(prompts), group_size)]
    started = time.perf_counter()
    answers = await asyncio.gather(*(post(url + "/generate", body, max_retries=1) for body in bodies))
    seconds = time.perf_counter() - started
    flat = [a for answer in answers for a in (answer if isinstance(answer, list) else [answer])]
    assert len(flat) == len(prompts), f"{len(flat)} answers for {len(prompts)} prompts"
    tokens = sum(len(a["meta_info"]["output_token_logprobs"]) for a in flat)
    return seconds, tokens


def engine_counters(url: str) -> tuple[int, float]:
    import httpx

    state = httpx.get(url + "/get_server_info", timeout=30).json()["internal_states"][0]
    return int(state["num_steps"]), float(state.get("step_seconds", 0.0))


def run_server(args: argparse.Namespace, prompts: list[list[int]]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(direct to the engine server, through the router or None)."""
    proc, url, log = start_server(args, len(prompts))
    router = None
    try:
        direct = asyncio.run(_timed_server_runs(args, url, url, prompts))
        if not args.via_router:
            return direct, None
        port = free_port()
        router = subprocess.Popen([sys.executable, "-m", "slime.ray.router", "--port", str(port), "--worker-urls", url,
                                   "--health-check-interval", "0"], cwd=REPO_ROOT)
        router_url = f"http://127.0.0.1:{port}"
        _wait_healthy(router, router_url, "router")
        return direct, asyncio.run(_timed_server_runs(args, router_url, url, prompts))
    finally:
        for p in (router, proc):
            if p is None:
                continue
            p.terminate()
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        log.close()
        os.unlink(log.name)


def _wait_healthy(proc: subprocess.Popen, url: str, what: str, timeout: float = 600.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{what} not healthy after {timeout} s")


async def _timed_server_runs(args: argparse.Namespace, url: str, engine_url: str,
                             prompts: list[list[int]]) -> dict[str, Any]:
    """All in one loop, as the rollout's persistent loop: the client's connection pools are warm."""
    await fire(url, prompts, {**sampling(args), "max_new_tokens": 4})  # warm-up, opens every connection
    best: dict[str, Any] | None = None
    for _ in range(args.repeats):
        steps0, step_s0 = await asyncio.to_thread(engine_counters, engine_url)
        seconds, tokens = await fire(url, prompts, sampling(args), args.samples if args.grouped else 1)
        steps1, step_s1 = await asyncio.to_thread(engine_counters, engine_url)
        if best is None or seconds < best["seconds"]:
            best = {"seconds": seconds, "steps": steps1 - steps0, "tokens": tokens, "in_step_seconds": step_s1 - step_s0}
    return best


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.client_shards is not None:
        from slime.utils import http_utils

        http_utils._CLIENT_SHARDS = args.client_shards
    if args.model is None:
        from tools.make_tiny_model import make_model

        args.model = str(make_model(args.preset, tempfile.mkdtemp(prefix="server-overhead-model-"), seed=0))
    with open(os.path.join(args.model, "config.json")) as f:
        vocab = int(json.load(f)["vocab_size"])
    prompts = make_prompts(args, min(vocab, 250))  # ids the byte-level tokenizer knows
    server, routed = run_server(args, prompts)  # first: the server's process gives all its GPU memory back
    offline = run_offline(args, prompts)
    off_ms = 1000 * offline["seconds"] / max(1, offline["steps"])
    srv_ms = 1000 * server["seconds"] / max(1, server["steps"])
    result = {
        "device": args.device, "model": args.model, "server_args": args.server_args, "requests": len(prompts),
        "grouped": args.grouped, "max_new_tokens": args.max_new_tokens,
        "offline_seconds": round(offline["seconds"], 4), "server_seconds": round(server["seconds"], 4),
        "ratio": round(server["seconds"] / offline["seconds"], 3),
        "offline_steps": offline["steps"], "server_steps": server["steps"],
        "offline_ms_per_step": round(off_ms, 3), "server_ms_per_step": round(srv_ms, 3),
        "server_in_step_ms_per_step": round(1000 * server["in_step_seconds"] / max(1, server["steps"]), 3),
        "per_step_host_ms": round(srv_ms - off_ms, 3),
        "offline_tokens_per_s": round(offline["tokens"] / offline["seconds"], 1),
        "server_tokens_per_s": round(server["tokens"] / server["seconds"], 1),
    }
    if "profile_top" in offline:
        result["offline_profile"] = offline["profile_top"]
    if "kernels_top" in offline:
        result["offline_kernels"] = offline["kernels_top"]
    if routed is not None:
        result["router_seconds"] = round(routed["seconds"], 4)
        result["router_steps"] = routed["steps"]
        result["router_ratio"] = round(routed["seconds"] / offline["seconds"], 3)
    from benchmarks.report import emit_json

    return emit_json(result, args.out)


if __name__ == "__main__":
    main()
