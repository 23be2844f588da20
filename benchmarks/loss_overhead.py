"""Host cost of one micro-batch's RL loss (forward and backward): slime's reductions against a per-sample loop.

    python benchmarks/loss_overhead.py                                  # CPU
    python benchmarks/loss_overhead.py --device cuda --out loss_overhead.json

The workload is a GRPO micro-batch of short answers (what an 8k-token micro-batch of the arithmetic task
holds): `--samples` samples with response lengths uniform in [10, 80], the PPO-clip loss with entropy,
KL loss and TIS metrics switched on, as `compute_rl_loss` computes them. The baseline runs the same
per-token terms through the per-sample reduction loop the loss used before (a dozen small kernels per
sample and per reduction). Reports milliseconds per loss step (median of `--repeats`), and the number of
compute ops each dispatches (views excluded: on a GPU each is a kernel launch). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from slime.algo import rl_loss  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--samples", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=None)
    return parser.parse_args(argv)


LOSS_ARGS = SimpleNamespace(
    advantage_estimator="grpo", loss_type="policy_loss", eps_clip=0.2, eps_clip_high=0.28, eps_clip_c=None,
    use_kl_loss=True, kl_loss_coef=0.01, kl_loss_type="low_var_kl", use_unbiased_kl=False, entropy_coef=0.001,
    use_rollout_logprobs=False, get_mismatch_metrics=True, use_tis=False, tis_clip=2.0, tis_clip_low=0.0,
    custom_tis_function_path=None, custom_pg_loss_reducer_function_path=None, calculate_per_token_loss=False,
)


def per_sample_loop_reduce(self: Any, x: torch.Tensor, masks: list[torch.Tensor] | None = None) -> torch.Tensor:
    """The baseline: each sample's masked mean on its own, accumulated in Python."""
    masks = self.loss_masks if masks is None else masks
    total = x.new_zeros(())
    for x_i, mask_i, norm_i in zip(x.split(self.response_lengths), masks, self.loss_masks):
        mask_i = mask_i.to(device=x.device, dtype=x.dtype)
        part = torch.where(mask_i != 0, x_i * mask_i, 0.0).sum()
        norm = norm_i.to(device=x.device, dtype=x.dtype).sum().clamp_min(1)
        total = total + (part if self.per_token else part / norm)
    return total


def make_micro_batch(num_samples: int, device: str) -> tuple[dict, list[torch.Tensor], list[torch.Tensor]]:
    rng = random.Random(num_samples)
    lengths = [rng.randint(10, 80) for _ in range(num_samples)]
    gen = torch.Generator().manual_seed(num_samples)

    def per_sample(scale: float) -> list[torch.Tensor]:
        return [(-scale * torch.rand(n, generator=gen)).to(device) for n in lengths]

    batch = {"response_lengths": lengths, "total_lengths": [n + 12 for n in lengths],
             "loss_masks": [torch.ones(n, device=device) for n in lengths],
             "advantages": [torch.full((n,), rng.uniform(-1, 1), device=device) for n in lengths],
             "log_probs": per_sample(1.0), "ref_log_probs": per_sample(1.0), "rollout_log_probs": per_sample(1.0)}
    return batch, per_sample(1.0), per_sample(3.0)


def loss_step(batch: dict, new_log_probs: list[torch.Tensor], entropy: list[torch.Tensor]) -> None:
    flat = torch.cat(new_log_probs).requires_grad_()
    loss, _ = rl_loss.compute_rl_loss(LOSS_ARGS, batch, log_probs=list(flat.split(batch["response_lengths"])),
                                      entropy=entropy)
    loss.backward()


class CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 0 if func.is_view else 1
        return func(*args, **(kwargs or {}))


def measure(step: Callable[[], None], device: str, repeats: int) -> dict[str, float]:
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(3):
        step()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    with CountOps() as counter:
        step()
    return {"ms": round(statistics.median(times) * 1e3, 3), "ops": counter.count}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    rows = []
    vectorised_reduce = rl_loss._MicroBatch.reduce
    for num_samples in args.samples:
        batch, new_log_probs, entropy = make_micro_batch(num_samples, args.device)
        row: dict[str, Any] = {"samples": num_samples, "tokens": sum(batch["response_lengths"])}
        for name, reduce in (("per_sample_loop", per_sample_loop_reduce), ("slime", vectorised_reduce)):
            rl_loss._MicroBatch.reduce = reduce
            try:
                row[name] = measure(lambda: loss_step(batch, new_log_probs, entropy), args.device, args.repeats)
            finally:
                rl_loss._MicroBatch.reduce = vectorised_reduce
        row["speedup"] = round(row["per_sample_loop"]["ms"] / max(row["slime"]["ms"], 1e-9), 2)
        rows.append(row)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    result = {"benchmark": "loss_overhead", "device": device_name, "threads": torch.get_num_threads(), "rows": rows}
    from benchmarks.report import emit_json

    return emit_json(result, args.out)


if __name__ == "__main__":
    main()
