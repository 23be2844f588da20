"""slime against TRL's GRPOTrainer: the same GRPO workload on the same GPU, one run after the other.

    python benchmarks/vs_trl.py --workdir /tmp/vs_trl --out vs_trl.json --slime-out rl_step_colocated.json
    python benchmarks/vs_trl.py --workdir /tmp/vs_trl --sft-model /tmp/rl/sft_model --out vs_trl.json
    python benchmarks/vs_trl.py --smoke --workdir /tmp/vs_trl_smoke          # CPU, tiny preset (needs trl)
    python benchmarks/vs_trl.py --summarize-seeds vs_trl_seed*.json --out vs_trl_seeds.json   # no run

1. slime: `benchmarks/rl_step.py --mode colocated` in a subprocess (1 GPU, trainer and engine resident; it
   also makes the SFT-warmed checkpoint unless --sft-model names one); its JSON is kept (--slime-out).
2. TRL: `GRPOTrainer` in a second subprocess (so GPU memory starts clean), from the same SFT-warmed checkpoint,
   with its default generation path (HF `generate`, no vLLM), the reward being the task's exact-answer check.
Both runs use the same prompts (the task's train split, shuffled), prompts x samples per step, max new tokens,
temperature (top-p 1, no top-k), learning rate and AdamW (betas 0.9/0.999, no weight decay, constant LR, grad
clip 1.0), clipped policy loss (eps 0.2) with per-sequence mean aggregation and group-normalised advantages,
no KL (beta 0), bf16 compute over fp32 master weights, one optimizer step per rollout (TRL: gradient
accumulation over micro-batches of --trl-micro-batch completions, one generation batch per step) and the
same number of steps. TRL runs without gradient checkpointing (slime recomputes nothing either).
Per-step time is wall time per optimizer step (generation, scoring, log-probs, backward, optimizer; for slime
also the weight sync), `*_seconds` their sum over all steps (start-up excluded, shown apart); final reward is
the mean training reward of the last 3 steps. Per-step rewards are noisy (256 samples of changing prompts), so
both trained policies are also scored after the run (`final_eval`, --final-eval-prompts x --final-eval-samples):
the SFT start, slime's and TRL's final weights, each sampled by the same HF `generate` with the same seed on the
same train prompts; `slime_minus_trl` comes with its standard error. Prints one JSON object (`--out` also
writes it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run as a script from anywhere

FINAL_TAIL = 3
SHARED = ("num_steps", "rollout_batch_size", "n_samples_per_prompt", "max_response_len", "temperature", "lr", "seed")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default=None, help="folder for the models and data of this run (required)")
    p.add_argument("--out", default=None, help="also write the JSON object here")
    p.add_argument("--slime-out", default=None, help="also keep slime's full rl_step JSON here")
    p.add_argument("--smoke", action="store_true", help="CPU check: tiny preset, 2 steps, small batches")
    p.add_argument("--sft-model", default=None, help="SFT-warmed HF checkpoint (default: slime's run makes one)")
    p.add_argument("--num-steps", type=int, default=20)
    p.add_argument("--rollout-batch-size", type=int, default=32)
    p.add_argument("--n-samples-per-prompt", type=int, default=8)
    p.add_argument("--max-response-len", type=int, default=128)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trl-micro-batch", type=int, default=64, help="completions per TRL forward/backward")
    p.add_argument("--trl-max-seconds", type=float, default=None,
                   help="stop TRL after the step that passes this much step time; both sides are then compared "
                        "over the steps TRL finished")
    p.add_argument("--rl-step-args", default="", help="more benchmarks/rl_step.py flags for the slime run")
    p.add_argument("--skip-slime", action="store_true", help="TRL only (needs --sft-model)")
    p.add_argument("--final-eval-prompts", type=int, default=256,
                   help="score the SFT model and both trained policies on this many train prompts (0: no final eval)")
    p.add_argument("--final-eval-samples", type=int, default=4, help="samples per prompt of the final eval")
    p.add_argument("--final-eval-models", default="sft,slime,trl", type=lambda text: text.split(","),
                   help="which of sft,slime,trl the final eval scores (seed lanes sharing one SFT model skip it)")
    p.add_argument("--summarize-seeds", nargs="+", default=None, metavar="JSON",
                   help="no run: combine the JSONs of runs that differ only in --seed (gpu_suite.sh part J) into "
                        "the mean slime - TRL difference of the final eval and of the final reward, with standard "
                        "errors across the seeds")
    p.add_argument("--trl-worker", action="store_true", help=argparse.SUPPRESS)  # internal: the TRL subprocess
    p.add_argument("--eval-worker", default=None, help=argparse.SUPPRESS)  # internal: JSON {name: model dir}
    p.add_argument("--data", default=None, help=argparse.SUPPRESS)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    o = build_parser().parse_args(argv)
    if o.smoke:
        o.num_steps, o.rollout_batch_size, o.n_samples_per_prompt, o.max_response_len = 2, 4, 2, 4
        o.trl_micro_batch = 4
        o.final_eval_prompts, o.final_eval_samples = min(o.final_eval_prompts, 4), min(o.final_eval_samples, 2)
    samples = o.rollout_batch_size * o.n_samples_per_prompt
    o.trl_micro_batch = min(o.trl_micro_batch, samples)
    if samples % o.trl_micro_batch:
        raise ValueError(f"--trl-micro-batch {o.trl_micro_batch} must divide the samples per step ({samples})")
    if o.workdir is None and not o.summarize_seeds:
        raise ValueError("--workdir is required")
    unknown = sorted(set(o.final_eval_models) - {"sft", "slime", "trl"})
    if unknown:
        raise ValueError(f"--final-eval-models: unknown model(s) {unknown}; choose from sft, slime, trl")
    if o.skip_slime and not o.sft_model:
        raise ValueError("--skip-slime needs --sft-model (the checkpoint TRL starts from)")
    return o


def _shared_flags(o: argparse.Namespace) -> list[str]:
    flags = []
    for name in SHARED:
        flags += [f"--{name.replace('_', '-')}", str(getattr(o, name))]
    return flags


# ---------------------------------------------------------------------------------------------------- TRL
class _StepTimer:
    """TrainerCallback body: wall seconds of each optimizer step (generation happens inside the step)."""

    def __init__(self, max_seconds: float | None = None) -> None:
        self.seconds: list[float] = []
        self._start = 0.0
        self.max_seconds = max_seconds  # stop after the step that passes this much training time

    @staticmethod
    def _sync() -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._sync()
        self._start = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._sync()
        self.seconds.append(time.perf_counter() - self._start)
        if self.max_seconds is not None and sum(self.seconds) > self.max_seconds:
            control.should_training_stop = True


def exact_answer_reward(completions: list[Any], label: list[str], **kwargs: Any) -> list[float]:
    """TRL reward function with slime's check (`slime.data.synthetic.is_correct_answer`)."""
    from slime.data.synthetic import is_correct_answer

    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [1.0 if is_correct_answer(text, lab) else 0.0 for text, lab in zip(texts, label)]


