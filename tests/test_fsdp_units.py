"""Single-process pieces of the FSDP backend: LR schedule, batching/packing, chunked log-probs, freezing, validation.

    python -m pytest -q tests/test_fsdp_units.py
"""

from __future__ import annotations

import argparse
import math

import pytest
import torch

from test_fsdp_harness import make_rollout_data


# ----------------------------------------------------------------- per-sample tensors to the device
def test_samples_go_to_the_device_in_one_copy_with_their_shapes():
    from torch.utils._python_dispatch import TorchDispatchMode

    from slime.backends.fsdp.batching import samples_to_device

    class CountCopies(TorchDispatchMode):
        copies = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            CountCopies.copies += func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default)
            return func(*args, **(kwargs or {}))

    samples = [torch.arange(3.0), torch.zeros(0), torch.ones(2, 2), torch.tensor([7.0])]
    assert all(a is b for a, b in zip(samples_to_device(samples, "cpu"), samples))  # already there: kept as they are
    with CountCopies():
        moved = samples_to_device(samples * 50, "meta")  # another device: 200 samples, one transfer
    assert CountCopies.copies == 1
    assert [m.shape for m in moved] == [s.shape for s in samples * 50] and {m.device.type for m in moved} == {"meta"}


# ----------------------------------------------------------------- LR schedule
def test_lr_schedule_values():
    from slime.backends.fsdp.optimizer import lr_at_step

    kw = dict(max_lr=1.0, min_lr=0.1, warmup_steps=2, decay_steps=12)
    assert [lr_at_step(s, style="constant", **kw) for s in (0, 1, 2, 3, 50)] == [0.0, 0.5, 1.0, 1.0, 1.0]
    assert [lr_at_step(s, style="linear", **kw) for s in (1, 2, 7, 12, 13)] == pytest.approx([0.5, 1.0, 0.55, 0.1, 0.1])
    cosine = [lr_at_step(s, style="cosine", **kw) for s in (2, 7, 12, 20)]
    assert cosine == pytest.approx([1.0, 0.1 + 0.9 * 0.5 * (math.cos(math.pi * 0.5) + 1), 0.1, 0.1])
    with pytest.raises(ValueError, match="--lr-decay-style"):
        lr_at_step(0, style="step", **kw)


def _opt_args(**kw):
    base = dict(lr=2.0, min_lr=0.0, lr_decay_style="linear", lr_warmup_iters=0, lr_warmup_fraction=None,
                rollout_batch_size=4, n_samples_per_prompt=2, global_batch_size=4, num_rollout=5,
                num_steps_per_rollout=None, lr_decay_iters=None, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.99,
                adam_eps=1e-8)
    base.update(kw)
    return argparse.Namespace(**base)


def test_lr_schedule_object_uses_rollouts_times_steps_and_warmup_fraction():
    from slime.backends.fsdp.optimizer import LRSchedule, steps_per_rollout

    args = _opt_args(lr_warmup_fraction=0.2)
    assert steps_per_rollout(args) == 2
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2, 2))], lr=args.lr)
    sched = LRSchedule(opt, args)
    assert (sched.decay_steps, sched.warmup_steps) == (10, 2)
    lrs = []
    for _ in range(11):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step()
    assert lrs == pytest.approx([0.0, 1.0, 2.0, 1.75, 1.5, 1.25, 1.0, 0.75, 0.5, 0.25, 0.0])
    restored = LRSchedule(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=9.0), args)
    restored.load_state_dict(sched.state_dict())
    assert restored.optimizer.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    with pytest.raises(ValueError, match="--lr-warmup-iters and --lr-warmup-fraction"):
        LRSchedule(opt, _opt_args(lr_warmup_fraction=0.1, lr_warmup_iters=3))
    with pytest.raises(ValueError, match="--global-batch-size"):
        steps_per_rollout(_opt_args(global_batch_size=3))


def test_lr_schedule_without_run_length_stays_constant_after_warmup(caplog):
    from slime.backends.fsdp.optimizer import LRSchedule

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = LRSchedule(opt, _opt_args(num_rollout=None, lr_warmup_iters=2))
    assert "--lr-decay-style linear" in caplog.text
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step()
    assert lrs == pytest.approx([0.0, 1.0, 2.0, 2.0, 2.0])


def test_optimizer_skips_weight_decay_for_vectors_and_frozen_params():
    from slime.backends.fsdp.optimizer import build_optimizer

    w, b, frozen = (torch.nn.Parameter(torch.ones(2, 2)), torch.nn.Parameter(torch.ones(2)),
                    torch.nn.Parameter(torch.ones(3, 3), requires_grad=False))
    opt = build_optimizer([("w", w), ("b", b), ("f", frozen)], _opt_args())
    assert [(len(g["params"]), g["weight_decay"]) for g in opt.param_groups] == [(1, 0.1), (1, 0.0)]
    assert opt.param_groups[0]["betas"] == (0.9, 0.99)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer([("f", frozen)], _opt_args())


