"""Metrics line, metrics.jsonl, TensorBoard events, wandb offline, reward-curve PNG.

    python -m pytest -q tests/test_logging.py
"""

from __future__ import annotations

import json
from argparse import Namespace

import pytest

from slime.logging.metrics import MetricsLogger, format_metrics_line
from slime.logging.plot import plot_reward_curve, read_metrics
from slime.logging.rollout_metrics import rollout_metrics
from slime.logging.timer import PhaseTimer
from slime.utils.types import Sample, Status


def _samples() -> list[Sample]:
    return [
        Sample(index=0, reward=1.0, response_length=4, status=Status.COMPLETED),
        Sample(index=1, reward=0.0, response_length=8, status=Status.TRUNCATED),
        Sample(index=2, reward=1.0, response_length=2, status=Status.COMPLETED),
        Sample(index=3, reward=0.0, response_length=6, status=Status.COMPLETED),
    ]


def test_rollout_metrics_values():
    m = rollout_metrics(Namespace(), _samples(), seconds=2.0)
    assert m["rollout/reward_mean"] == pytest.approx(0.5)
    assert m["rollout/reward_std"] == pytest.approx(0.5)
    assert m["rollout/response_len_mean"] == pytest.approx(5.0)
    assert m["rollout/response_len_max"] == 8
    assert m["rollout/truncated_ratio"] == pytest.approx(0.25)
    assert m["rollout/tokens_per_s"] == pytest.approx(10.0)


def test_rollout_metrics_dict_reward_uses_reward_key():
    samples = [Sample(reward={"acc": 1.0, "fmt": 0.0}), Sample(reward={"acc": 0.0, "fmt": 1.0})]
    assert rollout_metrics(Namespace(reward_key="fmt"), samples)["rollout/reward_mean"] == pytest.approx(0.5)


def test_metrics_line_is_compact_and_complete():
    line = format_metrics_line(
        7,
        {"rollout/reward_mean": 0.25, "rollout/reward_std": 0.1, "rollout/truncated_ratio": 0.0,
         "train/grad_norm": 1.5, "train/pg_clipfrac": 0.02, "train/kl_loss": 0.001,
         "time/rollout": 2.0, "time/train": 1.25, "rollout/tokens_per_s": 99.6, "train/tokens_per_s": 500.0},
    )
    assert line.startswith("step 7 | reward 0.250±0.100")
    for piece in ("gnorm 1.500", "clip 0.020", "kl 0.0010", "rollout 2.0s", "train 1.2s", "gen 100 tok/s", "train 500 tok/s"):
        assert piece in line, (piece, line)
    assert "\n" not in line


def test_phase_timer_accumulates_and_resets():
    timer = PhaseTimer()
    with timer("train"):
        pass
    timer.add("train", 1.0)
    metrics = timer.pop_metrics()
    assert metrics["time/train"] >= 1.0
    assert timer.pop_metrics() == {}


def test_jsonl_tensorboard_and_plot(tmp_path, capsys):
    args = Namespace(save=str(tmp_path), use_tensorboard=True, tb_project_name="proj", tb_experiment_name=None, use_wandb=False)
    logger = MetricsLogger.from_args(args)
    for step in range(3):
        logger.log(step, {"rollout/reward_mean": 0.1 * step, "train/grad_norm": 2.0, "note": "not a number", "inf": float("inf")})
    logger.close()
    out = capsys.readouterr().out
    assert out.count("step ") == 3 and "reward 0.200" in out

    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2]
    assert records[2]["rollout/reward_mean"] == pytest.approx(0.2)
    assert records[0]["inf"] is None and "note" not in records[0]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard" / "proj"))
    acc.Reload()
    values = [e.value for e in acc.Scalars("rollout/reward_mean")]
    assert values == pytest.approx([0.0, 0.1, 0.2])

    png = plot_reward_curve(tmp_path / "metrics.jsonl", tmp_path / "curve.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(str(png)).shape[0] > 100


def test_plot_without_reward_fails_clearly(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 0, "train/loss": 1.0}) + "\n")
    with pytest.raises(ValueError, match="no values"):
        plot_reward_curve(path, tmp_path / "x.png")
    path.write_text("{broken\n")
    with pytest.raises(ValueError, match="metrics.jsonl:1"):
        read_metrics(path)


def test_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    args = Namespace(save=str(tmp_path), use_tensorboard=False, use_wandb=True, wandb_mode="offline",
                     wandb_dir=str(tmp_path / "wb"), wandb_project="t", wandb_group="g", wandb_team=None,
                     wandb_run_id=None, wandb_key=None, disable_wandb_random_suffix=True)
    logger = MetricsLogger.from_args(args)
    logger.log(0, {"rollout/reward_mean": 0.5})
    logger.close()
    assert list((tmp_path / "wb").rglob("*.wandb")), "offline run file missing"


def test_wandb_missing_package_is_clear(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *a, **k):
        if name == "wandb":
            raise ImportError("no wandb")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ValueError, match="--use-wandb"):
        MetricsLogger.from_args(Namespace(save=str(tmp_path), use_wandb=True))
