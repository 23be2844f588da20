"""SLIME_FSDP_COMPILE=layer (slime/backends/fsdp/layer_compile.py): same log-probs, losses, gradients and
state-dict names as eager, with and without recomputation (CPU: aot_eager backend; CUDA test: inductor).

    python -m pytest -q tests/test_fsdp_compile.py
"""

from __future__ import annotations

import os

import pytest
import torch

from test_fsdp_harness import make_args, make_rollout_data, run_ranks

BASE = dict(global_batch_size=8, micro_batch_size=1, use_dynamic_batch_size=True, max_tokens_per_gpu=24,
            adam_eps=1e3, lr=1.0, clip_grad=0.0, entropy_coef=0.01)


def _run_modes(rank: int, world_size: int, model_dir: str) -> dict:
    from torch._dynamo.utils import counters

    from slime.backends.fsdp.checkpoint import full_state_dict
    from slime.backends.fsdp.layer_compile import compiled_layer_count, reset_compile_caches
    from slime.backends.fsdp.trainer import FSDPTrainer

    data = make_rollout_data(8, seed=3)
    out: dict = {}
    for mode in ("0", "layer"):
        for recompute in (None, "full"):
            os.environ["SLIME_FSDP_COMPILE"] = mode
            reset_compile_caches()
            trainer = FSDPTrainer(make_args(model_dir, recompute_granularity=recompute, **BASE))
            trainer.init()
            log_probs = trainer.compute_log_probs(data)
            metrics = trainer.train(0, data)
            full = full_state_dict(trainer.model)
            out[(mode, recompute)] = dict(log_probs=log_probs, steps=metrics["steps"],
                                          names=sorted(full), weights={k: v.clone() for k, v in full.items()},
                                          compiled=compiled_layer_count(trainer.model),
                                          graphs=int(counters["stats"].get("unique_graphs", 0)))
    os.environ.pop("SLIME_FSDP_COMPILE", None)
    return out


def test_layer_compile_matches_eager_with_and_without_recompute(tmp_path, tiny_model_dir) -> None:
    results = run_ranks(_run_modes, 1, tmp_path, model_dir=str(tiny_model_dir))[0]
    for recompute in (None, "full"):
        eager, compiled = results[("0", recompute)], results[("layer", recompute)]
        assert eager["compiled"] == 0 and compiled["compiled"] == 2  # the tiny preset has 2 decoder layers
        assert compiled["graphs"] > 0  # dynamo really traced the layers
        assert compiled["names"] == eager["names"]  # in-place compile: no `_orig_mod.` in checkpoints / export
        for a, b in zip(compiled["log_probs"], eager["log_probs"]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert len(compiled["steps"]) == len(eager["steps"]) == 1
        for key, value in eager["steps"][0].items():
            assert abs(compiled["steps"][0][key] - value) <= 1e-5 + 1e-4 * abs(value), (recompute, key)
        for name, weight in eager["weights"].items():  # the update (lr 1, eps >> |g|) is linear in the gradient
            torch.testing.assert_close(compiled["weights"][name], weight, rtol=1e-4, atol=1e-5)


def test_compile_mode_rejects_unknown_values(monkeypatch) -> None:
    from slime.backends.fsdp.layer_compile import compile_mode

    monkeypatch.setenv("SLIME_FSDP_COMPILE", "layers")
    with pytest.raises(ValueError, match="SLIME_FSDP_COMPILE"):
        compile_mode()
    monkeypatch.setenv("SLIME_FSDP_COMPILE", "layer")
    assert compile_mode() == "layer"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_compiled_layer_with_packed_varlen_attention_matches_eager(tmp_path) -> None:
    """One HF decoder layer with the packed varlen attention: inductor vs eager, forward and backward,
    two packed lengths (the second one makes the length dynamic)."""
    from transformers import AutoModelForCausalLM

    from slime.backends.fsdp.model import attention_implementation
    from slime.backends.fsdp.packed_attention import packed_attention_kwargs
    from slime.backends.fsdp.layer_compile import reset_compile_caches
    from tools.make_tiny_model import make_model

    reset_compile_caches()
    model = AutoModelForCausalLM.from_pretrained(make_model("tiny", tmp_path / "m"), dtype=torch.bfloat16,
                                                 attn_implementation=attention_implementation("cuda")).cuda()
    compiled = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.bfloat16,
                                                    attn_implementation=attention_implementation("cuda")).cuda()
    for layer in compiled.model.layers:
        layer.compile(backend="inductor")
    for lengths in ([5, 17, 9], [30, 3], [12, 12, 12, 4]):
        ids = torch.randint(7, 300, (1, sum(lengths)), device="cuda")
        pos = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0).cuda()
        outs = []
        for m in (model, compiled):
            m.zero_grad()
            hidden = m.model(input_ids=ids, position_ids=pos, use_cache=False,
                             **packed_attention_kwargs(lengths, "cuda")).last_hidden_state
            hidden.float().square().mean().backward()
            outs.append((hidden.float(), m.model.layers[0].mlp.down_proj.weight.grad.float()))
        torch.testing.assert_close(outs[1][0], outs[0][0], atol=5e-2, rtol=5e-2)
        torch.testing.assert_close(outs[1][1], outs[0][1], atol=5e-2, rtol=5e-2)


