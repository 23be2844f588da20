"""A NaN loss skips the optimizer step (logged, weights and optimizer untouched); --max-nan-steps in a row stop the run.

    python -m pytest -q tests/test_nan_loss.py

Two gloo ranks; the NaN comes from real input: a reward of NaN (e.g. from a reward plugin) on one
rank's shard makes that rank's loss NaN, the gradient all-reduce spreads it, and both ranks skip.
"""

from __future__ import annotations

import logging
import math

import torch

from test_fsdp_harness import make_args, make_rollout_data, run_ranks


def _params(trainer) -> dict[str, torch.Tensor]:
    return {name: p.detach().full_tensor().clone() if hasattr(p, "full_tensor") else p.detach().clone()
            for name, p in trainer.model.named_parameters()}


def _nan_scenario(rank: int, world_size: int, model_dir: str) -> dict:
    from slime.backends.fsdp.trainer import FSDPTrainer, NonFiniteLossError

    args = make_args(model_dir, lr=1e-2)
    args.max_nan_steps = 2
    trainer = FSDPTrainer(args)
    trainer.init()
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logging.getLogger("slime.backends.fsdp.trainer").addHandler(handler)

    good = make_rollout_data(4, seed=rank)
    poisoned = make_rollout_data(4, seed=rank)
    if rank == 1:
        poisoned["rewards"][0] = math.nan

    before = _params(trainer)
    version = trainer.weight_version
    skipped = trainer.train(0, poisoned)
    after_skip = _params(trainer)
    optim_empty_after_skip = len(trainer.optimizer.state) == 0
    version_after_skip = trainer.weight_version
    trained = trainer.train(1, good)
    after_good = _params(trainer)
    trainer.train(2, poisoned)  # one NaN step: under the limit of 2
    error = None
    try:
        trainer.train(3, poisoned)  # the second in a row: the run stops
    except NonFiniteLossError as exc:
        error = str(exc)
    return dict(unchanged=all(torch.equal(before[k], after_skip[k]) for k in before),
                changed=any(not torch.equal(after_skip[k], after_good[k]) for k in before),
                skipped_metric=skipped["train/skipped_nan_steps"], trained_metric=trained["train/skipped_nan_steps"],
                version=(version, version_after_skip), optim_empty_after_skip=optim_empty_after_skip,
                records=records, error=error)


def test_nan_loss_skips_the_step_and_stops_after_max_nan_steps(tmp_path, tiny_model_dir):
    results = run_ranks(_nan_scenario, 2, tmp_path, model_dir=str(tiny_model_dir))
    for res in results:
        assert res["unchanged"], "a NaN step must leave the weights untouched"
        assert res["optim_empty_after_skip"], "a NaN step must not touch the optimizer state"
        assert res["version"][0] == res["version"][1], "a skipped step is not a new weight version"
        assert res["changed"], "the next finite step must train"
        assert res["skipped_metric"] == 1.0 and res["trained_metric"] == 0.0
        assert res["error"] is not None and "--max-nan-steps 2" in res["error"] and "2 optimizer steps in a row" in res["error"]
    logged = results[0]["records"]  # rank 0 logs for everyone
    assert any("optimizer step skipped" in r and "1 in a row" in r for r in logged), logged
    assert not results[1]["records"]
