"""The weight-sync benchmark's CPU smoke run: every mode moves the weights and reports its numbers.

    python -m pytest -q tests/test_benchmarks_weight_sync.py

`benchmarks/weight_sync.py --smoke` (tiny preset; shared-memory tensors and gloo broadcasts, each
packed and per tensor; disk) runs in a child process (it starts a 1-rank process group and an engine server). It
exits 1 unless the engine's log-probs move onto the trainer's after each first sync; here we also
assert the keys and that the mismatch really dropped. No timing asserts.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_weight_sync_smoke(tmp_path):
    out = tmp_path / "weight_sync.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "weight_sync.py"), "--smoke", "--out", str(out),
                           "--model-dir", str(tmp_path / "models")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert json.loads(proc.stdout[proc.stdout.index("{"):]) == report
    assert report["benchmark"] == "weight_sync" and report["device"] == "cpu"
    assert report["copy_bandwidth_GBps"] > 0 and report["broadcast_bandwidth_GBps"] > 0
    rows = {r["mode"]: r for r in report["results"]}
    assert set(rows) == {"colocated", "colocated_direct", "disaggregated", "disaggregated_direct", "disk"}
    for mode, row in rows.items():
        for key in ("preset", "transport", "seconds", "seconds_all", "bytes", "num_tensors", "num_buckets",
                    "GBps", "bucket_bytes", "phases_median_s", "logprob_mismatch_before", "logprob_mismatch_after",
                    "logprob_mismatch_equal_weights"):
            assert key in row, (mode, key)
        assert row["verified"] is True
        assert row["bytes"] > 0 and row["seconds"] > 0 and len(row["seconds_all"]) >= 1
        # the engine served the stale weights before the sync and the trainer's after it
        assert row["logprob_mismatch_before"] > 1e-2 and row["logprob_mismatch_after"] < 1e-3, row
    assert rows["colocated"]["transport"] == "tensor" and "bound_seconds" in rows["colocated"]
    assert rows["colocated"]["flattened"] is True and rows["colocated_direct"]["flattened"] is False
    assert rows["disaggregated"]["transport"] == "distributed" and "bound_seconds" in rows["disaggregated"]
    assert rows["disaggregated"]["flattened"] is True and rows["disaggregated_direct"]["flattened"] is False
    assert rows["disk"]["disk_bytes"] > 0


def test_flattened_bucket_round_trip():
    """The built-in engine's bucket format: one shared buffer, views of every dtype and shape, in order."""
    import pytest
    import torch

    from slime.engine.weight_transport import (deserialize_named_tensors, flatten_named_tensors,
                                               serialize_flattened_bucket, unflatten_named_tensors)

    named = [("a.weight", torch.randn(3, 5)), ("b.ids", torch.arange(7)), ("c.bias", torch.randn(4).bfloat16()),
             ("d.empty", torch.zeros(0, 3)), ("e.scalar", torch.tensor(2.5))]
    payload, buffer = serialize_flattened_bucket(named)
    out = deserialize_named_tensors(payload)
    assert [n for n, _ in out] == [n for n, _ in named]
    for (_, sent), (_, got) in zip(named, out):
        assert got.dtype == sent.dtype and got.shape == sent.shape and torch.equal(got, sent)
    assert all(offset % 64 == 0 for offset in flatten_named_tensors(named)["offsets"])
    bad = flatten_named_tensors(named)
    bad["offsets"][0] = bad["buffer"].numel()
    with pytest.raises(ValueError, match="outside the buffer"):
        unflatten_named_tensors(bad)
    del buffer
