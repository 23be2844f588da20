"""Flags of the built-in engine server, named after `sglang.launch_server`'s, and their mapping onto EngineConfig.

    from slime.engine.server_args import parse_server_args, engine_config_kwargs
    config = EngineConfig(**engine_config_kwargs(parse_server_args(["--model-path", DIR, "--tp-size", "2"])))
"""

from __future__ import annotations

import argparse
from typing import Any


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m slime.engine.server",
                                     description="Serve a Hugging Face checkpoint with the built-in engine (SGLang HTTP API).")
    parser.add_argument("--model-path", required=True, help="Hugging Face checkpoint directory.")
    parser.add_argument("--tokenizer-path", default=None, help="Tokenizer directory (default: --model-path).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--dtype", default="auto", help="auto (CPU: float32; GPU: the checkpoint's, bfloat16 for a "
                        "float32 one), float32, bfloat16 or float16.")
    parser.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available).")
    parser.add_argument("--mem-fraction-static", type=float, default=None)
    parser.add_argument("--context-length", type=int, default=None)
    parser.add_argument("--max-running-requests", type=int, default=None)
    parser.add_argument("--max-total-tokens", type=int, default=None, help="KV-cache size in tokens.")
    parser.add_argument("--max-prefill-tokens", type=int, default=None, help="Most tokens in one prefill batch.")
    parser.add_argument("--chunked-prefill-size", type=int, default=None,
                        help="Taken as the prefill token budget when --max-prefill-tokens is not given; -1: off.")
    parser.add_argument("--page-size", type=int, default=None, help="Tokens per KV-cache block.")
    parser.add_argument("--random-seed", type=int, default=None)
    parser.add_argument("--disable-cuda-graph", action="store_true")
    parser.add_argument("--enable-overlap-schedule", action="store_true",
                        help="enqueue each decode step before the previous one's tokens reach the host (tp 1; the "
                             "default on CUDA at tp 1, this also turns it on for CPU)")
    parser.add_argument("--disable-overlap-schedule", action="store_true",
                        help="decode step by step (the host waits for each step's tokens)")
    parser.add_argument("--skip-server-warmup", action="store_true",
                        help="GPU: do not compile the kernels and capture the decode graphs before serving "
                             "(the first requests then pay for it).")
    parser.add_argument("--cuda-graph-max-bs", type=int, default=None, help="Accepted for SGLang compatibility.")
    parser.add_argument("--enable-memory-saver", action="store_true",
                        help="Accepted; release/resume of memory is always available.")
    parser.add_argument("--disable-radix-cache", action="store_true", help="Accepted for SGLang compatibility.")
    parser.add_argument("--tp-size", type=int, default=1)
    parser.add_argument("--trust-remote-code", action="store_true", help="Accepted for SGLang compatibility.")
    parser.add_argument("--skip-tokenizer-init", action="store_true", help="Token ids only; no text in or out.")
    parser.add_argument("--weight-version", default="default", help="Initial weight version string.")
    parser.add_argument("--prefill-wait-ratio", type=float, default=0.5,
                        help="While a batch decodes, admit waiting requests once they are this many x the running "
                             "ones (or after --prefill-max-wait-steps); 0 admits at every step (slime only).")
    parser.add_argument("--prefill-max-wait-steps", type=int, default=8,
                        help="Most decode steps a waiting request is held back by --prefill-wait-ratio (slime only).")
    parser.add_argument("--gil-switch-interval-ms", type=float, default=1.0,
                        help="sys.setswitchinterval of the server process, in ms (slime only; Python's default is 5).")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error", "critical"])
    return parser


def parse_server_args(argv: list[str]) -> argparse.Namespace:
    """Parse flags; a flag the built-in engine does not know exits 2 naming it."""
    parser = build_arg_parser()
    args, unknown = parser.parse_known_args(argv)
    flags = [token.split("=", 1)[0] for token in unknown if token.startswith("-")]
    if unknown:
        shown = flags[0] if flags else unknown[0]
        parser.error(f"{shown!r} is not understood by the built-in engine "
                     f"(remove it, or use --rollout-backend sglang for a real SGLang server)")
    return args


def engine_config_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Map SGLang-style flags onto EngineConfig fields (unset flags keep the engine's defaults)."""
    import torch

    prefill = args.max_prefill_tokens
    if prefill is None and args.chunked_prefill_size is not None and args.chunked_prefill_size > 0:
        prefill = args.chunked_prefill_size
    kwargs: dict[str, Any] = {
        "model_path": args.model_path,
        "dtype": None if args.dtype == "auto" else args.dtype,
        "device": args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
        "mem_fraction_static": args.mem_fraction_static, "context_length": args.context_length,
        "max_num_seqs": args.max_running_requests, "kv_cache_tokens": args.max_total_tokens,
        "max_num_batched_tokens": prefill, "block_size": args.page_size, "seed": args.random_seed,
        "enforce_eager": args.disable_cuda_graph or None, "tp_size": args.tp_size,
        "overlap_schedule": _overlap_choice(args),
    }
    return {k: v for k, v in kwargs.items() if v is not None}


def _overlap_choice(args: argparse.Namespace) -> bool | None:
    if args.enable_overlap_schedule and args.disable_overlap_schedule:
        raise ValueError("--enable-overlap-schedule and --disable-overlap-schedule contradict each other")
    if args.enable_overlap_schedule or args.disable_overlap_schedule:
        return bool(args.enable_overlap_schedule)
    return None
