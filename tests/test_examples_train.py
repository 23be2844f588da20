"""The example launch scripts train end to end through train.py (Ray, built-in engine, FSDP trainer on CPU).

    python -m pytest -q tests/test_examples_train.py          # ~1-2 min each: marked slow

search_r1_lite: 2 GRPO steps with multi-turn search; the trainer's log-probs of the loss-masked (model)
tokens must match the engine's, which fails if tool tokens leaked into the mask with their log-prob 0.
sft: 2 SFT steps on the shipped conversations.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _run(script: str, out: Path, model_dir: Path, *extra: str) -> list[dict]:
    env = dict(os.environ, MODEL_DIR=str(model_dir), NUM_ROLLOUT="2", OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", str(ROOT / "examples" / script / "run.sh"), str(out), *extra], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_search_r1_lite_trains_for_two_steps(tiny_model_dir, tmp_path):
    steps = _run("search_r1_lite", tmp_path / "out", tiny_model_dir, "--rollout-batch-size", "2",
                 "--n-samples-per-prompt", "2", "--rollout-max-response-len", "64")
    assert [m["step"] for m in steps] == [0, 1]
    for m in steps:
        assert m["rollout/num_samples"] == 4 and m["rollout/failed_samples"] == 0
        assert m["train/train_rollout_logprob_abs_diff"] < 1e-3


def test_sft_example_trains_for_two_steps(tiny_model_dir, tmp_path):
    steps = _run("sft", tmp_path / "out", tiny_model_dir, "--rollout-batch-size", "4")
    assert [m["step"] for m in steps] == [0, 1]
    assert all(m["train/loss"] > 0 for m in steps)
