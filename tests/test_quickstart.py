"""A short `slime quickstart` run: tiny model, a few SFT steps, two GRPO rollouts; checks every output file.

    python -m pytest -q tests/test_quickstart.py
"""

from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("SLIME_PROGRESS", "0")


def test_short_quickstart_writes_summary_metrics_and_plot(tmp_path):
    from slime.quickstart import main

    out = tmp_path / "qs"
    summary = main(["--output", str(out), "--preset", "tiny", "--n-train", "20", "--n-test", "8",
                    "--sft-rollouts", "3", "--sft-batch-size", "8", "--num-rollout", "2", "--rollout-batch-size", "4",
                    "--n-samples-per-prompt", "2", "--eval-interval", "2"])
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    for key in ("accuracy_after_sft", "accuracy_after_rl", "wall_seconds"):
        assert isinstance(on_disk[key], float), key
    assert 0.0 <= on_disk["accuracy_after_sft"] <= 1.0 and 0.0 <= on_disk["accuracy_after_rl"] <= 1.0
    assert on_disk["wall_seconds"] > 0
    assert sorted(on_disk["accuracy_by_step"]) == ["0", "2"]

    rl = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rl] == [0, 1, 2]
    assert rl[0]["eval/heldout"] == pytest.approx(on_disk["accuracy_after_sft"])
    assert rl[2]["eval/heldout"] == pytest.approx(on_disk["accuracy_after_rl"])
    assert all("rollout/reward_mean" in r for r in rl[:2])
    sft = [json.loads(line) for line in (out / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in sft] == [0, 1, 2] and all("train/loss" in r for r in sft)
    assert (out / "sft_model" / "model.safetensors").exists()
    assert (out / "reward_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quickstart_needs_an_output_folder(capsys):
    from slime.quickstart import main

    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2 and "--output" in capsys.readouterr().err
