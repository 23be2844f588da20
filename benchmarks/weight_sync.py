"""Seconds to push every weight from the trainer to the engine, per model shape and transport.

    python benchmarks/weight_sync.py --presets qwen3-0.6b,qwen3-4b --modes colocated,disk --out r.json
    python benchmarks/weight_sync.py --presets qwen3-0.6b,qwen3-4b --modes disaggregated,disk --engine-gpu 1
    python benchmarks/weight_sync.py --smoke          # CPU: tiny preset, shared memory + gloo + disk

The real path of the training loop, without Ray: an `FSDPTrainer` (1-rank group) in this process on
`--trainer-gpu`, the built-in engine server (`python -m slime.engine.server`) as a child process, and
`slime.ray.weight_sync.WeightSync.update` between them (pause, buckets of `export_weights`, resume):
- colocated: engine on the trainer's GPU, CUDA IPC handles to /update_weights_from_tensor, one packed
  buffer per bucket (the built-in engine's "flattened_bucket" format; --smoke packs on CPU too, which
  the training loop does not);
- colocated_direct (comparison): the same with SGLang's per-tensor format (one IPC handle per tensor);
- disaggregated: engine on `--engine-gpu`, /init_weights_update_group once, then per bucket one
  /update_weights_from_distributed POST while the bucket is broadcast over NCCL as one packed buffer
  per dtype (the built-in engine's "flattened_bucket" format);
- disaggregated_direct (comparison): the same, one broadcast per tensor (SGLang's form);
- disk (baseline): the trainer writes HF safetensors, the engine POSTs /update_weights_from_disk.
Checkpoints are random weights from tools/make_tiny_model.py. Before timing, each mode perturbs the
trainer's weights and checks that the engine's greedy log-probs move from far off to within
bf16 rounding of the trainer's (`compute_log_probs`), so a no-op update cannot pass. Then
`--reps` timed updates; the median is reported with bytes moved (the exported weights: bf16 on GPU;
`disk_bytes` is what the disk baseline writes) and GB/s (1e9 bytes/s), plus the median seconds per
phase of `WeightSync.last_timings` (pause, export, pack, waiting on the engine, resume).
Bounds: colocated bytes / measured device copy bandwidth; disaggregated bytes / NCCL broadcast
bandwidth measured between the same two GPUs in this run (gloo / memcpy on CPU).
Prints one JSON object (and writes it to --out); exits 1 if any mode failed its check.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

MODES = ("colocated", "colocated_direct", "disaggregated", "disaggregated_direct", "disk")
SYNC_MODE = {"colocated": "tensor", "colocated_direct": "tensor", "disaggregated": "distributed",
             "disaggregated_direct": "distributed", "disk": "disk"}
TARGET = {"preset": "qwen3-0.6b", "mode": "colocated", "seconds": 0.2}
PROMPT = [11, 57, 203, 42, 99, 150, 7, 64]
NEW_TOKENS = 8
NOISE_STD = 0.02


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="qwen3-0.6b,qwen3-4b",
                        help="comma list of tools/make_tiny_model.py presets")
    parser.add_argument("--modes", default="colocated,disk", help=f"comma list of {', '.join(MODES)}")
    parser.add_argument("--reps", type=int, default=5, help="timed updates per mode (after one checked warm-up)")
    parser.add_argument("--disk-reps", type=int, default=2, help="timed updates for the disk baseline")
    parser.add_argument("--bucket-mb", type=float, default=512.0, help="--update-weight-buffer-size in MiB")
    parser.add_argument("--trainer-gpu", type=int, default=0)
    parser.add_argument("--engine-gpu", type=int, default=1, help="the engine's GPU for disaggregated")
    parser.add_argument("--model-dir", default=os.path.join(tempfile.gettempdir(), "slime_wsync_models"),
                        help="random-weight checkpoints are made here once per preset")
    parser.add_argument("--work-dir", default=None, help="disk-transport checkpoints (default: a temp dir)")
    parser.add_argument("--tolerance", type=float, default=0.15,
                        help="largest |engine - trainer| response log-prob after a sync (or 3x the mismatch measured "
                             "with equal weights before the perturbation, if larger: 4B's bf16 kernels differ more)")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny preset, every mode, 2 reps")
    parser.add_argument("--out", default=None, help="also write the JSON object here")
    # internal: the receiving rank of broadcast_bandwidth, "port,nbytes,iters,backend"
    parser.add_argument("--broadcast-peer", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.presets, args.modes, args.reps, args.disk_reps = "tiny", ",".join(MODES), 2, 1
    args.presets = [p for p in args.presets.split(",") if p]
    args.modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in args.modes if m not in MODES]
    if unknown:
        raise ValueError(f"--modes: unknown {unknown}; choose from {MODES}")
    if args.reps < 1 or args.disk_reps < 1:
        raise ValueError("--reps and --disk-reps must be >= 1")
    args.cuda = torch.cuda.is_available() and not args.smoke
    two_gpus = torch.cuda.device_count() >= 2 and args.engine_gpu != args.trainer_gpu
    if args.cuda and any(m.startswith("disaggregated") for m in args.modes) and not two_gpus:
        raise ValueError("--modes disaggregated needs a second GPU (--engine-gpu != --trainer-gpu)")
    return args


def visible_device(gpu: int | None) -> str:
    """CUDA_VISIBLE_DEVICES for a child that should see only our device `gpu` ("" for none)."""
    if gpu is None:
        return ""
    ours = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return ours[gpu] if ours else str(gpu)


# ---- bandwidth bounds ---------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Bytes copied per second by one tensor copy on `device` (each byte read once, written once)."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for i in range(13):
        _sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        if i >= 3:
            times.append(time.perf_counter() - start)
    return nbytes / statistics.median(times)


def broadcast_bandwidth(device: torch.device, peer_gpu: int | None, nbytes: int, iters: int = 10) -> float:
    """Bytes per second of one broadcast from this process to a peer process (on `peer_gpu`), over a
    2-rank group made by the same `init_weights_update_group` the weight sync uses."""
    from slime.engine.weight_transport import broadcast_tensors, destroy, init_weights_update_group
    from slime.ray.train_group import free_port

    backend = "nccl" if device.type == "cuda" else "gloo"
    port = free_port()
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=visible_device(peer_gpu))
    peer = subprocess.Popen([sys.executable, __file__, "--broadcast-peer", f"{port},{nbytes},{iters + 2},{backend}"],
                            env=env)
    try:
        group = init_weights_update_group("127.0.0.1", port, 0, 2, "bandwidth", backend, timeout_s=120, device=device)
        buffer = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
        times = []
        for i in range(iters + 2):
            _sync(device)
            start = time.perf_counter()
            broadcast_tensors(group, [buffer], src=0)
            _sync(device)
            if i >= 2:
                times.append(time.perf_counter() - start)
        destroy(group)
        if peer.wait(timeout=120) != 0:
            raise RuntimeError(f"broadcast peer exited with code {peer.returncode}")
    finally:
        if peer.poll() is None:
            peer.kill()
    return nbytes / statistics.median(times)


def _broadcast_peer(spec: str) -> None:
    from slime.engine.weight_transport import broadcast_tensors, destroy, init_weights_update_group

    port, nbytes, iters, backend = spec.split(",")
    device = torch.device("cuda", 0) if backend == "nccl" else torch.device("cpu")
    group = init_weights_update_group("127.0.0.1", int(port), 1, 2, "bandwidth", backend, timeout_s=120, device=device)
    buffer = torch.empty(int(nbytes), dtype=torch.uint8, device=device)
    for _ in range(int(iters)):
        broadcast_tensors(group, [buffer], src=0)
    _sync(device)
    destroy(group)


# ---- trainer, engine, check ---------------------------------------------------------------------
def make_checkpoint(preset: str, model_dir: str, cuda: bool) -> str:
    from tools.make_tiny_model import make_model

    path = Path(model_dir) / preset
    if not (path / "slime_preset.json").exists():
        dtype = "bfloat16" if cuda else "float32"
        make_model(preset, path, seed=0, dtype=dtype, device="cuda" if cuda else "cpu")
    return str(path)


def make_trainer(checkpoint: str, bench: argparse.Namespace, disk_dir: str) -> Any:
    from slime.backends.fsdp.trainer import FSDPTrainer
    from slime.utils.arguments import parse_args as slime_args

    args = slime_args(["--hf-checkpoint", checkpoint, "--rollout-batch-size", "1", "--n-samples-per-prompt", "1",
                       "--actor-num-gpus-per-node", "1", "--num-rollout", "1",
                       "--update-weight-buffer-size", str(int(bench.bucket_mb * 1024 ** 2)),
                       "--update-weight-disk-dir", disk_dir])
    args.device = "cuda" if bench.cuda else "cpu"
    args.rollout_backend = "builtin"
    trainer = FSDPTrainer(args)
    trainer.init()
    return trainer


def start_engine(checkpoint: str, gpu: int | None) -> Any:
    from slime.ray.engine_process import ServerProcess
    from slime.ray.train_group import free_port

    port = free_port()
    argv = [sys.executable, "-m", "slime.engine.server", "--model-path", checkpoint, "--port", str(port),
            "--host", "127.0.0.1", "--device", "cuda" if gpu is not None else "cpu", "--max-total-tokens", "4096",
            "--max-running-requests", "8", "--weight-version", "0", "--log-level", "warning"]
    proc = ServerProcess(argv, f"http://127.0.0.1:{port}", f"engine gpu{gpu}",
                         env={"CUDA_VISIBLE_DEVICES": visible_device(gpu)})
    proc.start()
    proc.wait_healthy(timeout_s=600)
    return proc


def perturb(trainer: Any, seed: int) -> None:
    """Add N(0, NOISE_STD) to every parameter shard, so the engine holds stale weights until synced."""
    from torch.distributed.tensor import DTensor

    generators: dict[torch.device, torch.Generator] = {}
    with torch.no_grad():
        for param in trainer.model.parameters():
            local = param.to_local() if isinstance(param, DTensor) else param
            if local.device not in generators:  # noise made where the shard lives (4B on CPU would take a minute)
                generators[local.device] = torch.Generator(device=local.device).manual_seed(seed)
            noise = torch.randn(local.shape, generator=generators[local.device], dtype=torch.float32,
                                device=local.device)
            local.add_(noise.mul_(NOISE_STD).to(local.dtype))


def logprob_mismatch(trainer: Any, url: str) -> float:
    """Largest |engine - trainer| log-prob over the engine's greedy continuation of PROMPT."""
    r = httpx.post(f"{url}/generate", json={
        "input_ids": PROMPT, "return_logprob": True,
        "sampling_params": {"temperature": 0, "max_new_tokens": NEW_TOKENS, "ignore_eos": True}}, timeout=300)
    r.raise_for_status()
    out = r.json()
    ids = [int(i) for i in out["output_ids"]]
    engine_lp = torch.tensor([float(p[0]) for p in out["meta_info"]["output_token_logprobs"]])
    data = {"tokens": [PROMPT + ids], "response_lengths": [len(ids)], "loss_masks": [[1] * len(ids)], "rewards": [0.0]}
    trainer_lp = trainer.compute_log_probs(data)[0].float()
    return float((engine_lp - trainer_lp).abs().max())