def run_trl(o: argparse.Namespace) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    t0 = time.perf_counter()
    on_gpu = torch.cuda.is_available() and not o.smoke
    records = [json.loads(line) for line in Path(o.data).read_text().splitlines() if line.strip()]
    dataset = Dataset.from_list([{"prompt": r["messages"], "label": str(r["label"])} for r in records])
    samples = o.rollout_batch_size * o.n_samples_per_prompt
    config = GRPOConfig(
        output_dir=str(Path(o.workdir) / "trl"), max_steps=o.num_steps, seed=o.seed,
        per_device_train_batch_size=o.trl_micro_batch, gradient_accumulation_steps=samples // o.trl_micro_batch,
        num_generations=o.n_samples_per_prompt, max_completion_length=o.max_response_len,
        temperature=o.temperature, top_p=1.0, top_k=0, beta=0.0, loss_type="grpo", scale_rewards="group",
        epsilon=0.2, num_iterations=1, learning_rate=o.lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, max_grad_norm=1.0, optim="adamw_torch",
        bf16=on_gpu, use_cpu=not on_gpu, gradient_checkpointing=False, logging_steps=1, report_to="none",
        save_strategy="no", dataloader_num_workers=0, disable_dropout=True,
    )
    tokenizer = AutoTokenizer.from_pretrained(o.sft_model)
    model = AutoModelForCausalLM.from_pretrained(o.sft_model, dtype=torch.float32)
    timer = _StepTimer(o.trl_max_seconds)
    callback = type("StepTimerCallback", (TrainerCallback,), {
        "on_step_begin": lambda self, *a, **k: timer.on_step_begin(*a, **k),
        "on_step_end": lambda self, *a, **k: timer.on_step_end(*a, **k)})()
    trainer = GRPOTrainer(model=model, reward_funcs=exact_answer_reward, args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[callback])
    setup = time.perf_counter() - t0
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    final_model = None
    if o.final_eval_prompts > 0:
        final_model = str(Path(o.workdir) / "trl_final_model")
        trainer.save_model(final_model)
    logs = [entry for entry in trainer.state.log_history if "reward" in entry]
    rewards = [float(entry["reward"]) for entry in logs]
    return {
        "setup_seconds": round(setup, 1), "wall_seconds": round(time.perf_counter() - t0, 1),
        "step_seconds": [round(s, 4) for s in timer.seconds], "rewards": [round(r, 4) for r in rewards],
        "completion_len": [round(float(e.get("completions/mean_length", 0.0)), 2) for e in logs],
        "peak_allocated_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if on_gpu else None,
        "final_model": final_model,
        "versions": {"trl": __import__("trl").__version__, "transformers": __import__("transformers").__version__,
                     "torch": torch.__version__},
    }


