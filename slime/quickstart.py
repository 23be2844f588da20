"""CPU quickstart: a tiny model learns arithmetic, first by SFT, then by GRPO with the built-in engine (colocated).

    slime quickstart --output outputs/quickstart          # or: bash examples/quickstart/run.sh
    python -m slime.quickstart --output outputs/qs --num-rollout 4 --sft-rollouts 10   # a shorter run

Steps, each through the real code paths (`slime.train_loop.run`, Ray, FSDP trainer, built-in engine):
1. a `small` (~0.9M parameters) Qwen3-shaped checkpoint with random weights (`tools/make_tiny_model.py`);
2. the synthetic arithmetic task (`slime.data.synthetic`): RL train prompts, held-out test prompts, and
   SFT conversations over every problem (`--sft-from all`). SFT asks "3+4=", RL and the held-out set ask
   "3 + 4 =": SFT teaches the sums, GRPO (exact-answer reward) on the train problems teaches the new
   phrasing, and the held-out prompts measure how far it carries to sums RL never saw. (With
   `--sft-from train` the held-out sums are unseen in any phrasing; a ~1M model then gains little.)
3. SFT warm-up (`--loss-type sft_loss`, the SFT rollout function, no engine), saved as an HF checkpoint;
4. GRPO from that checkpoint (with a small KL loss to it, `--kl-loss-coef`), colocated, with greedy accuracy
   (top-k 1) on the held-out prompts measured before the first RL step and after the last one.
Writes into --output: `metrics.jsonl` (RL), `sft/metrics.jsonl`, `reward_curve.png`, `summary.json`
(`accuracy_after_sft`, `accuracy_after_rl`, `wall_seconds`, ...), the models and the data.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
EVAL_NAME = "heldout"


def _tiny_model_tool() -> ModuleType:
    """tools/make_tiny_model.py lives beside the package (not inside it): import it by path."""
    path = REPO_ROOT / "tools" / "make_tiny_model.py"
    if not path.exists():
        raise ValueError(f"slime quickstart needs {path} (run it from a source checkout: pip install -e .)")
    spec = importlib.util.spec_from_file_location("slime_make_tiny_model", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="slime quickstart", description=__doc__.splitlines()[0])
    p.add_argument("--output", required=True, help="folder for models, data, metrics, plot and summary.json")
    p.add_argument("--preset", default="small", help="tools/make_tiny_model.py preset (default small, ~0.9M params)")
    p.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("task")
    g.add_argument("--max-operand", type=int, default=9)
    g.add_argument("--ops", default="+")
    g.add_argument("--n-train", type=int, default=70, help="RL train prompts")
    g.add_argument("--n-test", type=int, default=30, help="held-out prompts for greedy accuracy")
    g.add_argument("--n-sft", type=int, default=None,
                   help="SFT conversations (drawn from --sft-from; default one each)")
    g.add_argument("--sft-from", choices=["train", "all"], default="all",
                   help="problems the SFT conversations cover: the RL train ones, or the held-out ones too")
    g.add_argument("--sft-prompt-format", default="{a}{op}{b}=", help="how SFT conversations ask the question")
    g.add_argument("--rl-prompt-format", default="{a} {op} {b} =",
                   help="how RL and held-out prompts ask it (SFT never sees this phrasing)")
    g = p.add_argument_group("SFT warm-up")
    g.add_argument("--sft-rollouts", type=int, default=130, help="SFT optimizer steps (one batch each)")
    g.add_argument("--sft-batch-size", type=int, default=32)
    g.add_argument("--sft-lr", type=float, default=1e-3)
    g = p.add_argument_group("GRPO")
    g.add_argument("--num-rollout", type=int, default=80)
    g.add_argument("--rollout-batch-size", type=int, default=16)
    g.add_argument("--n-samples-per-prompt", type=int, default=8)
    g.add_argument("--num-steps-per-rollout", type=int, default=1)
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--kl-loss-coef", type=float, default=0.02,
                   help="KL loss against the SFT model (--use-kl-loss); 0 turns it off")
    g.add_argument("--rollout-temperature", type=float, default=0.7)
    g.add_argument("--eval-interval", type=int, default=10)
    p.add_argument("--extra-rl-args", default="", help="more train.py flags for the GRPO run, one string")
    return p


def _common_flags(q: argparse.Namespace) -> list[str]:
    return ["--actor-num-nodes", "1", "--actor-num-gpus-per-node", "1", "--seed", str(q.seed),
            "--use-dynamic-batch-size", "--max-tokens-per-gpu", "1024", "--rollout-seed", str(q.seed)]


def sft_argv(q: argparse.Namespace, base_model: Path, data: dict[str, Path], out: Path) -> list[str]:
    return _common_flags(q) + [
        "--hf-checkpoint", str(base_model), "--prompt-data", str(data["sft"]), "--input-key", "messages",
        "--rollout-function-path", "slime.rollout.sft_rollout.generate_rollout", "--loss-type", "sft_loss",
        "--rollout-shuffle", "--rollout-batch-size", str(q.sft_batch_size), "--num-rollout", str(q.sft_rollouts),
        "--lr", str(q.sft_lr), "--clip-grad", "1.0",
        "--save", str(out / "sft" / "checkpoint"), "--save-interval", str(q.sft_rollouts),
        "--save-hf", str(out / "sft_model"), "--metrics-dir", str(out / "sft"),
    ]


def rl_argv(q: argparse.Namespace, sft_model: Path, data: dict[str, Path], out: Path) -> list[str]:
    return _common_flags(q) + [
        "--hf-checkpoint", str(sft_model), "--colocate",
        "--prompt-data", str(data["train"]), "--input-key", "messages", "--label-key", "label",
        "--apply-chat-template", "--rollout-shuffle",
        "--custom-rm-path", "slime.data.synthetic.exact_answer_reward",
        "--rollout-batch-size", str(q.rollout_batch_size), "--n-samples-per-prompt", str(q.n_samples_per_prompt),
        "--num-steps-per-rollout", str(q.num_steps_per_rollout), "--num-rollout", str(q.num_rollout),
        "--rollout-max-response-len", "6", "--rollout-temperature", str(q.rollout_temperature),
        "--advantage-estimator", "grpo", "--lr", str(q.lr), "--clip-grad", "1.0",
        "--lr-warmup-iters", "3", "--lr-decay-style", "constant",
        "--eval-prompt-data", EVAL_NAME, str(data["test"]), "--eval-interval", str(q.eval_interval),
        "--eval-top-k", "1", "--eval-max-response-len", "6",
        "--metrics-dir", str(out),
    ] + (["--use-kl-loss", "--kl-loss-coef", str(q.kl_loss_coef)] if q.kl_loss_coef > 0 else []) \
      + q.extra_rl_args.split()


def _accuracy(evals: dict[int, dict[str, float]], step: int) -> float:
    key = f"eval/{EVAL_NAME}"
    if step not in evals or key not in evals[step]:
        raise RuntimeError(f"no held-out evaluation was recorded at step {step} (got steps {sorted(evals)})")
    return float(evals[step][key])


def run_quickstart(q: argparse.Namespace) -> dict[str, Any]:
    import ray

    from slime.data.synthetic import make_arithmetic_dataset
    from slime.logging.plot import plot_reward_curve
    from slime.train_loop import parse_train_args, run

    t0 = time.time()
    out = Path(q.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for stale in (out / "metrics.jsonl", out / "sft" / "metrics.jsonl"):
        stale.unlink(missing_ok=True)
    base_model = _tiny_model_tool().make_model(q.preset, out / "base_model", seed=q.seed)
    task = dict(n_train=q.n_train, n_test=q.n_test, seed=q.seed, max_operand=q.max_operand, ops=tuple(q.ops),
                n_sft=q.n_sft, sft_from=q.sft_from)
    data = make_arithmetic_dataset(out / "data", prompt_format=q.rl_prompt_format, **task)
    # same seed, same problems: the SFT conversations, phrased with --sft-prompt-format
    data["sft"] = make_arithmetic_dataset(out / "data_sft", prompt_format=q.sft_prompt_format, **task)["sft"]
    started_ray = False
    if not ray.is_initialized():
        from slime.ray.placement import start_local_ray

        start_local_ray(num_cpus=8)  # shared by the SFT and the GRPO run
        started_ray = True
    try:
        print(f"[quickstart] SFT warm-up: {q.sft_rollouts} steps", flush=True)
        sft = run(parse_train_args(sft_argv(q, base_model, data, out)))
        t_sft = time.time() - t0
        print(f"[quickstart] GRPO: {q.num_rollout} rollouts of {q.rollout_batch_size}x{q.n_samples_per_prompt}", flush=True)
        rl = run(parse_train_args(rl_argv(q, out / "sft_model", data, out)))
    finally:
        if started_ray:
            ray.shutdown()
    summary = {
        "accuracy_after_sft": _accuracy(rl.evals, rl.start_rollout_id),
        "accuracy_after_rl": _accuracy(rl.evals, rl.num_rollout),
        "wall_seconds": round(time.time() - t0, 1),
        "sft_seconds": round(t_sft, 1),
        "accuracy_by_step": {str(k): v.get(f"eval/{EVAL_NAME}") for k, v in sorted(rl.evals.items())},
        "sft_final_loss": sft.last_metrics.get("train/loss"),
        "preset": q.preset,
        "task": {"max_operand": q.max_operand, "ops": q.ops, "n_train": q.n_train, "n_test": q.n_test,
                 "sft_from": q.sft_from,
                 "sft_prompt_format": q.sft_prompt_format, "rl_prompt_format": q.rl_prompt_format},
    }
    summary["accuracy_gain"] = summary["accuracy_after_rl"] - summary["accuracy_after_sft"]
    plot_reward_curve(out / "metrics.jsonl", out / "reward_curve.png",
                      keys=("rollout/reward_mean", f"eval/{EVAL_NAME}"), title="quickstart GRPO: reward and held-out accuracy")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    q = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    summary = run_quickstart(q)
    print(f"[quickstart] held-out greedy accuracy: {summary['accuracy_after_sft']:.3f} after SFT -> "
          f"{summary['accuracy_after_rl']:.3f} after GRPO in {summary['wall_seconds']:.0f}s; "
          f"see {Path(q.output) / 'summary.json'}", flush=True)
    return summary


if __name__ == "__main__":
    main()
