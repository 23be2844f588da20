"""CPU smoke runs of the GRPO step benchmark and the TRL comparison (tiny preset, 2 steps each).

    python -m pytest -q tests/test_benchmarks_rl.py

With trl installed, `benchmarks/vs_trl.py --smoke` runs both (slime's rl_step smoke run is its first half);
without it, `benchmarks/rl_step.py --smoke` runs on its own.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
HAS_TRL = importlib.util.find_spec("trl") is not None and importlib.util.find_spec("datasets") is not None

ROW_KEYS = ("step", "step_s", "rollout_s", "log_prob_s", "train_s", "train_update_s", "weight_sync_s",
            "rollout_tokens_per_s", "train_tokens_per_s", "reward")


def _script(name: str, *argv: str) -> None:
    done = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / name), *argv], cwd=str(REPO_ROOT),
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def check_rl_step(result: dict, mode: str = "colocated") -> None:
    assert result["benchmark"] == "rl_step" and result["settings"]["mode"] == mode
    assert result["sft"]["steps"] == 2 and Path(result["sft"]["model"], "config.json").exists()
    assert result["sft"]["checkpoint_dtype"] == "float32"  # CPU; bfloat16 where GPUs are (as the base model)
    rows = result["rows"]
    assert [r["step"] for r in rows] == [0, 1]
    for row in rows:
        for key in ROW_KEYS:
            assert key in row, key
        for key in ROW_KEYS[1:-1]:
            if key != "log_prob_s":
                assert row[key] > 0, (key, row[key])
        # one optimizer step per rollout: the old-log-prob forward is skipped (FSDPTrainer._old_log_probs_are_current)
        assert row["log_prob_s"] == 0.0 and row["train_update_s"] == row["train_s"]
        assert 0.0 <= row["reward"] <= 1.0
        assert 0.0 < row["engine_busy_s"] < row["rollout_s"] and row["engine_steps"] >= 1
    summary = result["summary"]
    assert summary["steps"] == 2 and summary["median_step_s"] > 0 and summary["total_step_seconds"] > 0
    assert summary["reward_first"] is not None and summary["reward_last"] is not None


@pytest.mark.skipif(HAS_TRL, reason="the vs_trl smoke test covers rl_step's smoke run")
def test_rl_step_smoke(tmp_path):
    out = tmp_path / "rl_step.json"
    _script("rl_step.py", "--smoke", "--workdir", str(tmp_path / "work"), "--out", str(out))
    check_rl_step(json.loads(out.read_text()))


@pytest.mark.parametrize("mode", ["disaggregated", "fsdp4"])
def test_rl_step_multi_gpu_modes_run_on_cpu_processes(tmp_path, mode):
    """The 2- and 4-GPU layouts (separate engine with a broadcast group; 4 ranks with 4 colocated engines) with
    CPU processes standing in for GPUs: the orchestration the GPU runs depend on, end to end."""
    out = tmp_path / "rl_step.json"
    _script("rl_step.py", "--smoke", "--mode", mode, "--workdir", str(tmp_path / "work"), "--out", str(out))
    result = json.loads(out.read_text())
    check_rl_step(result, mode=mode)
    assert all(row["weight_sync_s"] > 0 for row in result["rows"])


@pytest.mark.skipif(not HAS_TRL, reason="needs trl and datasets (pip install -e '.[bench]')")
def test_vs_trl_smoke(tmp_path):
    out, slime_out = tmp_path / "vs_trl.json", tmp_path / "rl_step.json"
    _script("vs_trl.py", "--smoke", "--workdir", str(tmp_path / "work"), "--out", str(out),
            "--slime-out", str(slime_out))
    check_rl_step(json.loads(slime_out.read_text()))
    result = json.loads(out.read_text())
    for key in ("gpu", "slime_seconds", "trl_seconds", "slime_final_reward", "trl_final_reward"):
        assert key in result, key
    assert result["slime_seconds"] > 0 and result["trl_seconds"] > 0
    assert 0.0 <= result["slime_final_reward"] <= 1.0 and 0.0 <= result["trl_final_reward"] <= 1.0
    assert len(result["trl"]["step_seconds"]) == 2 and len(result["trl"]["rewards"]) == 2
    assert result["settings"]["samples_per_step"] == 8
    # the final eval samples the SFT start and both trained policies with one sampler on the same prompts
    final = result["final_eval"]
    assert set(final["models"]) == {"sft", "slime", "trl"} and final["sequences"] == 4 * 2
    for name, scored in final["models"].items():
        assert 0.0 <= scored["accuracy"] <= 1.0 and Path(scored["path"], "config.json").exists(), name
    assert final["slime_minus_trl"] == pytest.approx(
        final["models"]["slime"]["accuracy"] - final["models"]["trl"]["accuracy"], abs=1e-4)
    assert final["models"]["slime"]["path"] != final["models"]["sft"]["path"]
    assert final["steps_trained"] == {"slime": 2, "trl": 2} and final["seconds"] > 0


@pytest.mark.skipif(not HAS_TRL, reason="needs trl and datasets (pip install -e '.[bench]')")
def test_vs_trl_time_budget_compares_the_steps_trl_finished(tmp_path):
    """--trl-max-seconds 0 stops TRL after its first step; slime's side is then cut to that one step too, and the
    final eval (here of TRL's policy alone) records that the two policies trained for different numbers of steps."""
    out = tmp_path / "vs_trl.json"
    _script("vs_trl.py", "--smoke", "--workdir", str(tmp_path / "work"), "--out", str(out), "--trl-max-seconds", "0",
            "--final-eval-models", "trl")
    result = json.loads(out.read_text())
    assert result["steps_compared"] == 1 and len(result["trl"]["step_seconds"]) == 1
    assert result["slime_seconds"] == pytest.approx(result["slime"]["step_seconds"][0], abs=1e-3)
    assert set(result["final_eval"]["models"]) == {"trl"} and "slime_minus_trl" not in result["final_eval"]
    assert result["final_eval"]["steps_trained"] == {"slime": 2, "trl": 1}


def test_vs_trl_rejects_an_unknown_final_eval_model():
    done = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "vs_trl.py"), "--workdir", "/tmp/x",
                           "--final-eval-models", "slime,ref"], capture_output=True, text=True)
    assert done.returncode != 0 and "--final-eval-models" in done.stderr and "'ref'" in done.stderr


