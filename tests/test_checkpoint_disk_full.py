"""A full disk while saving: a clear error naming --save, the previous checkpoint intact, nothing half-written.

    python -m pytest -q tests/test_checkpoint_disk_full.py

The checkpoint folder lives on a real, small tmpfs (mounted here when running as root), filled up
with a ballast file before the second save, so the write fails with ENOSPC from the kernel. Without
the privilege to mount, the rank runs under RLIMIT_FSIZE instead (writes fail with EFBIG).
After the ballast is removed the same trainer saves again and --load resumes from that checkpoint.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import uuid
from pathlib import Path

import pytest
import torch

from test_fsdp_harness import make_args, make_rollout_data, run_ranks

TMPFS_BYTES = 8 * 2 ** 20


def _mount_tmpfs(path: Path) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_BYTES}", "tmpfs", str(path)],
                              capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def _fill(path: Path, leave_bytes: int) -> Path:
    """Write a ballast file until only about `leave_bytes` are free on the file system of `path`."""
    ballast = path / f"ballast-{uuid.uuid4().hex}"
    stat = os.statvfs(path)
    free = stat.f_bavail * stat.f_frsize
    with open(ballast, "wb") as f:
        f.write(b"\0" * max(0, free - leave_bytes))
    return ballast


def _disk_full_scenario(rank: int, world_size: int, model_dir: str, save: str, mode: str) -> dict:
    from slime.backends.fsdp.checkpoint import CheckpointSaveError, TRACKER
    from slime.backends.fsdp.trainer import FSDPTrainer

    trainer = FSDPTrainer(make_args(model_dir, save=save))
    trainer.init()
    trainer.train(0, make_rollout_data(4, seed=rank))
    trainer.save(0)
    saved0 = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    trainer.train(1, make_rollout_data(4, seed=10 + rank))

    ballast = None
    import torch.distributed as dist

    if mode == "tmpfs" and rank == 0:
        ballast = _fill(Path(save), leave_bytes=64 * 1024)
    if mode == "rlimit":
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))
    dist.barrier()
    error = None
    try:
        trainer.save(1)
    except CheckpointSaveError as exc:
        error = str(exc)
    listing = sorted(p.name for p in Path(save).iterdir() if not p.name.startswith("ballast"))
    tracker = (Path(save) / TRACKER).read_text()
    dist.barrier()
    if ballast is not None:
        ballast.unlink()
    if mode == "rlimit":
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    dist.barrier()
    trainer.save(1)  # space is back: the same run saves and goes on
    saved1 = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}

    resumed = FSDPTrainer(make_args(model_dir, load=save))
    start = resumed.init()
    equal = all(torch.equal(v.full_tensor() if hasattr(v, "full_tensor") else v,
                            saved1[k].full_tensor() if hasattr(saved1[k], "full_tensor") else saved1[k])
                for k, v in resumed.model.state_dict().items())
    return dict(error=error, listing=listing, tracker=tracker, start=start, equal=equal, had0=bool(saved0))


@pytest.fixture
def small_disk(tmp_path):
    mount_point = tmp_path / "small-disk"
    if _mount_tmpfs(mount_point):
        yield mount_point, "tmpfs"
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True, timeout=30)
    else:
        mount_point.mkdir(exist_ok=True)
        yield mount_point, "rlimit"


def test_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, tiny_model_dir, small_disk):
    save, mode = small_disk
    results = run_ranks(_disk_full_scenario, 2, tmp_path, model_dir=str(tiny_model_dir), save=str(save), mode=mode)
    for res in results:
        assert res["error"] is not None, f"saving onto a full disk ({mode}) did not fail"
        assert f"--save {save}" in res["error"] and "iter_0000001" in res["error"]
        reasons = ("No space left on device", "the disk is full") if mode == "tmpfs" else ("File too large", "a short write")
        assert any(reason in res["error"] for reason in reasons), res["error"]
        assert "iter_0000000 is intact" in res["error"]
        assert res["listing"] == ["iter_0000000", "latest_checkpointed_iteration.txt"], res["listing"]
        assert res["tracker"] == "0"
        assert res["start"] == 2 and res["equal"], "after freeing space the run saved and --load resumed from it"
