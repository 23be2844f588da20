"""Helpers for the FSDP backend tests: trainer args, synthetic rollout data, gloo ranks in spawned processes.

    python -m pytest -q tests/test_fsdp_harness.py   (checks the helpers; run_ranks is exercised by every 2-rank test)

Other `tests/test_fsdp_*.py` files import this module (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import argparse
import datetime
import faulthandler
import os
import random
import socket
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

TRAINER_DEFAULTS: dict[str, Any] = dict(
    device="cpu", seed=1234, distributed_timeout_minutes=2,
    rollout_batch_size=4, n_samples_per_prompt=2, global_batch_size=None, num_steps_per_rollout=None,
    num_rollout=10, micro_batch_size=2, use_dynamic_batch_size=False, max_tokens_per_gpu=None,
    log_probs_max_tokens_per_gpu=None, log_probs_chunk_size=-1, balance_data=False,
    only_train_params_name_list=None, freeze_params_name_list=None, recompute_granularity=None,
    fsdp_reshard_after_forward="auto", fsdp_reduce_grads_per_step=False, fsdp_grad_reduce_dtype="float32",
    lr=1e-3, min_lr=0.0, lr_decay_style="constant", lr_warmup_iters=0, lr_warmup_fraction=None, lr_decay_iters=None,
    weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.98, adam_eps=1e-8, clip_grad=1.0, reset_optimizer_states=False,
    rollout_temperature=1.0, advantage_estimator="grpo", loss_type="policy_loss", custom_loss_function_path=None,
    eps_clip=0.2, eps_clip_high=0.2, eps_clip_c=None, kl_coef=0.0, use_kl_loss=False, kl_loss_coef=0.0,
    kl_loss_type="low_var_kl", use_unbiased_kl=False, ref_load=None, ref_update_interval=None, entropy_coef=0.0, gamma=1.0, lambd=1.0,
    normalize_advantages=False, use_rollout_logprobs=False, recompute_old_log_probs=False, use_tis=False,
    get_mismatch_metrics=False,
    calculate_per_token_loss=False, load=None, save=None, save_interval=None, no_save_optim=False,
    no_load_optim=False, save_hf=None, start_rollout_id=None, update_weight_buffer_size=512 * 1024 ** 2,
    use_pytorch_profiler=False, profile_step_start=10, profile_step_end=12, profile_target=["train_overall"],
    profile_dir="profiles", async_save=False, keep_old_actor=False, custom_model_provider_path=None,
)


def make_args(model_dir: str | os.PathLike, **overrides: Any) -> argparse.Namespace:
    """Parsed by the real CLI (`slime.utils.arguments.parse_args`), then test sizes and `overrides` applied."""
    from slime.utils.arguments import parse_args

    unknown = set(overrides) - set(TRAINER_DEFAULTS)
    assert not unknown, f"unknown trainer args {unknown}"
    args = parse_args(["--hf-checkpoint", str(model_dir), "--rollout-batch-size", "4", "--n-samples-per-prompt", "2",
                       "--actor-num-gpus-per-node", "1", "--num-rollout", "10"])
    for key, value in dict(TRAINER_DEFAULTS, **overrides).items():
        assert hasattr(args, key), f"parse_args has no {key}"
        setattr(args, key, value)
    return args


def make_rollout_data(num_samples: int, *, seed: int = 0, vocab: int = 300, min_prompt: int = 2, max_prompt: int = 6,
                      min_response: int = 1, max_response: int = 8) -> dict[str, list]:
    rng = random.Random(seed)
    data: dict[str, list] = {k: [] for k in ("tokens", "response_lengths", "loss_masks", "rewards", "raw_reward",
                                             "rollout_log_probs", "truncated", "sample_indices")}
    for i in range(num_samples):
        prompt = rng.randint(min_prompt, max_prompt)
        response = rng.randint(min_response, max_response)
        data["tokens"].append([rng.randrange(7, vocab) for _ in range(prompt + response)])
        data["response_lengths"].append(response)
        mask = [1] * response
        if response > 2:
            mask[rng.randrange(response)] = 0
        data["loss_masks"].append(mask)
        reward = rng.uniform(-1, 1)
        data["rewards"].append(reward)
        data["raw_reward"].append(reward)
        data["rollout_log_probs"].append([-rng.uniform(4.0, 7.0) for _ in range(response)])
        data["truncated"].append(0)
        data["sample_indices"].append(i)
    return data


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable, kwargs: dict, out_dir: str, backend: str) -> None:
    import torch.distributed as dist

    faulthandler.enable(all_threads=True)  # a C++ abort (SIGABRT) then shows every thread's Python stack
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(minutes=3))
    try:
        result = fn(rank, world_size, **kwargs)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    except BaseException:
        dist.destroy_process_group()
        raise  # the traceback reaches mp.spawn, which stops the other ranks
    # Every rank has saved its result once the barrier passes; then exit without any teardown. One CI run lost a
    # rank to "terminate called without an active exception" (a C++ abort) that 40 reruns here did not repeat;
    # the group's and the interpreter's teardown, where gloo's threads and the tensors their finished work still
    # holds go in no set order, are the likeliest place, and a test needs neither.
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(fn: Callable, world_size: int, tmp_path: Path, backend: str = "gloo", **kwargs: Any) -> list[Any]:
    """Run `fn(rank, world_size, **kwargs)` on `world_size` ranks (gloo, or nccl one GPU each); returns results."""
    import torch.multiprocessing as mp

    out_dir = Path(tmp_path) / f"ranks-{fn.__name__}-{world_size}-{_free_port()}"
    out_dir.mkdir(parents=True)
    mp.spawn(_worker, args=(world_size, _free_port(), fn, kwargs, str(out_dir), backend), nprocs=world_size, join=True)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


def hf_response_log_probs(model_dir: str | os.PathLike, data: dict[str, list], temperature: float = 1.0
                          ) -> list[torch.Tensor]:
    """Log-probs of each response token from a plain, unpacked HF forward of each sample."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    out = []
    with torch.no_grad():
        for tokens, resp in zip(data["tokens"], data["response_lengths"]):
            ids = torch.tensor([tokens])
            logits = model(ids).logits[0].float() / temperature
            logp = torch.log_softmax(logits, -1)
            positions = torch.arange(len(tokens) - resp - 1, len(tokens) - 1)
            out.append(logp[positions, ids[0, len(tokens) - resp:]])
    return out


def test_make_args_rejects_unknown_names(tmp_path):
    with pytest.raises(AssertionError):
        make_args(tmp_path, no_such_flag=1)
