"""python -m pytest -q tests/test_keep_old_actor.py   (--keep-old-actor: old log-probs from the engines' weights)"""

from __future__ import annotations

import torch

from test_fsdp_harness import make_args, make_rollout_data, run_ranks

SEEN: list[list[torch.Tensor]] = []


def capture_old_log_probs(args, rollout_id, rollout_data):
    """A --rollout-data-postprocess-path plugin: records the old log-probs the loss will use."""
    SEEN.append([t.clone() for t in rollout_data["log_probs"]])


def _scenario(rank: int, world_size: int, model_dir: str) -> dict:
    from slime.backends.fsdp.trainer import FSDPTrainer

    data = make_rollout_data(8, seed=5)
    out = {}
    for keep in (True, False):
        SEEN.clear()
        args = make_args(model_dir, keep_old_actor=keep, global_batch_size=4, micro_batch_size=4, lr=5e-2,
                         recompute_old_log_probs=True)
        args.rollout_data_postprocess_path = "test_keep_old_actor.capture_old_log_probs"
        trainer = FSDPTrainer(args)
        trainer.init()
        synced = trainer.compute_log_probs(data)  # the weights the engines got at start
        trainer.train(0, data)
        trainer.train(1, data)  # no sync since the start: the engines still generate with `synced`
        current = trainer.compute_log_probs(data)
        trainer.weights_synced()  # a weight sync: the kept copy follows
        trainer.train(2, data)
        out[keep] = {
            "rollout1_equals_synced": all(torch.equal(a, b) for a, b in zip(SEEN[1], synced)),
            "rollout2_equals_current": all(torch.equal(a, b) for a, b in zip(SEEN[2], current)),
            "weights_moved": any(not torch.equal(a, b) for a, b in zip(synced, current)),
        }
    return out


def test_old_log_probs_come_from_the_weights_last_pushed(tmp_path, tiny_model_dir):
    out = run_ranks(_scenario, 1, tmp_path, model_dir=str(tiny_model_dir))[0]
    assert out[True]["weights_moved"]
    assert out[True]["rollout1_equals_synced"] and out[True]["rollout2_equals_current"]
    assert not out[False]["rollout1_equals_synced"]  # without the flag: the current weights' log-probs