def test_optimizer_is_fused_on_gpu_and_a_plain_loop_on_cpu():
    from slime.backends.fsdp.optimizer import build_optimizer

    w = torch.nn.Parameter(torch.ones(2, 2))
    cpu = build_optimizer([("w", w)], _opt_args(device="cpu")).param_groups[0]
    assert not cpu["fused"] and cpu["foreach"] is False
    if torch.cuda.is_available():
        gpu = build_optimizer([("w", torch.nn.Parameter(torch.ones(2, 2, device="cuda")))], _opt_args(device="cuda"))
        assert gpu.param_groups[0]["fused"]


def test_mixed_precision_policy_follows_the_grad_reduce_dtype_flag(tiny_model_dir):
    from slime.backends.fsdp.model import mixed_precision
    from slime.utils.arguments import parse_args

    default = mixed_precision("cuda")
    assert default.reduce_dtype == torch.float32 and default.param_dtype == torch.bfloat16
    assert mixed_precision("cuda", "bfloat16").reduce_dtype == torch.bfloat16
    assert mixed_precision("cpu", "bfloat16").param_dtype is None  # CPU trains in fp32 throughout
    with pytest.raises(ValueError, match="--fsdp-grad-reduce-dtype 'float16'"):
        mixed_precision("cuda", "float16")
    base = ["--hf-checkpoint", str(tiny_model_dir), "--rollout-batch-size", "4", "--num-rollout", "1",
            "--actor-num-gpus-per-node", "1"]
    assert parse_args(base).fsdp_grad_reduce_dtype == "float32"
    assert parse_args(base + ["--fsdp-grad-reduce-dtype", "bfloat16"]).fsdp_grad_reduce_dtype == "bfloat16"


# ----------------------------------------------------------------- batching
def test_split_into_steps_and_fixed_micro_batches():
    from slime.backends.fsdp.batching import plan_micro_batches, split_into_steps

    assert split_into_steps(7, 3) == [[0, 1, 2], [3, 4], [5, 6]]
    with pytest.raises(ValueError, match="--global-batch-size"):
        split_into_steps(4, 0)
    plan = plan_micro_batches([5] * 5, dynamic=False, max_tokens=None, micro_batch_size=2)
    assert plan == [[0, 1], [2, 3], [4]]
    padded = plan_micro_batches([5] * 5, dynamic=False, max_tokens=None, micro_batch_size=2, agree_count=lambda n: 5)
    assert padded == [[0, 1], [2, 3], [4], [], []]


def test_dynamic_micro_batches_respect_budget_cover_all_and_agree_on_count():
    from slime.backends.fsdp.batching import plan_micro_batches

    lengths = [9, 3, 7, 2, 8, 4, 6, 1]
    plan = plan_micro_batches(lengths, dynamic=True, max_tokens=12, micro_batch_size=1)
    assert sorted(i for b in plan for i in b) == list(range(8))
    assert all(sum(lengths[i] for i in b) <= 12 for b in plan)
    assert len(plan) == 4  # 40 tokens need at least 4 bins of 12
    seen = []

    def agree(n):  # another rank needs 6 micro-batches
        seen.append(n)
        return max(n, 6)

    plan6 = plan_micro_batches(lengths, dynamic=True, max_tokens=12, micro_batch_size=1, agree_count=agree)
    assert len(plan6) == 6 and sorted(i for b in plan6 for i in b) == list(range(8))
    with pytest.raises(ValueError, match="--max-tokens-per-gpu"):
        plan_micro_batches([13], dynamic=True, max_tokens=12, micro_batch_size=1)
    with pytest.raises(ValueError, match="--max-tokens-per-gpu"):
        plan_micro_batches([3], dynamic=True, max_tokens=None, micro_batch_size=1)


def test_pack_samples_positions_and_targets():
    from slime.backends.fsdp.batching import pack_samples

    row = pack_samples([[10, 11, 12, 13], [20, 21, 22]], [2, 1], "cpu")
    assert row.input_ids.tolist() == [[10, 11, 12, 13, 20, 21, 22]]
    assert row.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2]]
    assert row.predict_positions.tolist() == [1, 2, 5]
    assert row.targets.tolist() == [12, 13, 22]
    empty = pack_samples([], [], "cpu")
    assert empty.num_tokens == 1 and empty.targets.numel() == 0


def test_validate_rollout_data_errors_name_the_problem():
    from slime.backends.fsdp.batching import validate_rollout_data

    data = make_rollout_data(3, seed=5)
    assert validate_rollout_data(data) == 3
    bad = dict(data, loss_masks=[m + [1] for m in data["loss_masks"]])
    with pytest.raises(ValueError, match="sample 0: loss_mask"):
        validate_rollout_data(bad)
    with pytest.raises(ValueError, match="missing key"):
        validate_rollout_data({"tokens": []})
    bad = dict(data, response_lengths=[len(t) for t in data["tokens"]])
    with pytest.raises(ValueError, match="a prompt token is needed"):
        validate_rollout_data(bad)
    with pytest.raises(ValueError, match="'rewards' has 2"):
        validate_rollout_data(dict(data, rewards=[0.0, 1.0]))


