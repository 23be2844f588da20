"""python -m pytest -q tests/test_model_provider.py

--custom-model-provider-path: the model to train comes from a plugin."""

from __future__ import annotations

import torch

from test_fsdp_harness import make_args, make_rollout_data, run_ranks

CALLS: list[tuple[str, str]] = []


def wide_norm_provider(args, path, role):
    """A provider: the checkpoint's model with every RMSNorm's epsilon raised (a visible change of the outputs)."""
    from transformers import AutoModelForCausalLM

    import torch.distributed as dist

    CALLS.append((path, role))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    for module in model.modules():
        if hasattr(module, "variance_epsilon"):
            module.variance_epsilon = 0.5
    with torch.no_grad():  # each rank's provider builds different weights: rank 0's must win everywhere
        model.model.embed_tokens.weight.add_(0.01 * dist.get_rank())
    return model


def headless_provider(args, path, role):
    return torch.nn.Linear(2, 2)


def _scenario(rank: int, world_size: int, model_dir: str) -> dict:
    from slime.backends.fsdp.trainer import FSDPTrainer

    data = make_rollout_data(4, seed=1)
    provided = FSDPTrainer(make_args(model_dir, custom_model_provider_path="test_model_provider.wide_norm_provider"))
    provided.init()
    plain = FSDPTrainer(make_args(model_dir))
    plain.init()
    out = {"calls": list(CALLS), "dtype": str(next(provided.model.parameters()).dtype)}
    out["provided"] = [t.tolist() for t in provided.compute_log_probs(data)]
    out["plain"] = [t.tolist() for t in plain.compute_log_probs(data)]
    metrics = provided.train(0, data)
    out["trained"] = metrics["train/grad_norm"] > 0
    try:
        FSDPTrainer(make_args(model_dir, custom_model_provider_path="test_model_provider.headless_provider")).init()
    except ValueError as e:
        out["error"] = str(e)
    return out


def test_the_provided_model_is_the_one_trained_on_every_rank(tmp_path, tiny_model_dir):
    outs = run_ranks(_scenario, 2, tmp_path, model_dir=str(tiny_model_dir))
    for out in outs:
        assert out["calls"] == [(str(tiny_model_dir), "actor")] and out["dtype"] == "torch.float32"
        assert out["trained"]
        assert "--custom-model-provider-path test_model_provider.headless_provider" in out["error"]
        assert "expected an nn.Module with a .lm_head head for the actor" in out["error"]
    # the provider's change shows in the log-probs; both ranks hold rank 0's weights (same log-probs of one batch)
    flat = [x for lp in outs[0]["provided"] for x in lp]
    plain = [x for lp in outs[0]["plain"] for x in lp]
    assert max(abs(a - b) for a, b in zip(flat, plain)) > 1e-3
    assert outs[0]["provided"] == outs[1]["provided"]
