"""torch.profiler traces of chosen training phases for a window of rollouts (each rank writes its own files).

    python train.py ... --use-pytorch-profiler --profile-step-start 10 --profile-step-end 12 \
        --profile-target train_actor train_log_probs --profile-dir profiles/

Phases: `train_overall` (the trainer's whole `train()` of a rollout), `train_log_probs` (the old / reference
log-prob forwards), `train_actor` (the optimizer steps). Rollouts start <= id < end are profiled; each phase writes
`<profile-dir>/<phase>_rollout<id>_rank<r>.json` (open it in Perfetto or chrome://tracing). torch.profiler runs one
session at a time, so while `train_overall` records, the other two phases are ranges inside its trace instead of
files of their own.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator

import torch

PHASES = ("train_overall", "train_actor", "train_log_probs")


class PhaseProfiler:
    def __init__(self, args: Any, rank: int) -> None:
        self.enabled = bool(getattr(args, "use_pytorch_profiler", False))
        self.targets = set(getattr(args, "profile_target", None) or ["train_overall"])
        self.start = int(getattr(args, "profile_step_start", 10))
        self.end = int(getattr(args, "profile_step_end", 12))
        self.directory = Path(getattr(args, "profile_dir", None) or "profiles")
        self.rank = rank
        self._active: str | None = None
        self.written: list[Path] = []

    def wants(self, phase: str, rollout_id: int) -> bool:
        return self.enabled and phase in self.targets and self.start <= rollout_id < self.end

    @contextlib.contextmanager
    def phase(self, phase: str, rollout_id: int) -> Iterator[None]:
        """Profile the block when this phase and rollout are chosen (and no other phase is recording); always a
        named range, so the phase shows up inside an enclosing trace."""
        assert phase in PHASES, phase
        if self._active is not None or not self.wants(phase, rollout_id):
            with torch.profiler.record_function(phase):
                yield
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._active = phase
        try:
            with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
                with torch.profiler.record_function(phase):
                    yield
        finally:
            self._active = None
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{phase}_rollout{rollout_id}_rank{self.rank}.json"
        tmp = path.with_name(path.name + ".tmp")
        prof.export_chrome_trace(str(tmp))
        os.replace(tmp, path)
        self.written.append(path)