def export_stats(trainer: Any) -> dict[str, int]:
    tensors = buckets = nbytes = 0
    for bucket in trainer.export_weights(trainer.args.update_weight_buffer_size):
        buckets += 1
        for _, t in bucket:
            tensors += 1
            nbytes += t.numel() * t.element_size()
    return {"bytes": nbytes, "num_tensors": tensors, "num_buckets": buckets}


# ---- one (preset, mode) -------------------------------------------------------------------------
def run_mode(trainer: Any, engine_url: str, mode: str, reps: int, tolerance: float, seed: int,
             disk_dir: str, smoke: bool) -> dict[str, Any]:
    from slime.ray.weight_sync import WeightSync, check_engine_versions

    sync = WeightSync(trainer.args, 0, SYNC_MODE[mode])
    if mode in ("colocated_direct", "disaggregated_direct"):
        sync.flatten = False
    elif smoke:  # exercise the packed format end to end on CPU
        sync.flatten = True
    flattened = bool(sync.flatten) or (sync.flatten is None and trainer.device == "cuda")
    if SYNC_MODE[mode] == "distributed":
        flattened = sync.flatten is not False
    engines = [{"url": engine_url, "tp_size": 1}]
    try:
        floor = logprob_mismatch(trainer, engine_url)  # same weights on both sides: the kernels' own disagreement
        perturb(trainer, seed)
        before = logprob_mismatch(trainer, engine_url)
        trainer.weight_version += 1
        start = time.perf_counter()
        sync.update(trainer, engines)  # the checked warm-up (for distributed it also forms the group)
        first_s = time.perf_counter() - start
        check_engine_versions([engine_url], trainer.weight_version)
        written = sum(f.stat().st_size for f in Path(disk_dir).rglob("*") if f.is_file())
        after = logprob_mismatch(trainer, engine_url)
        limit = max(tolerance, 3 * floor)
        verified = after <= limit and after < before / 4
        if not verified:  # still timed and reported; main() exits 1
            print(f"{mode}: after the sync the engine's log-probs differ from the trainer's by {after:.4g} "
                  f"(before: {before:.4g}; with equal weights {floor:.4g}; limit {limit:.4g}); the weights did not "
                  "arrive", file=sys.stderr)
        seconds, phases = [], []
        for _ in range(reps):
            _clear_disk_dir(disk_dir)
            trainer.weight_version += 1
            if trainer.device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            sync.update(trainer, engines)
            seconds.append(time.perf_counter() - start)
            phases.append(dict(sync.last_timings))
        check_engine_versions([engine_url], trainer.weight_version)
    finally:
        sync.close()
        _clear_disk_dir(disk_dir)
    phase_median = {k: statistics.median(p.get(k, 0.0) for p in phases) for k in phases[0]}
    return {"seconds": statistics.median(seconds), "seconds_all": seconds, "first_update_s": first_s,
            "phases_median_s": phase_median, "logprob_mismatch_equal_weights": floor,
            "logprob_mismatch_before": before, "logprob_mismatch_after": after,
            "verified": verified, "flattened": flattened if mode != "disk" else None,
            **({"disk_bytes": written} if mode == "disk" else {})}


