"""benchmarks/train_throughput.py --smoke: CPU, tiny preset, gloo, one step; checks the JSON, not the timings.

    python -m pytest -q tests/test_benchmarks_train.py
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_train_throughput_smoke_writes_the_json(tmp_path) -> None:
    out = tmp_path / "train.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_throughput.py"), "--smoke", "--variants",
                           "eager,layer-keep-reduce-once", "--out", str(out), "--model-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert json.loads(proc.stdout) == result
    for key in ("device", "measured_peak_tflops", "flops_formula", "packed_attention_check", "presets"):
        assert key in result
    assert result["packed_attention_check"]["max_abs_diff_vs_per_sample_sdpa"] < 1e-5
    tiny = result["presets"]["tiny"]
    assert tiny["dense_params"] > 0
    assert tiny["slime"]["tokens_per_s_per_gpu"] > 0 and tiny["slime"]["model_tflops_per_s_per_gpu"] > 0
    assert tiny["mfu_vs_measured_peak"] > 0
    assert tiny["hf_baseline"]["tokens_per_s"] > 0 and tiny["speedup_vs_hf_per_gpu"] > 0
    assert tiny["slime"]["attention"] == "slime_packed"  # CPU eager: per sample; compiled layers keep sdpa
    # two variants on the same checkpoint and rollouts; `slime` is the fastest; the table comes last on stderr
    # (the second also keeps layers gathered from forward to backward and reduces gradients once per step)
    layer = tiny["variants"]["layer-keep-reduce-once"]
    assert set(tiny["variants"]) == {"eager", "layer-keep-reduce-once"}
    fastest = max(tiny["variants"], key=lambda name: tiny["variants"][name]["tokens_per_s_per_gpu"])
    assert tiny["slime_variant"] == fastest and tiny["slime"] == tiny["variants"][fastest]
    assert tiny["mfu_vs_measured_peak"] == tiny["slime"]["mfu_vs_measured_peak"]
    assert tiny["variants"]["eager"]["compiled_layers"] == 0 and layer["compiled_layers"] == 2
    assert layer["trainer_flags"] == ["--fsdp-reshard-after-forward", "false", "--fsdp-reduce-grads-per-step"]
    assert layer["attention"] == "sdpa"
    assert layer["final_loss"] == pytest.approx(tiny["variants"]["eager"]["final_loss"], abs=1e-4)
    table = proc.stderr.strip().splitlines()
    assert table[-3].split()[:2] == ["tiny", "eager"] and table[-2].split()[:2] == ["tiny", "layer-keep-reduce-once"]


def test_loss_overhead_benchmark_counts_fewer_ops_than_the_per_sample_loop(tmp_path) -> None:
    out = tmp_path / "loss.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "loss_overhead.py"), "--samples", "3", "40",
                           "--repeats", "2", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    small, large = result["rows"]
    assert small["slime"]["ops"] == large["slime"]["ops"]  # independent of the number of samples
    assert large["per_sample_loop"]["ops"] > 10 * large["slime"]["ops"]
    assert all(row[name]["ms"] > 0 for row in result["rows"] for name in ("slime", "per_sample_loop"))


def test_profile_kernel_kinds_and_variant_selection() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from train_throughput import kernel_ms_by_kind, parse_args

    rows = [{"name": "ncclDevKernel_AllGather_RING_LL", "self_cpu_ms": 0.0, "self_device_ms": 5.0},
            {"name": "aten::mm", "self_cpu_ms": 3.0, "self_device_ms": 9.0},  # an operator: its kernel is a row
            {"name": "nvjet_tst_128x256_64x4", "self_cpu_ms": 0.0, "self_device_ms": 9.0},
            {"name": "pytorch_flash::flash_fwd_kernel", "self_cpu_ms": 0.0, "self_device_ms": 4.0},
            {"name": "triton_poi_fused_mul_0", "self_cpu_ms": 0.0, "self_device_ms": 2.0},
            {"name": "void at::native::vectorized_elementwise_kernel", "self_cpu_ms": 0.0, "self_device_ms": 1.0}]
    assert kernel_ms_by_kind(rows) == {"nccl": 5.0, "matmul": 9.0, "attention": 4.0, "triton": 2.0, "other": 1.0,
                                       "compute_total": 16.0}
    variants = "layer-keep,layer-keep-reduce-once-bf16-chunked-dynamic"
    assert parse_args(["--variants", variants, "--profile", "layer-keep"]).profile_variants == {"layer-keep"}
    assert parse_args(["--variants", variants, "--profile"]).profile_variants == set(variants.split(","))
    assert parse_args(["--variants", variants]).profile_variants == set()
    with pytest.raises(ValueError, match="--profile 'eager'"):
        parse_args(["--variants", variants, "--profile", "eager"])