# ---------------------------------------------------------------------------------------------------- final eval
def run_eval(o: argparse.Namespace) -> dict[str, Any]:
    """Every model of --eval-worker sampled by one sampler (HF `generate`, fp32 weights under bf16 autocast on
    GPU, as TRL generates; the same seed for each model) on the first --final-eval-prompts train prompts x
    --final-eval-samples, scored with the task's exact-answer check."""
    import torch

    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    from rollout_fidelity import hf_samples, rendered_prompts, score

    models: dict[str, str] = json.loads(o.eval_worker)
    device = "cuda" if torch.cuda.is_available() and not o.smoke else "cpu"
    rows = [json.loads(line) for line in Path(o.data).read_text().splitlines() if line.strip()][:o.final_eval_prompts]
    tokenizer, prompts, labels, eos, pad = rendered_prompts(next(iter(models.values())), rows, o.final_eval_samples)
    sampling = argparse.Namespace(temperature=o.temperature, max_new_tokens=o.max_response_len)
    mode = "autocast" if device == "cuda" else "float32"
    out: dict[str, Any] = {"sampler": f"HF generate ({mode}), temperature {o.temperature}, same seed per model",
                           "sequences": len(prompts), "prompts": len(rows), "models": {}}
    for name, path in models.items():
        samples, seconds = hf_samples(Path(path), mode, prompts, sampling, device, eos, pad)
        scored = score(name, samples, labels, tokenizer, seconds)
        p = scored["accuracy"]
        out["models"][name] = {"accuracy": p, "stderr": round((p * (1 - p) / len(prompts)) ** 0.5, 4),
                               "mean_length": scored["mean_length"], "path": path}
        print(f"[vs_trl] final eval {name}: {json.dumps(out['models'][name])}", flush=True)
    return out


def final_eval(o: argparse.Namespace, workdir: Path, models: dict[str, str], data: Path) -> dict[str, Any]:
    """`run_eval` in a subprocess (GPU memory starts clean); adds slime - TRL and its standard error."""
    out = workdir / "final_eval.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--eval-worker", json.dumps(models), "--workdir",
           str(workdir), "--data", str(data), "--out", str(out), "--final-eval-prompts", str(o.final_eval_prompts),
           "--final-eval-samples", str(o.final_eval_samples)] + _shared_flags(o) + (["--smoke"] if o.smoke else [])
    _run(cmd, "final eval")
    result = json.loads(out.read_text())
    scores = result["models"]
    if "slime" in scores and "trl" in scores:
        result["slime_minus_trl"] = round(scores["slime"]["accuracy"] - scores["trl"]["accuracy"], 4)
        variance = scores["slime"]["stderr"] ** 2 + scores["trl"]["stderr"] ** 2
        result["stderr_of_difference"] = round(variance ** 0.5, 4)
    return result