def _clear_disk_dir(disk_dir: str) -> None:
    for child in Path(disk_dir).glob("weights_v*"):
        shutil.rmtree(child, ignore_errors=True)


def run_preset(preset: str, bench: argparse.Namespace, bounds: dict[str, float], disk_dir: str) -> list[dict[str, Any]]:
    checkpoint = make_checkpoint(preset, bench.model_dir, bench.cuda)
    placements: dict[str, int | None] = {}
    for mode in bench.modes:
        if not bench.cuda:
            placements[mode] = None
        elif SYNC_MODE[mode] == "distributed" or (mode == "disk" and "distributed" in map(SYNC_MODE.get, bench.modes)):
            placements[mode] = bench.engine_gpu
        else:
            placements[mode] = bench.trainer_gpu
    engines: dict[int | None, Any] = {}
    results = []
    trainer = make_trainer(checkpoint, bench, disk_dir)
    try:
        stats = export_stats(trainer)
        for i, mode in enumerate(bench.modes):
            gpu = placements[mode]
            if gpu not in engines:
                engines[gpu] = start_engine(checkpoint, gpu)
            reps = bench.disk_reps if mode == "disk" else bench.reps
            row = {"preset": preset, "mode": mode, "transport": SYNC_MODE[mode], "trainer_gpu": bench.trainer_gpu,
                   "engine_gpu": gpu, "bucket_bytes": int(trainer.args.update_weight_buffer_size), **stats}
            row.update(run_mode(trainer, engines[gpu].url, mode, reps, bench.tolerance, seed=1000 + i,
                                disk_dir=disk_dir, smoke=bench.smoke))
            row["GBps"] = stats["bytes"] / row["seconds"] / 1e9
            bound = bounds.get("broadcast" if SYNC_MODE[mode] == "distributed" else "copy" if mode != "disk" else "")
            if bound:
                row["bound_seconds"] = stats["bytes"] / bound
                row["fraction_of_bound"] = row["bound_seconds"] / row["seconds"]
            results.append(row)
            print(json.dumps({k: row[k] for k in ("preset", "mode", "seconds", "GBps", "bytes")}), file=sys.stderr)
    finally:
        for proc in engines.values():
            proc.stop()
        del trainer
        gc.collect()
        if bench.cuda:
            torch.cuda.empty_cache()
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    bench = parse_args(argv)
    if bench.broadcast_peer:
        _broadcast_peer(bench.broadcast_peer)
        return {}
    device = torch.device("cuda", bench.trainer_gpu) if bench.cuda else torch.device("cpu")
    if bench.cuda:
        torch.cuda.set_device(device)
    probe = (1 << 30) if bench.cuda else (64 << 20)
    bounds = {"copy": copy_bandwidth(device, probe)}
    if any(SYNC_MODE[m] == "distributed" for m in bench.modes):
        bounds["broadcast"] = broadcast_bandwidth(device, bench.engine_gpu if bench.cuda else None, probe)
    work = bench.work_dir or tempfile.mkdtemp(prefix="slime_wsync_")
    disk_dir = os.path.join(work, "disk")
    os.makedirs(disk_dir, exist_ok=True)
    results = []
    for preset in bench.presets:
        results.extend(run_preset(preset, bench, bounds, disk_dir))
    target = next((r for r in results if r["preset"] == TARGET["preset"] and r["mode"] == TARGET["mode"]), None)
    report = {
        "benchmark": "weight_sync",
        "device": torch.cuda.get_device_name(device) if bench.cuda else "cpu",
        "num_gpus": torch.cuda.device_count() if bench.cuda else 0,
        "torch": torch.__version__,
        "smoke": bench.smoke,
        "reps": bench.reps, "disk_reps": bench.disk_reps,
        "copy_bandwidth_GBps": bounds["copy"] / 1e9,
        "broadcast_bandwidth_GBps": bounds["broadcast"] / 1e9 if "broadcast" in bounds else None,
        "all_verified": all(r["verified"] for r in results),
        "results": results,
        "target": dict(TARGET, measured=target["seconds"] if target else None,
                       met=(target["seconds"] < TARGET["seconds"]) if target and bench.cuda else None),
    }
    if bench.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    from benchmarks.report import emit_json

    return emit_json(report, bench.out)


if __name__ == "__main__":
    sys.exit(0 if main().get("all_verified", True) else 1)
