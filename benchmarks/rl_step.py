"""GRPO step benchmark: a Qwen3-0.6B-shaped model, SFT-warmed, then GRPO on the synthetic arithmetic task.

    python benchmarks/rl_step.py --mode colocated --workdir /tmp/rl --out rl_step_colocated.json        # 1 GPU
    python benchmarks/rl_step.py --mode disaggregated --workdir /tmp/rl --out rl_step_disagg.json      # 2 GPUs
    python benchmarks/rl_step.py --mode fsdp4 --workdir /tmp/rl --out rl_step_fsdp4.json               # 4 GPUs
    python benchmarks/rl_step.py --smoke --workdir /tmp/rl_smoke                                       # CPU, seconds

Everything runs through the real loop (`slime.train_loop.run`: Ray, the FSDP trainer, the built-in engine):
1. `tools/make_tiny_model.py --preset qwen3-0.6b` (random weights, the real 151,936-row vocabulary, the tiny
   byte-level tokenizer: ids past the tokenizer are valid model inputs, they are just never sampled after SFT);
2. the synthetic arithmetic task (`slime.data.synthetic`): SFT conversations ask "3+4=", RL prompts ask "3 + 4 =";
3. an SFT warm-up on one GPU (the quickstart's SFT stage; skipped with --sft-model DIR, e.g. a previous run's
   `<workdir>/sft_model`), so that GRPO starts from a model that knows the answer format and rewards move;
4. GRPO steps, each reported as one row: rollout, log-prob (old log-probs, a no-grad forward inside the train
   call), train (total of the train call, log-prob included) and weight-sync seconds, colocated memory hand-over
   seconds, rollout tokens/s (generated tokens / rollout seconds), train tokens/s (prompt + response tokens / train
   seconds), the trainer's peak torch memory and every GPU's peak used memory (nvidia-smi, polled).

Modes: `colocated` - 1 GPU, trainer and engine share it (weights by CUDA IPC); by default both stay resident
(`--no-offload-train --no-offload-rollout`, the engine's KV cache capped by --engine-mem-fraction) because a
0.6B model, its Adam state and the engine fit on one GPU; --offload benchmarks the offload/onload path instead.
`disaggregated` - 2 GPUs: 1 trainer + 1 engine, weights by NCCL broadcast. `fsdp4` - 4 GPUs: FSDP over 4 train
ranks, colocated with 4 engines (one per GPU, weights by CUDA IPC), same per-step global batch.
Prints one JSON object (`--out` also writes it): settings, per-step rows and a summary (median step time, reward
of the first and last steps, peaks).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run as a script from anywhere

MODES = ("colocated", "disaggregated", "fsdp4")
ROW_METRICS = {  # row key -> metric logged by slime.train_loop
    "rollout_s": "time/rollout_total", "train_s": "time/train", "log_prob_s": "train/log_probs_time_s",
    "weight_sync_s": "time/update_weights", "onload_s": "time/onload", "offload_s": "time/offload",
    "rollout_tokens_per_s": "rollout/tokens_per_s", "train_tokens_per_s": "train/tokens_per_s",
    "reward": "rollout/reward_mean", "response_len": "rollout/response_len_mean",
    "trainer_peak_allocated_gb": "perf/trainer_peak_allocated_gb",
    "trainer_peak_reserved_gb": "perf/trainer_peak_reserved_gb", "grad_norm": "train/grad_norm",
    "engine_busy_s": "time/engine_busy", "engine_steps": "rollout/engine_steps",
    "logprob_abs_diff": "train/train_rollout_logprob_abs_diff", "entropy": "train/entropy_loss",
    "critic_train_s": "time/critic_train", "critic_value_loss": "critic/value_loss",  # PPO (--extra-args)
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=MODES, default="colocated")
    p.add_argument("--workdir", required=True, help="folder for the models, data and metrics of this run")
    p.add_argument("--out", default=None, help="also write the JSON object here")
    p.add_argument("--smoke", action="store_true", help="CPU check: tiny preset, a few steps, small batches")
    p.add_argument("--preset", default="qwen3-0.6b", help="tools/make_tiny_model.py preset")
    p.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("task")
    g.add_argument("--task-seed", type=int, default=None,
                   help="seed of the task's problems (default: --seed); fixed, --seed varies only the run")
    g.add_argument("--max-operand", type=int, default=20)
    g.add_argument("--ops", default="+")
    g.add_argument("--n-train", type=int, default=400)
    g.add_argument("--answer-style", default="worked", choices=("short", "worked"),
                   help="worked: SFT answers count up step by step, then 'Answer: N' (~30-100 response tokens)")
    g.add_argument("--sft-prompt-format", default="{a}{op}{b}=")
    g.add_argument("--rl-prompt-format", default="{a}{op}{b}=",
                   help="RL phrasing (SFT never sees it unless both formats are equal)")
    g = p.add_argument_group("SFT warm-up")
    g.add_argument("--sft-model", default=None, help="start GRPO from this HF checkpoint (no SFT stage)")
    g.add_argument("--sft-steps", type=int, default=120,
                   help="with --lr 2e-5, rewards rise (0.22 -> 0.3-0.4 in 10-20 steps); 60 steps at 5e-5 collapsed")
    g.add_argument("--sft-batch-size", type=int, default=64)
    g.add_argument("--sft-lr", type=float, default=3e-4)
    g = p.add_argument_group("GRPO (vs_trl.py passes the same values to TRL)")
    g.add_argument("--num-steps", type=int, default=20, help="GRPO rollouts (one optimizer step each)")
    g.add_argument("--rollout-batch-size", type=int, default=32, help="prompts per step")
    g.add_argument("--n-samples-per-prompt", type=int, default=8)
    g.add_argument("--max-response-len", type=int, default=128)
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--lr", type=float, default=2e-5)
    g.add_argument("--max-tokens-per-gpu", type=int, default=4096, help="dynamic micro-batch token budget")
    g = p.add_argument_group("placement")
    g.add_argument("--offload", action="store_true", help="colocated modes: offload trainer/engine between phases")
    g.add_argument("--engine-mem-fraction", type=float, default=None,
                   help="--sglang-mem-fraction-static (default 0.3 colocated without offload, else the engine's)")
    g.add_argument("--save-final-model", default=None,
                   help="after the last step (outside its timing) write the trained policy here (HF checkpoint)")
    g.add_argument("--extra-args", default="", help="more train.py flags for the GRPO run, one string")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    o = build_parser().parse_args(argv)
    if o.smoke:  # small enough for a CPU test; explicit values for what the smoke run needs
        o.preset, o.n_train, o.max_operand = "tiny", 16, 9  # any --mode: CPU processes stand in for GPUs
        o.sft_steps, o.sft_batch_size, o.sft_lr = 2, 8, 1e-3
        o.num_steps, o.rollout_batch_size, o.n_samples_per_prompt, o.max_response_len = 2, 4, 2, 4
        o.max_tokens_per_gpu = 1024
    if o.task_seed is None:
        o.task_seed = o.seed
    if o.num_steps < 1 or o.rollout_batch_size < 1 or o.n_samples_per_prompt < 2:
        raise ValueError("--num-steps and --rollout-batch-size must be >= 1, --n-samples-per-prompt >= 2 (GRPO)")
    return o


def check_gpus(mode: str) -> None:
    """Fail early when the host has GPUs but fewer than the mode needs (no GPU at all: a CPU run, as --smoke)."""
    need = {"colocated": 1, "disaggregated": 2, "fsdp4": 4}[mode]
    names = gpu_names()
    if names and len(names) < need:
        raise ValueError(f"--mode {mode} needs {need} GPUs; this host has {len(names)}")


def _tiny_model_tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("slime_make_tiny_model", REPO_ROOT / "tools" / "make_tiny_model.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_task(o: argparse.Namespace, workdir: Path) -> dict[str, Path]:
    """train/test jsonl with the RL phrasing; sft jsonl over the same problems with the SFT phrasing."""
    from slime.data.synthetic import make_arithmetic_dataset

    task = dict(n_train=o.n_train, n_test=8, seed=o.task_seed, max_operand=o.max_operand, ops=tuple(o.ops),
                answer_style=o.answer_style)
    data = make_arithmetic_dataset(workdir / "data", prompt_format=o.rl_prompt_format, **task)
    data["sft"] = make_arithmetic_dataset(workdir / "data_sft", prompt_format=o.sft_prompt_format, **task)["sft"]
    return data


def _common_flags(o: argparse.Namespace, train_gpus: int) -> list[str]:
    return ["--actor-num-nodes", "1", "--actor-num-gpus-per-node", str(train_gpus), "--seed", str(o.seed),
            "--rollout-seed", str(o.seed), "--use-dynamic-batch-size", "--max-tokens-per-gpu", str(o.max_tokens_per_gpu),
            "--weight-decay", "0.0", "--adam-beta1", "0.9", "--adam-beta2", "0.999", "--clip-grad", "1.0",
            "--lr-warmup-iters", "0", "--lr-decay-style", "constant"]


def sft_argv(o: argparse.Namespace, base_model: Path, data: dict[str, Path], workdir: Path) -> list[str]:
    return _common_flags(o, 1) + [
        "--hf-checkpoint", str(base_model), "--prompt-data", str(data["sft"]), "--input-key", "messages",
        "--rollout-function-path", "slime.rollout.sft_rollout.generate_rollout", "--loss-type", "sft_loss",
        "--rollout-shuffle", "--rollout-batch-size", str(o.sft_batch_size), "--num-rollout", str(o.sft_steps),
        "--lr", str(o.sft_lr), "--save-hf", str(workdir / "sft_model"), "--metrics-dir", str(workdir / "sft"),
        "--save", str(workdir / "sft" / "checkpoint"), "--save-interval", str(o.sft_steps), "--no-save-optim",
        "--lr-warmup-iters", str(min(10, o.sft_steps // 4)),
    ]


def placement_flags(o: argparse.Namespace) -> list[str]:
    if o.mode == "disaggregated":
        return ["--rollout-num-gpus", "1", "--rollout-num-gpus-per-engine", "1"]
    flags = ["--colocate"]
    if not o.offload:
        flags += ["--no-offload-train", "--no-offload-rollout"]
    fraction = o.engine_mem_fraction if o.engine_mem_fraction is not None else (None if o.offload else 0.3)
    if fraction is not None and not o.smoke:
        flags += ["--sglang-mem-fraction-static", str(fraction)]
    return flags


def grpo_argv(o: argparse.Namespace, model: Path, data: dict[str, Path], workdir: Path) -> list[str]:
    train_gpus = 4 if o.mode == "fsdp4" else 1
    return _common_flags(o, train_gpus) + placement_flags(o) + [
        "--hf-checkpoint", str(model), "--prompt-data", str(data["train"]), "--input-key", "messages",
        "--label-key", "label", "--apply-chat-template", "--rollout-shuffle",
        "--custom-rm-path", "slime.data.synthetic.exact_answer_reward",
        "--rollout-batch-size", str(o.rollout_batch_size), "--n-samples-per-prompt", str(o.n_samples_per_prompt),
        "--num-steps-per-rollout", "1", "--num-rollout", str(o.num_steps),
        "--rollout-max-response-len", str(o.max_response_len), "--rollout-temperature", str(o.temperature),
        "--advantage-estimator", "grpo", "--lr", str(o.lr), "--eps-clip", "0.2",
        "--metrics-dir", str(workdir / "grpo"),
    ] + o.extra_args.split()


class GpuMemoryPoller:
    """Peak used memory per GPU and per process (trainer / engine) from nvidia-smi, polled in a thread.

    This process makes no CUDA context. Processes are told apart by pid: the engine servers by their command
    line (`slime.engine.server`), the train ranks by the pids in `trainer_pids`. Where nvidia-smi cannot see
    the pids (some containers) only the per-GPU numbers come out."""

    def __init__(self, interval_s: float = 0.25) -> None:
        self.interval_s = interval_s
        self.enabled = shutil.which("nvidia-smi") is not None
        self.trainer_pids: set[int] = set()
        self._gpu_peaks: dict[int, float] = {}
        self._pid_peaks: dict[int, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> "GpuMemoryPoller":
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    @staticmethod
    def _query(what: str) -> list[tuple[int, float]]:
        out = subprocess.run(["nvidia-smi", f"--query-{what}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=False).stdout
        rows = []
        for line in out.strip().splitlines():
            parts = [part.strip() for part in line.split(",")]
            if len(parts) == 2 and parts[0].isdigit():
                try:
                    rows.append((int(parts[0]), float(parts[1])))
                except ValueError:
                    continue
        return rows

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                gpus = self._query("gpu=index,memory.used")
                procs = self._query("compute-apps=pid,used_memory")
            except (OSError, subprocess.SubprocessError):
                return
            with self._lock:
                for index, mib in gpus:
                    self._gpu_peaks[index] = max(self._gpu_peaks.get(index, 0.0), mib)
                for pid, mib in procs:
                    self._pid_peaks[pid] = max(self._pid_peaks.get(pid, 0.0), mib)
            self._stop.wait(self.interval_s)

    def _role(self, pid: int) -> str:
        if pid in self.trainer_pids:
            return "trainer"
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            return "other"
        if "slime.engine.server" in cmdline:
            return "engine"
        return "trainer" if "TrainActor" in cmdline else "other"

    def pop_peaks_gb(self) -> dict[str, Any]:
        """Peaks (GiB) since the last call: {"gpu": {"gpu0": ..}, "trainer": max over ranks, "engine": max over engines}."""
        with self._lock:
            gpus, self._gpu_peaks = self._gpu_peaks, {}
            pids, self._pid_peaks = self._pid_peaks, {}
        out: dict[str, Any] = {}
        if gpus:
            out["gpu"] = {f"gpu{i}": round(mib / 1024, 2) for i, mib in sorted(gpus.items())}
        for pid, mib in pids.items():
            role = self._role(pid)
            if role != "other":
                out[role] = max(out.get(role, 0.0), round(mib / 1024, 2))
        return out


def run_sft(o: argparse.Namespace, workdir: Path, data: dict[str, Path]) -> tuple[Path, dict[str, Any]]:
    from slime.train_loop import parse_train_args, run

    # bf16 on GPU like the real checkpoints (the SFT model keeps it, and the engines decode in it); fp32 on CPU
    dtype = "bfloat16" if gpu_names() else "float32"
    base = _tiny_model_tool().make_model(o.preset, workdir / "base_model", seed=o.seed, dtype=dtype)
    start = time.perf_counter()
    summary = run(parse_train_args(sft_argv(o, base, data, workdir)))
    info = {"seconds": round(time.perf_counter() - start, 1), "steps": o.sft_steps,
            "final_loss": summary.last_metrics.get("train/loss"), "batch_size": o.sft_batch_size, "lr": o.sft_lr}
    return workdir / "sft_model", info


def _row(step: int, metrics: dict[str, float], step_seconds: float, peaks: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {"step": step, "step_s": round(step_seconds, 4)}
    for key, metric in ROW_METRICS.items():
        if metric in metrics:
            row[key] = round(float(metrics[metric]), 4)
    if "train_s" in row and "log_prob_s" in row:
        row["train_update_s"] = round(row["train_s"] - row["log_prob_s"], 4)  # forward/backward/optimizer only
    if peaks.get("gpu"):
        row["gpu_peak_used_gb"] = peaks["gpu"]
    for role in ("trainer", "engine"):
        if role in peaks:
            row[f"{role}_process_peak_gb"] = peaks[role]  # nvidia-smi, CUDA context included
    return row


def run_grpo(o: argparse.Namespace, model: Path, data: dict[str, Path], workdir: Path,
             poller: GpuMemoryPoller) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    import ray

    from slime.train_loop import Run, parse_train_args, run

    rows: list[dict[str, Any]] = []
    clock = {"t": 0.0, "setup": 0.0}
    t0 = time.perf_counter()

    def on_start(loop: Run, start: int) -> None:
        clock["setup"] = time.perf_counter() - t0
        if loop.trainer is not None and poller.enabled:
            try:  # only labels nvidia-smi's per-process numbers; the command line is the fallback
                poller.trainer_pids = set(ray.get([a.__ray_call__.remote(lambda actor: os.getpid())
                                                   for a in loop.trainer.actors], timeout=60))
            except Exception as e:  # noqa: BLE001 - an older Ray without __ray_call__
                print(f"[rl_step] trainer pids unknown ({e}); matching TrainActor by command line", flush=True)
        clock["t"] = time.perf_counter()
        poller.pop_peaks_gb()

    def on_step(loop: Run, rollout_id: int, rollout_data: dict[str, Any], metrics: dict[str, float]) -> None:
        now = time.perf_counter()
        rows.append(_row(rollout_id, metrics, now - clock["t"], poller.pop_peaks_gb()))
        if o.save_final_model and rollout_id == o.num_steps - 1 and loop.trainer is not None:
            if loop.colocated_offload:  # the trainer gave its GPU memory to the engine after the step
                loop.trainer.onload()
            loop.trainer.save_hf(str(Path(o.save_final_model).resolve()))
        clock["t"] = time.perf_counter()

    run(parse_train_args(grpo_argv(o, model, data, workdir)), on_start=on_start, on_step=on_step)
    return rows, {"setup_seconds": round(clock["setup"], 1), "wall_seconds": round(time.perf_counter() - t0, 1)}


def _median(rows: list[dict[str, Any]], key: str, skip_first: bool) -> float | None:
    values = [r[key] for r in (rows[1:] if skip_first and len(rows) > 1 else rows) if key in r]
    return round(statistics.median(values), 4) if values else None


def summarize(rows: list[dict[str, Any]], tail: int = 3) -> dict[str, Any]:
    """Medians skip the first step (CUDA graph capture, allocator warm-up) when there are more."""
    rewards = [r["reward"] for r in rows if "reward" in r]
    summary: dict[str, Any] = {
        "steps": len(rows),
        "total_step_seconds": round(sum(r["step_s"] for r in rows), 3),
        "reward_first": rewards[0] if rewards else None,
        "reward_last": rewards[-1] if rewards else None,
        f"reward_last{tail}_mean": round(sum(rewards[-tail:]) / len(rewards[-tail:]), 4) if rewards else None,
    }
    for key in ("step_s", "rollout_s", "engine_busy_s", "engine_steps", "log_prob_s", "train_s", "train_update_s",
                "critic_train_s", "weight_sync_s", "onload_s", "offload_s", "rollout_tokens_per_s",
                "train_tokens_per_s", "logprob_abs_diff"):
        value = _median(rows, key, skip_first=True)
        if value is not None:
            summary[f"median_{key}"] = value
    for key in ("trainer_peak_allocated_gb", "trainer_peak_reserved_gb", "trainer_process_peak_gb",
                "engine_process_peak_gb"):
        values = [r[key] for r in rows if key in r]
        if values:
            summary[f"max_{key}"] = max(values)
    gpu_peaks: dict[str, float] = {}
    for r in rows:
        for gpu, gb in r.get("gpu_peak_used_gb", {}).items():
            gpu_peaks[gpu] = max(gpu_peaks.get(gpu, 0.0), gb)
    if gpu_peaks:
        summary["gpu_peak_used_gb"] = gpu_peaks
    return summary


def gpu_names() -> list[str]:
    if shutil.which("nvidia-smi") is None:
        return []
    out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, check=False)
    return [n.strip() for n in out.stdout.strip().splitlines() if n.strip()]


def gpu_name() -> str:
    names = gpu_names()
    return f"{len(names)}x {names[0]}" if names else "cpu"


def settings(o: argparse.Namespace) -> dict[str, Any]:
    engine = {"colocated": "colocated on the trainer's GPU (CUDA IPC weight sync)",
              "disaggregated": "1 engine on its own GPU (NCCL weight sync)",
              "fsdp4": "4 engines colocated with the 4 FSDP ranks (CUDA IPC weight sync)"}[o.mode]
    return {"mode": o.mode, "engine_placement": engine, "offload": bool(o.offload and o.mode != "disaggregated"),
            "preset": o.preset, "num_steps": o.num_steps, "rollout_batch_size": o.rollout_batch_size,
            "n_samples_per_prompt": o.n_samples_per_prompt, "samples_per_step": o.rollout_batch_size * o.n_samples_per_prompt,
            "max_response_len": o.max_response_len, "temperature": o.temperature, "lr": o.lr, "optimizer": "AdamW",
            "kl": "none (beta 0)", "eps_clip": 0.2,
            "seed": o.seed, "task": {"seed": o.task_seed,
                                     "max_operand": o.max_operand, "ops": o.ops, "n_train": o.n_train,
                     "sft_prompt_format": o.sft_prompt_format, "rl_prompt_format": o.rl_prompt_format,
                     "answer_style": o.answer_style}}


def benchmark(o: argparse.Namespace) -> dict[str, Any]:
    import ray

    from slime.ray.placement import start_local_ray

    check_gpus(o.mode)
    workdir = Path(o.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "grpo" / "metrics.jsonl").unlink(missing_ok=True)
    data = make_task(o, workdir)
    result: dict[str, Any] = {"benchmark": "rl_step", "gpu": gpu_name(), "settings": settings(o)}
    started = not ray.is_initialized()
    if started:
        start_local_ray(num_cpus=12)  # logical CPUs shared by the SFT and the GRPO run
    try:
        with GpuMemoryPoller() as poller:
            if o.sft_model:
                model = Path(o.sft_model).resolve()
                if not (model / "config.json").exists():
                    raise ValueError(f"--sft-model {model}: no config.json there (pass an HF checkpoint folder)")
                result["sft"] = {"from": str(model)}
            else:
                print(f"[rl_step] SFT warm-up: {o.sft_steps} steps of {o.sft_batch_size}", flush=True)
                model, result["sft"] = run_sft(o, workdir, data)
                result["sft"]["model"] = str(model)
            # the engines load the checkpoint in this dtype (on GPU): fp32 here would make every decode step slow
            result["sft"]["checkpoint_dtype"] = json.loads((model / "config.json").read_text()).get("dtype")
            print(f"[rl_step] GRPO ({o.mode}): {o.num_steps} steps of {o.rollout_batch_size}x{o.n_samples_per_prompt}",
                  flush=True)
            rows, timing = run_grpo(o, model, data, workdir, poller)
    finally:
        if started:
            ray.shutdown()
    result["grpo"] = timing
    if o.save_final_model:
        result["final_model"] = str(Path(o.save_final_model).resolve())
    result["rows"] = rows
    result["summary"] = summarize(rows)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("SLIME_PROGRESS", "0")
    o = parse_args(sys.argv[1:] if argv is None else argv)
    from benchmarks.report import emit_json

    return emit_json(benchmark(o), o.out)


if __name__ == "__main__":
    main()