# ----------------------------------------------------------------- log-probs
def test_chunked_log_probs_equal_unchunked_in_value_and_gradient():
    from slime.backends.fsdp.log_probs import chunked_log_probs_and_entropy

    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=False)
    hidden = torch.randn(13, 8, requires_grad=True)
    targets = torch.randint(0, 50, (13,))
    results = []
    for chunk in (-1, 4):
        head.zero_grad()
        hidden.grad = None
        lp, ent = chunked_log_probs_and_entropy(hidden, targets, head, temperature=0.7, chunk_size=chunk)
        (lp.sum() + 0.3 * ent.sum()).backward()
        results.append((lp.detach(), ent.detach(), hidden.grad.clone(), head.weight.grad.clone()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    logits = head(hidden).detach() / 0.7
    expected = torch.log_softmax(logits, -1).gather(-1, targets[:, None])[:, 0]
    torch.testing.assert_close(results[0][0], expected)
    probs = torch.softmax(logits, -1)
    torch.testing.assert_close(results[0][1], -(probs * probs.log()).sum(-1))
    with pytest.raises(ValueError, match="--rollout-temperature"):
        chunked_log_probs_and_entropy(hidden, targets, head, temperature=0.0)


@pytest.mark.parametrize("entropy_grad", [True, False])
def test_compiled_vocabulary_head_equals_the_eager_one(monkeypatch, entropy_grad):
    """SLIME_FSDP_COMPILE_HEAD's inductor kernels (here on CPU) give the eager head's values and gradients,
    chunked (recomputed in backward) and not."""
    from slime.backends.fsdp import log_probs

    monkeypatch.setenv("SLIME_FSDP_COMPILE_BACKEND", "inductor")
    monkeypatch.setattr(log_probs, "_FUSED", {})
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=False)
    hidden = torch.randn(13, 8, requires_grad=True)
    targets = torch.randint(0, 50, (13,))
    results = []
    for fused, chunk in ((False, -1), (True, -1), (True, 5)):
        head.zero_grad()
        hidden.grad = None
        lp, ent = log_probs.chunked_log_probs_and_entropy(hidden, targets, head, temperature=0.7, chunk_size=chunk,
                                                          entropy_grad=entropy_grad, fused=fused)
        (lp.sum() + (0.3 * ent.sum() if entropy_grad else 0.0)).backward()
        results.append((lp.detach(), ent.detach(), hidden.grad.clone(), head.weight.grad.clone()))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert set(log_probs._FUSED) == {"picked", "entropy"}


# ----------------------------------------------------------------- freezing
def test_trainable_patterns(tiny_model_dir):
    from slime.backends.fsdp.model import apply_trainable_patterns, load_hf_model

    model = load_hf_model(str(tiny_model_dir), "cpu")
    trainable = apply_trainable_patterns(model, [r"layers\.1\.mlp"], None)
    assert trainable and all("layers.1.mlp" in n for n in trainable)
    model = load_hf_model(str(tiny_model_dir), "cpu")
    trainable = apply_trainable_patterns(model, None, [r"embed_tokens", r"norm"])
    assert not any("norm" in n or "embed" in n for n in trainable) and any("q_proj" in n for n in trainable)
    with pytest.raises(ValueError, match="--freeze-params-name-list: 'nope' matches no parameter"):
        apply_trainable_patterns(model, None, ["nope"])
    with pytest.raises(ValueError, match="mutually exclusive"):
        apply_trainable_patterns(model, ["a"], ["b"])
    with pytest.raises(ValueError, match="--only-train-params-name-list: bad regex"):
        apply_trainable_patterns(model, ["("], None)
    with pytest.raises(ValueError, match="--hf-checkpoint"):
        load_hf_model("/nonexistent/model", "cpu")


# ----------------------------------------------------------------- no caller-made process group
def test_trainer_starts_its_own_one_rank_group(tmp_path, tiny_model_dir):
    import subprocess
    import sys
    from pathlib import Path

    script = f"""
import sys, torch, torch.distributed as dist
sys.path[:0] = [{str(Path(__file__).parent)!r}, {str(Path(__file__).parents[1])!r}]
from test_fsdp_harness import make_args, make_rollout_data
from slime.backends.fsdp.trainer import FSDPTrainer
torch.set_num_threads(1)
assert not dist.is_initialized()
trainer = FSDPTrainer(make_args({str(tiny_model_dir)!r}, global_batch_size=8))
print("start", trainer.init(), dist.get_world_size())
print("steps", len(trainer.train(0, make_rollout_data(8))["steps"]), trainer.weight_version)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "start 0 1" in done.stdout and "steps 1 1" in done.stdout
