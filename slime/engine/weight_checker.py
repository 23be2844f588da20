"""`/weights_checker` (--check-weight-update-equal): does a weight update write every parameter, exactly?

    checker = WeightChecker(); checker.handle(model, "snapshot")      # copy every parameter (to the CPU)
    checker.handle(model, "reset_tensors")                           # overwrite them with noise
    ... the trainer pushes its weights ...
    checker.handle(model, "compare")                                 # ValueError naming the tensors that differ

Each tensor-parallel rank checks its own shard. Run it on an idle engine: reset_tensors breaks generation until
the next full update.
"""

from __future__ import annotations

import torch
from torch import nn

ACTIONS = ("snapshot", "reset_tensors", "compare")


class WeightChecker:
    def __init__(self) -> None:
        self.snapshot: dict[str, torch.Tensor] | None = None

    def handle(self, model: nn.Module, action: str) -> str:
        if action not in ACTIONS:
            raise ValueError(f"weights_checker action {action!r} is not one of {', '.join(ACTIONS)}")
        with torch.no_grad():
            return getattr(self, "_" + action)(model)

    def _snapshot(self, model: nn.Module) -> str:
        self.snapshot = {name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters()}
        return f"snapshot of {len(self.snapshot)} tensors"

    def _reset_tensors(self, model: nn.Module) -> str:
        generator = torch.Generator(device="cpu").manual_seed(0)
        count = 0
        for _, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator, dtype=torch.float32)
            p.copy_(noise.to(p.dtype) + 7.0)  # + 7: no tensor keeps its old values, not even a zero bias
            count += 1
        return f"reset {count} tensors"

    def _compare(self, model: nn.Module) -> str:
        if self.snapshot is None:
            raise ValueError("weights_checker compare needs a snapshot first")
        params = dict(model.named_parameters())
        differing = [name for name, saved in self.snapshot.items()
                     if name not in params or not torch.equal(params[name].detach().cpu(), saved)]
        if differing:
            largest = max(differing, key=lambda name: _max_abs_diff(params.get(name), self.snapshot[name]))
            raise ValueError(f"{len(differing)} of {len(self.snapshot)} tensors differ from the snapshot after the "
                             f"update: {', '.join(differing[:8])}{' ...' if len(differing) > 8 else ''} "
                             f"(largest difference in {largest})")
        return f"all {len(self.snapshot)} tensors equal the snapshot"


def _max_abs_diff(current: torch.Tensor | None, saved: torch.Tensor) -> float:
    if current is None or current.shape != saved.shape:
        return float("inf")
    return float((current.detach().cpu().float() - saved.float()).abs().max())
