"""The packed-row attention (slime/backends/fsdp/packed_attention.py) equals attention per sample.

    python -m pytest -q tests/test_fsdp_packed_attention.py

CPU runs the per-sample sdpa kernel; the CUDA varlen kernel is checked against it by
benchmarks/train_throughput.py (`packed_attention_check`) and by the GPU test at the end.
"""

from __future__ import annotations

import pytest
import torch

from slime.backends.fsdp.batching import pack_samples
from slime.backends.fsdp.packed_attention import (PACKED_ATTENTION, _per_sample_attention, packed_attention_forward,
                                                  packed_attention_kwargs, register)


def _dense_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """Block-diagonal causal mask over the whole row, GQA by repeating heads: [1, T, H, D]."""
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    total = doc.numel()
    causal = torch.ones(total, total, dtype=torch.bool).tril()
    mask = causal & (doc[:, None] == doc[None, :])
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)


def test_packed_attention_matches_block_diagonal_mask_and_does_not_leak() -> None:
    torch.manual_seed(0)
    lengths = [5, 1, 9, 3]
    q = torch.randn(1, 4, sum(lengths), 8, dtype=torch.float64)
    k = torch.randn(1, 2, sum(lengths), 8, dtype=torch.float64)
    v = torch.randn(1, 2, sum(lengths), 8, dtype=torch.float64)
    out, weights = packed_attention_forward(torch.nn.Module(), q, k, v, None, scaling=8 ** -0.5,
                                            **packed_attention_kwargs(lengths, "cpu"))
    assert weights is None and out.shape == (1, sum(lengths), 4, 8)
    torch.testing.assert_close(out, _dense_reference(q, k, v, lengths))
    # changing the keys/values of sample 0 leaves the other samples' outputs untouched
    k2, v2 = k.clone(), v.clone()
    k2[:, :, :5] += 1.0
    v2[:, :, :5] -= 2.0
    out2, _ = packed_attention_forward(torch.nn.Module(), q, k2, v2, None, scaling=8 ** -0.5,
                                       **packed_attention_kwargs(lengths, "cpu"))
    assert torch.equal(out2[:, 5:], out[:, 5:])
    assert not torch.equal(out2[:, :5], out[:, :5])


def test_packed_attention_rejects_inconsistent_lengths() -> None:
    q = torch.randn(1, 2, 6, 4)
    with pytest.raises(ValueError, match="sum to"):
        packed_attention_forward(torch.nn.Module(), q, q, q, None, **packed_attention_kwargs([2, 3], "cpu"))


def test_hf_model_with_packed_attention_equals_per_sample_forward(tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    from slime.backends.fsdp.model import PolicyModel
    from tools.make_tiny_model import make_model

    path = make_model("tiny", tmp_path / "m")
    name = register()
    packed_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=name)
    plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    assert packed_model.config._attn_implementation == PACKED_ATTENTION
    g = torch.Generator().manual_seed(1)
    samples = [torch.randint(7, 300, (n,), generator=g).tolist() for n in (7, 3, 12)]
    responses = [4, 1, 6]
    row = pack_samples(samples, responses, "cpu")
    assert row.seq_lengths == [7, 3, 12]
    with torch.no_grad():
        lp, ent = PolicyModel(packed_model)(row)
        expected = []
        for toks, resp in zip(samples, responses):
            logits = plain(input_ids=torch.tensor([toks])).logits[0].float()
            logp = logits.log_softmax(-1)[len(toks) - resp - 1:len(toks) - 1]
            expected.append(logp.gather(-1, torch.tensor(toks[len(toks) - resp:])[:, None])[:, 0])
    torch.testing.assert_close(lp, torch.cat(expected), rtol=1e-5, atol=1e-5)
    assert torch.isfinite(ent).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_packed_attention_matches_per_sample_sdpa() -> None:
    torch.manual_seed(0)
    lengths = [100, 300, 37, 611]
    q = torch.randn(1, 16, sum(lengths), 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, 8, sum(lengths), 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, 8, sum(lengths), 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out, _ = packed_attention_forward(torch.nn.Module(), q, k, v, None, scaling=128 ** -0.5,
                                      **packed_attention_kwargs(lengths, "cuda"))
    ref = _per_sample_attention(q, k, v, lengths, 128 ** -0.5).transpose(1, 2)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
    out.float().square().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_fused_elementwise_ops_match_the_hf_modules(tmp_path) -> None:
    """slime/backends/fsdp/fused_ops.py (compiled on CUDA only) has the HF modules' math; checked eagerly here."""
    from transformers import AutoModelForCausalLM
    from transformers.models.qwen3 import modeling_qwen3

    from slime.backends.fsdp import fused_ops
    from tools.make_tiny_model import make_model

    model = AutoModelForCausalLM.from_pretrained(make_model("tiny", tmp_path / "m"), dtype=torch.float32)
    layer = model.model.layers[0]
    torch.manual_seed(0)
    with torch.no_grad():
        layer.input_layernorm.weight.uniform_(0.5, 1.5)
    x = torch.randn(1, 5, 64, dtype=torch.bfloat16)
    norm = layer.input_layernorm
    assert torch.equal(fused_ops._rms_norm(x, norm.weight, norm.variance_epsilon), norm(x))
    g, u = torch.randn(3, 128), torch.randn(3, 128)
    assert torch.equal(fused_ops._silu_mul(g, u), layer.mlp.act_fn(g) * u)
    q, k = torch.randn(1, 4, 5, 16), torch.randn(1, 2, 5, 16)
    cos, sin = torch.randn(1, 5, 16), torch.randn(1, 5, 16)
    for ours, theirs in zip(fused_ops._rope(q, k, cos, sin, 1), modeling_qwen3.apply_rotary_pos_emb(q, k, cos, sin)):
        assert torch.equal(ours, theirs)
    assert not fused_ops.enabled("cpu")


def test_cpu_training_attends_per_sample_unless_layers_are_compiled(monkeypatch) -> None:
    """sdpa on CPU would attend over a dense T x T block-diagonal mask; compiled layers keep it (no per-sample list)."""
    from slime.backends.fsdp.model import attention_implementation

    monkeypatch.delenv("SLIME_FSDP_COMPILE", raising=False)
    assert attention_implementation("cpu") == PACKED_ATTENTION
    monkeypatch.setenv("SLIME_FSDP_COMPILE", "layer")
    assert attention_implementation("cpu") == "sdpa"