def summarize_seeds(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Runs that differ only in their seed -> per-seed slime - TRL differences and their mean with the standard
    error across seeds (which, unlike one run's eval error, includes the training trajectories' variance)."""
    if len(results) < 2:
        raise ValueError("--summarize-seeds needs the JSONs of at least two runs")
    rows = []
    for r in results:
        final = r.get("final_eval") if isinstance(r.get("final_eval"), dict) else {}  # "not finished": cut short
        rows.append({"seed": r.get("settings", {}).get("seed"), "gpu": r.get("gpu"),
                     "final_reward_diff": _diff(r.get("slime_final_reward"), r.get("trl_final_reward")),
                     "final_eval_diff": final.get("slime_minus_trl"),
                     "speedup_total": r.get("speedup_total"), "speedup_median_step": r.get("speedup_median_step")})
    out: dict[str, Any] = {"benchmark": "vs_trl_seeds", "runs": rows}
    for key in ("final_reward_diff", "final_eval_diff", "speedup_total", "speedup_median_step"):
        values = [row[key] for row in rows if row[key] is not None]
        if len(values) >= 2:
            out[f"{key}_mean"] = round(statistics.fmean(values), 4)
            out[f"{key}_stderr"] = round(statistics.stdev(values) / len(values) ** 0.5, 4)
    return out


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 4)


# ---------------------------------------------------------------------------------------------------- driver
def _run(cmd: list[str], what: str) -> None:
    print(f"[vs_trl] {what}: {' '.join(cmd)}", flush=True)
    done = subprocess.run(cmd, cwd=str(REPO_ROOT), check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed with exit code {done.returncode} (its output is above)")


def run_slime(o: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    out = workdir / "slime.json"
    cmd = [sys.executable, str(REPO_ROOT / "benchmarks" / "rl_step.py"), "--mode", "colocated",
           "--workdir", str(workdir / "slime"), "--out", str(out)] + _shared_flags(o)
    if o.smoke:
        cmd.append("--smoke")
    if o.sft_model:
        cmd += ["--sft-model", o.sft_model]
    if o.final_eval_prompts > 0 and "slime" in o.final_eval_models:
        cmd += ["--save-final-model", str(workdir / "slime_final_model")]
    _run(cmd + o.rl_step_args.split(), "slime")
    return json.loads(out.read_text())


def trl_subprocess(o: argparse.Namespace, workdir: Path, sft_model: str, data: Path) -> dict[str, Any]:
    out = workdir / "trl.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--trl-worker", "--workdir", str(workdir),
           "--sft-model", sft_model, "--data", str(data), "--out", str(out),
           "--trl-micro-batch", str(o.trl_micro_batch),
           "--final-eval-prompts", str(o.final_eval_prompts if "trl" in o.final_eval_models else 0)
           ] + _shared_flags(o)
    if o.trl_max_seconds is not None:
        cmd += ["--trl-max-seconds", str(o.trl_max_seconds)]
    if o.smoke:
        cmd.append("--smoke")
    _run(cmd, "TRL")
    return json.loads(out.read_text())


def _final(rewards: list[float]) -> float | None:
    tail = rewards[-FINAL_TAIL:]
    return round(sum(tail) / len(tail), 4) if tail else None


def _median_after_first(values: list[float]) -> float | None:
    values = values[1:] if len(values) > 1 else values
    return round(statistics.median(values), 4) if values else None


def compare(o: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.rl_step import gpu_name, make_task

    workdir = Path(o.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    slime: dict[str, Any] | None = None
    if not o.skip_slime:
        slime = run_slime(o, workdir)
        if o.slime_out:
            Path(o.slime_out).parent.mkdir(parents=True, exist_ok=True)
            Path(o.slime_out).write_text(json.dumps(slime, indent=2) + "\n")
    sft_model = o.sft_model or (slime or {}).get("sft", {}).get("model")
    if not sft_model:
        raise RuntimeError("slime's run named no SFT model; pass --sft-model")
    # the same prompts slime trained on: rl_step's task files (rebuilt identically when slime was skipped)
    data = workdir / "slime" / "data" / "train.jsonl"
    if not data.exists():
        from benchmarks.rl_step import parse_args as rl_parse

        rl_argv = ["--workdir", str(workdir / "slime")] + (["--smoke"] if o.smoke else []) + o.rl_step_args.split()
        data = make_task(rl_parse(rl_argv), workdir / "slime")["train"]
    trl = trl_subprocess(o, workdir, sft_model, data)
    result: dict[str, Any] = {"benchmark": "vs_trl", "gpu": gpu_name()}
    steps = len(trl["step_seconds"])  # TRL may have stopped early (--trl-max-seconds): compare the same steps
    result["steps_compared"] = steps
    if slime is not None:
        slime_steps = [r["step_s"] for r in slime["rows"]][:steps]
        slime_rewards = [r["reward"] for r in slime["rows"] if "reward" in r][:steps]
        result.update(slime_seconds=round(sum(slime_steps), 3), slime_final_reward=_final(slime_rewards),
                      slime_median_step_seconds=_median_after_first(slime_steps))
    result.update(trl_seconds=round(sum(trl["step_seconds"]), 3), trl_final_reward=_final(trl["rewards"]),
                  trl_median_step_seconds=_median_after_first(trl["step_seconds"]))
    if slime is not None and result["slime_seconds"] > 0:
        result["speedup_total"] = round(result["trl_seconds"] / result["slime_seconds"], 2)
        if result["slime_median_step_seconds"]:
            result["speedup_median_step"] = round(result["trl_median_step_seconds"] / result["slime_median_step_seconds"], 2)
    result["settings"] = {name: getattr(o, name) for name in SHARED}
    result["settings"].update(samples_per_step=o.rollout_batch_size * o.n_samples_per_prompt, sft_model=sft_model,
                              trl_micro_batch=o.trl_micro_batch, kl_beta=0.0, eps_clip=0.2, optimizer="AdamW",
                              slime_placement="colocated, 1 GPU, trainer and engine resident",
                              trl_generation="transformers generate (no vLLM)")
    if slime is not None:
        result["slime"] = {"step_seconds": [r["step_s"] for r in slime["rows"]], "rewards": slime_rewards,
                           "setup_seconds": slime["grpo"]["setup_seconds"], "summary": slime["summary"]}
    result["trl"] = trl
    models = {"sft": sft_model, "slime": (slime or {}).get("final_model"), "trl": trl.get("final_model")}
    models = {name: path for name, path in models.items() if path and name in o.final_eval_models}
    if o.final_eval_prompts > 0 and models:
        if o.out:  # a run cut short during the eval keeps its timings and training rewards
            from benchmarks.report import emit_json

            emit_json({**result, "final_eval": "not finished"}, o.out, echo=False)
        start = time.perf_counter()
        result["final_eval"] = final_eval(o, workdir, models, data)
        result["final_eval"]["seconds"] = round(time.perf_counter() - start, 1)
        # --trl-max-seconds may stop TRL before slime's last step: the eval then compares unequal training
        result["final_eval"]["steps_trained"] = {"slime": len((slime or {}).get("rows", [])), "trl": steps}
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    o = parse_args(sys.argv[1:] if argv is None else argv)
    from benchmarks.report import emit_json

    if o.summarize_seeds:
        return emit_json(summarize_seeds([json.loads(Path(p).read_text()) for p in o.summarize_seeds]), o.out)
    if o.eval_worker:
        return emit_json(run_eval(o), o.out, echo=False)
    return emit_json(run_trl(o) if o.trl_worker else compare(o), o.out, echo=not o.trl_worker)


if __name__ == "__main__":
    main()