def test_vs_trl_summarizes_runs_over_seeds(tmp_path):
    """--summarize-seeds: the mean slime - TRL difference over runs and its standard error across them."""
    runs = []
    for seed, (slime, trl, eval_diff) in enumerate([(0.50, 0.40, 0.02), (0.40, 0.45, -0.04), (0.60, 0.50, 0.05)]):
        run = {"settings": {"seed": seed}, "gpu": "cpu", "slime_final_reward": slime, "trl_final_reward": trl,
               "final_eval": {"slime_minus_trl": eval_diff}, "speedup_total": 3.0 + seed, "speedup_median_step": 4.0}
        runs.append(tmp_path / f"vs_trl_seed{seed}.json")
        runs[-1].write_text(json.dumps(run))
    out = tmp_path / "seeds.json"
    _script("vs_trl.py", "--summarize-seeds", *map(str, runs), "--out", str(out))
    result = json.loads(out.read_text())
    assert [r["final_reward_diff"] for r in result["runs"]] == [0.1, -0.05, 0.1]
    assert result["final_reward_diff_mean"] == pytest.approx(0.05, abs=1e-4)
    assert result["final_reward_diff_stderr"] == pytest.approx(0.05, abs=1e-4)  # stdev 0.0866 / sqrt(3)
    assert result["final_eval_diff_mean"] == pytest.approx(0.01, abs=1e-4)
    assert result["speedup_total_mean"] == pytest.approx(4.0) and result["speedup_median_step_stderr"] == 0.0
    done = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "vs_trl.py"), "--summarize-seeds",
                           str(runs[0])], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "at least two runs" in done.stderr


def test_rollout_fidelity_smoke_engine_log_probs_are_hf_log_probs(tmp_path, tiny_model_dir):
    """The probe that found the Gumbel-noise bug: on CPU in float32 the engine's log-probs of its own samples
    equal HF's teacher-forced ones, and every response is scored."""
    out = tmp_path / "fidelity.json"
    _script("rollout_fidelity.py", "--smoke", "--workdir", str(tmp_path / "work"), "--sft-model", str(tiny_model_dir),
            "--out", str(out))
    result = json.loads(out.read_text())
    assert [s["sampler"] for s in result["samplers"]] == ["engine_float32", "hf_float32"]
    for sampler in result["samplers"]:
        assert 0.0 <= sampler["accuracy"] <= 1.0 and sum(sampler["finish_reasons"].values()) == result["sequences"]
    agreement = result["engine_vs_hf_float32"]["float32"]
    assert agreement["tokens"] > 0 and agreement["mean_abs_diff"] < 1e-4 and agreement["share_off_by_more_than_1"] == 0