@torch.library.custom_op("slime_test::varlen_attn", mutates_args=())
def _cpu_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_q: int, scale: float
                ) -> torch.Tensor:
    """A CPU stand-in for torch's CUDA varlen_attn custom op: [T, H, D] in, causal attention per cu_seq_lens."""
    bounds = cu.tolist()
    assert max_q == max(b - a for a, b in zip(bounds, bounds[1:]))
    outs = [torch.nn.functional.scaled_dot_product_attention(q[a:b].transpose(0, 1), k[a:b].transpose(0, 1),
                                                             v[a:b].transpose(0, 1), is_causal=True, scale=scale)
            for a, b in zip(bounds, bounds[1:])]
    return torch.cat(outs, dim=1).transpose(0, 1).contiguous()


@_cpu_varlen.register_fake
def _(q, k, v, cu, max_q, scale):
    return torch.empty_like(q)


def _cpu_varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, window_size=None, enable_gqa=False, scale=None):
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return _cpu_varlen(q, k, v, cu_q, max_q, scale)


def test_compiled_layers_trace_the_varlen_path_with_symbolic_lengths(tmp_path, monkeypatch) -> None:
    """The CUDA path of the packed attention (cu_seq_lens + an int max length into a custom op, no Python
    list of lengths) inside compiled layers, with a CPU custom op standing in for varlen_attn: same hidden
    states as eager for rows of different lengths and sample counts, and the length stays symbolic
    (a handful of graphs, not one per row)."""
    from torch._dynamo.utils import counters
    from transformers import AutoModelForCausalLM

    from slime.backends.fsdp import packed_attention as pa
    from slime.backends.fsdp.layer_compile import reset_compile_caches
    from tools.make_tiny_model import make_model

    monkeypatch.setattr(pa, "_use_varlen", lambda query: True)
    monkeypatch.setattr(pa, "_VARLEN_FN", _cpu_varlen_attn)
    monkeypatch.setattr(pa, "_VARLEN_PARAMS", frozenset({"window_size", "enable_gqa", "scale"}))
    path = make_model("tiny", tmp_path / "m")
    eager, compiled = (AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                            attn_implementation=pa.register()).eval()
                       for _ in range(2))
    reset_compile_caches()
    for layer in compiled.model.layers:
        layer.compile(backend="aot_eager")
    rows = ([5, 17, 9], [30, 3], [12, 12, 12, 4], [7], [2, 9, 11, 6, 3])
    with torch.no_grad():
        for lengths in rows:
            ids = torch.randint(7, 300, (1, sum(lengths)))
            pos = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
            kwargs = pa.packed_attention_kwargs(lengths, "cpu")
            kwargs.pop(pa.SEQ_LENGTHS_KEY)  # as on CUDA with varlen_attn
            out = [m.model(input_ids=ids, position_ids=pos, use_cache=False, **kwargs).last_hidden_state
                   for m in (eager, compiled)]
            torch.testing.assert_close(out[1], out[0], rtol=1e-5, atol=1e-5)
    assert 0 < counters["stats"]["unique_graphs"] <= 3, dict(counters["stats"])


def test_compile_dynamic_defaults_to_symbolic_lengths_on_cuda_only(monkeypatch) -> None:
    from slime.backends.fsdp.layer_compile import compile_dynamic

    monkeypatch.delenv("SLIME_FSDP_COMPILE_DYNAMIC", raising=False)
    assert compile_dynamic("cuda") is True and compile_dynamic("cuda:1") is True and compile_dynamic("cpu") is None
    monkeypatch.setenv("SLIME_FSDP_COMPILE_DYNAMIC", "0")
    assert compile_dynamic("cuda") is None
    monkeypatch.setenv("SLIME_FSDP_COMPILE_DYNAMIC", "1")
    assert compile_dynamic("cpu") is True
    monkeypatch.setenv("SLIME_FSDP_COMPILE_DYNAMIC", "yes")
    with pytest.raises(ValueError, match="SLIME_FSDP_COMPILE_DYNAMIC='yes'"):
        compile_dynamic("cuda")
