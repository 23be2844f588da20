"""The engine's Triton kernels against the torch reference: paged decode/prefill, KV store, sampling.

    cd /work/main && python -m pytest -q tests/test_engine_gpu_kernels.py

Runs on CUDA; without CUDA it runs the same kernels on CPU tensors under Triton's interpreter
(`TRITON_INTERPRET=1`, tiny shapes) when Triton is installed, and skips otherwise.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the kernels' import (decoration time)

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
DEVICE = "cuda" if HAS_CUDA else "cpu"
HALF = torch.bfloat16 if HAS_CUDA else torch.float16  # the interpreter mishandles bf16 (numpy has none)


def _patch_interpreter_scalar_index() -> None:
    """Triton 3.6's interpreter keeps scalars as 1-element arrays, which numpy >= 2.4 won't turn into
    an index (`range(start, end)` with loaded bounds); make `__index__` take the element."""
    import triton.runtime.interpreter as interpreter

    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    if not getattr(original, "slime_patched", False):
        patched.slime_patched = True  # type: ignore[attr-defined]
        interpreter._patch_lang_tensor = patched


if not HAS_CUDA and importlib.util.find_spec("triton") is not None:
    _patch_interpreter_scalar_index()


def _paged_layout(context_lens: list[int], block_size: int, num_blocks: int, generator: torch.Generator):
    """Random, scattered block tables for the given lengths: (tables as lists, padded int32 tensor)."""
    order = torch.randperm(num_blocks, generator=generator).tolist()
    tables, used = [], 0
    for n in context_lens:
        count = (n + block_size - 1) // block_size
        tables.append(order[used:used + count])
        used += count
    assert used <= num_blocks
    width = max(len(t) for t in tables)
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=DEVICE)
    return tables, padded


def _reference_attention(q, k_cache, v_cache, tables, context_lens, query_lens, scale):
    """float64 causal attention of each sequence's last query_len positions to its whole context."""
    _, block_size, kv_heads, head_dim = k_cache.shape
    heads = q.shape[1]
    k_flat = k_cache.reshape(-1, kv_heads, head_dim).double()
    v_flat = v_cache.reshape(-1, kv_heads, head_dim).double()
    outputs, start = [], 0
    for table, n, qn in zip(tables, context_lens, query_lens):
        slots = torch.tensor([table[p // block_size] * block_size + p % block_size for p in range(n)], device=q.device)
        k = k_flat[slots].repeat_interleave(heads // kv_heads, dim=1)
        v = v_flat[slots].repeat_interleave(heads // kv_heads, dim=1)
        qs = q[start:start + qn].double()
        scores = torch.einsum("qhd,khd->hqk", qs, k) * scale
        q_pos = torch.arange(n - qn, n, device=q.device)
        scores = scores.masked_fill(torch.arange(n, device=q.device)[None, :] > q_pos[:, None], float("-inf"))
        outputs.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), v))
        start += qn
    return torch.cat(outputs)


def _rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not torch.isnan(out).any()
    return ((out.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("splits", [1, 2, 4])
def test_paged_decode_matches_reference(splits):
    from slime.engine.kernels.paged_attention import paged_decode

    g = torch.Generator().manual_seed(splits)
    heads, kv_heads, head_dim, block_size, num_blocks = 4, 2, 16, 4, 48
    context_lens = [5, 1, 13, 64, 30]
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(DEVICE)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(DEVICE)
    tables, padded = _paged_layout(context_lens, block_size, num_blocks, g)
    q = torch.randn(len(context_lens), heads, head_dim, generator=g).to(DEVICE)
    out = paged_decode(q, k_cache, v_cache, padded, torch.tensor(context_lens, dtype=torch.int32, device=DEVICE),
                       0.25, num_splits=splits)
    ref = _reference_attention(q, k_cache, v_cache, tables, context_lens, [1] * len(context_lens), 0.25)
    assert _rel_error(out, ref) < 1e-5


def test_paged_decode_half_and_zero_length_rows():
    from slime.engine.kernels.paged_attention import paged_decode

    g = torch.Generator().manual_seed(7)
    heads, kv_heads, head_dim, block_size, num_blocks = 4, 1, 32, 16, 16
    context_lens = [40, 0, 17]  # 0 = a CUDA-graph padding row: must come out finite (zeros), not NaN
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(DEVICE, HALF)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(DEVICE, HALF)
    tables, padded = _paged_layout([max(n, 1) for n in context_lens], block_size, num_blocks, g)
    q = torch.randn(3, heads, head_dim, generator=g).to(DEVICE, HALF)
    out = paged_decode(q, k_cache, v_cache, padded, torch.tensor(context_lens, dtype=torch.int32, device=DEVICE), 0.2)
    assert out.dtype == HALF and torch.equal(out[1].float(), torch.zeros_like(out[1].float()))
    live = [0, 2]
    ref = _reference_attention(q[live], k_cache, v_cache, [tables[i] for i in live], [40, 17], [1, 1], 0.2)
    assert _rel_error(out[live], ref) < 1e-2


def test_paged_prefill_with_cached_prefix_matches_reference():
    from slime.engine.kernels.paged_attention import paged_prefill

    g = torch.Generator().manual_seed(3)
    heads, kv_heads, head_dim, block_size, num_blocks = 4, 2, 16, 8, 40
    context_lens = [70, 9, 33]
    query_lens = [70, 1, 12]  # whole prompt, one new token, new tail after a cached prefix
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(DEVICE)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(DEVICE)
    tables, padded = _paged_layout(context_lens, block_size, num_blocks, g)
    q = torch.randn(sum(query_lens), heads, head_dim, generator=g).to(DEVICE)
    starts = torch.tensor([0, 70, 71, 83], dtype=torch.int32, device=DEVICE)
    out = paged_prefill(q, k_cache, v_cache, padded, starts, torch.tensor(context_lens, dtype=torch.int32,
                                                                          device=DEVICE), max(query_lens), 0.3)
    ref = _reference_attention(q, k_cache, v_cache, tables, context_lens, query_lens, 0.3)
    assert _rel_error(out, ref) < 1e-5


def test_store_kv_writes_slots_and_skips_padding():
    from slime.engine.kernels.paged_attention import store_kv

    g = torch.Generator().manual_seed(5)
    k_cache = torch.full((4, 4, 2, 8), -7.0, device=DEVICE)
    v_cache = torch.full((4, 4, 2, 8), -7.0, device=DEVICE)
    k = torch.randn(3, 2, 8, generator=g).to(DEVICE)
    v = torch.randn(3, 2, 8, generator=g).to(DEVICE)
    store_kv(k, v, k_cache, v_cache, torch.tensor([13, -1, 2], device=DEVICE))
    flat_k, flat_v = k_cache.view(16, 2, 8), v_cache.view(16, 2, 8)
    assert torch.equal(flat_k[13], k[0]) and torch.equal(flat_v[2], v[2])
    untouched = [s for s in range(16) if s not in (13, 2)]
    assert bool((flat_k[untouched] == -7.0).all()) and bool((flat_v[untouched] == -7.0).all())


def test_gumbel_sample_matches_torch_sampler():
    from slime.engine.kernels.sampling import gumbel_sample
    from slime.engine.sampler import Sampler, SamplingTensors
    from slime.engine.sampling_params import SamplingParams

    g = torch.Generator().manual_seed(11)
    vocab = 3001  # not a multiple of the kernel's tile
    temps = [0.0, 0.6, 1.0, 1.7, 0.6, 0.6]
    params = [SamplingParams(temperature=t) for t in temps]
    seeds = [1, 2, 3, 2**40 + 5, 9, 9]
    positions = [0, 5, 9, 3, 0, 1]  # the last two: same seed, different step -> independent draws
    logits = (torch.randn(len(temps), vocab, generator=g) * 3).to(DEVICE)
    t = SamplingTensors.build(params, seeds, positions, vocab, DEVICE)
    ref_tokens, ref_logprobs = Sampler()(logits, t)
    tokens, logprobs = gumbel_sample(logits, t.temperatures, t.greedy, t.seeds, t.positions)
    assert tokens.tolist() == ref_tokens.tolist()
    torch.testing.assert_close(logprobs, ref_logprobs, atol=1e-5, rtol=0)
    assert tokens[0].item() == logits[0].argmax().item()


def test_fused_sampler_masks_stop_ids_until_min_new_tokens():
    from slime.engine.sampler import Sampler, SamplingTensors
    from slime.engine.sampling_params import SamplingParams

    g = torch.Generator().manual_seed(12)
    vocab = 700
    logits = torch.randn(4, vocab, generator=g)
    logits[:, 2] = 25.0  # EOS dominates every row
    logits[:, 5] = 15.0  # then a stop token id
    params = [SamplingParams(temperature=t, min_new_tokens=2, stop_token_ids=[5]) for t in (0.0, 0.9, 1.0, 0.0)]
    t = SamplingTensors.build(params, [3, 4, 5, 6], [0, 1, 2, 7], vocab, DEVICE, eos_token_ids=[2])
    ref_tokens, ref_logprobs = Sampler()(logits.to(DEVICE), t)
    tokens, logprobs = Sampler(fused_gpu_sampling=True)(logits.to(DEVICE), t)
    assert tokens.tolist() == ref_tokens.tolist()
    torch.testing.assert_close(logprobs, ref_logprobs, atol=1e-5, rtol=0)
    assert not set(tokens[:2].tolist()) & {2, 5} and tokens[2:].tolist() == [2, 2]


@pytest.mark.skipif(not HAS_CUDA, reason="thousands of programs: a minute under the interpreter")
def test_gumbel_sample_follows_the_distribution():
    """Many draws of one row at T=0.5: token frequencies match softmax(logits / T)."""
    from slime.engine.kernels.sampling import gumbel_sample

    rows, vocab = 4000, 8
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -2.0, 0.3, 1.5]], device=DEVICE).expand(rows, vocab).contiguous()
    temperatures = torch.full((rows,), 0.5, device=DEVICE)
    greedy = torch.zeros(rows, dtype=torch.bool, device=DEVICE)
    seeds = torch.arange(rows, device=DEVICE) * 7919
    tokens, _ = gumbel_sample(logits, temperatures, greedy, seeds, torch.zeros(rows, dtype=torch.int64, device=DEVICE))
    freq = torch.bincount(tokens.cpu(), minlength=vocab).double() / rows
    expected = torch.softmax(logits[0].cpu().double() / 0.5, -1)
    assert (freq - expected).abs().max().item() < 0.025  # about 3 standard errors at 4000 draws


def test_gumbel_kernel_gives_no_token_infinite_noise():
    """The seed/position/index whose noise rounded to u = 1.0 (test_engine_core_units): the kernel too keeps the
    e**-40-unlikely token from winning."""
    from test_engine_core_units import QWEN_VOCAB, TOP_NOISE_POSITION, TOP_NOISE_SEED

    from slime.engine.kernels.sampling import gumbel_sample

    logits = torch.full((1, QWEN_VOCAB), -40.0, device=DEVICE)
    logits[0, 7] = 0.0
    greedy = torch.zeros(1, dtype=torch.bool, device=DEVICE)
    seed, position = torch.tensor([TOP_NOISE_SEED], device=DEVICE), torch.tensor([TOP_NOISE_POSITION], device=DEVICE)
    tokens, logprobs = gumbel_sample(logits, torch.ones(1, device=DEVICE), greedy, seed, position)
    assert tokens.tolist() == [7] and abs(float(logprobs[0])) < 1e-5


def test_engine_with_triton_attention_matches_reference_backend(tiny_model_dir):
    """Whole engine, tiny model: the Triton backend gives the reference backend's tokens and log-probs."""
    from slime.engine import EngineConfig, LLMEngine, SamplingParams
    from slime.engine.kernels.paged_attention import TritonPagedAttention

    prompts = [[40, 41, 42, 43, 44, 45, 46, 47, 48], [5, 6, 7], [40, 41, 42, 43, 44, 45, 46, 47, 9]]
    params = [SamplingParams(temperature=0.0, max_new_tokens=6), SamplingParams(temperature=0.8, max_new_tokens=6,
                                                                                seed=3),
              SamplingParams(temperature=0.0, max_new_tokens=6)]
    results = []
    for triton_backend in (False, True):
        engine = LLMEngine(EngineConfig(str(tiny_model_dir), device=DEVICE, dtype="float32", kv_cache_tokens=512,
                                        block_size=4, enforce_eager=True))
        if triton_backend:
            for layer in engine.runner.model.attention_layers():
                layer.backend = TritonPagedAttention()
        results.append(engine.generate(prompts, params))
    reference, triton_out = results
    for ref, out in zip(reference, triton_out):
        assert out["token_ids"] == ref["token_ids"]
        torch.testing.assert_close(torch.tensor(out["logprobs"]), torch.tensor(ref["logprobs"]), atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, HALF])
def test_fused_ops_match_the_torch_modules(dtype):
    from types import SimpleNamespace

    from slime.engine.kernels.fused_ops import qk_norm_rope, rms_norm, silu_and_mul
    from slime.engine.models.layers import RMSNorm, RotaryEmbedding

    g = torch.Generator().manual_seed(13)
    tokens, heads, head_dim, hidden = 5, 3, 16, 48
    exact = dict(atol=0, rtol=0) if dtype == torch.float32 else dict(atol=2e-2, rtol=1e-2)  # rsqrt/exp ulps
    norm = RMSNorm(hidden, 1e-6, dtype).to(DEVICE)
    norm.weight.data.copy_(1 + 0.3 * torch.randn(hidden, generator=g))
    x = (3 * torch.randn(tokens, hidden, generator=g)).to(DEVICE, dtype)
    torch.testing.assert_close(rms_norm(x, norm.weight, norm.eps), norm(x), **(exact if dtype != torch.float32
                                                                             else dict(atol=1e-6, rtol=1e-6)))

    qkv = torch.randn(tokens, 2 * heads * head_dim, generator=g).to(DEVICE, dtype)
    q = qkv[:, :heads * head_dim].view(tokens, heads, head_dim)  # strided rows, as after the fused projection
    head_norm = RMSNorm(head_dim, 1e-6, dtype).to(DEVICE)
    head_norm.weight.data.copy_(3 + 0.2 * torch.randn(head_dim, generator=g))
    rotary = RotaryEmbedding(SimpleNamespace(rope_theta=10000.0, name_or_path="test"), head_dim, 64).to(DEVICE)
    positions = torch.tensor([0, 7, 3, 63, 20], device=DEVICE)
    expected, _ = rotary(positions, head_norm(q), head_norm(q))
    got = qk_norm_rope(q, head_norm.weight, head_norm.eps, rotary.cos, rotary.sin, positions)
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else exact
    torch.testing.assert_close(got, expected, **tolerance)
    rope_only, _ = rotary(positions, q, q)
    torch.testing.assert_close(qk_norm_rope(q, None, 0.0, rotary.cos, rotary.sin, positions), rope_only, **tolerance)

    gate_up = (2 * torch.randn(tokens, 2 * 40, generator=g)).to(DEVICE, dtype)
    gate, up = gate_up.split(40, dim=-1)
    torch.testing.assert_close(silu_and_mul(gate_up), torch.nn.functional.silu(gate) * up, **tolerance)


def test_engine_with_fused_ops_matches_eager_modules(tiny_model_dir):
    from slime.engine import EngineConfig, LLMEngine, SamplingParams
    from slime.engine.kernels.paged_attention import TritonPagedAttention

    prompts = [[40, 41, 42, 43, 44, 45, 46, 47, 48], [5, 6, 7]]
    params = SamplingParams(temperature=0.0, max_new_tokens=5)
    results = []
    for fused in (False, True):
        engine = LLMEngine(EngineConfig(str(tiny_model_dir), device=DEVICE, dtype="float32", kv_cache_tokens=256,
                                        block_size=4, enforce_eager=True))
        for layer in engine.runner.model.attention_layers():
            layer.backend = TritonPagedAttention()
        if fused:
            assert engine.runner.model.set_fused_ops(True)
            model = engine.runner.model
            assert model.model.norm.fused and all(layer.self_attn.fused and layer.mlp.fused
                                                  for layer in model.model.layers)
        results.append(engine.generate(prompts, params))
    for ref, out in zip(*results):
        assert out["token_ids"] == ref["token_ids"]
        torch.testing.assert_close(torch.tensor(out["logprobs"]), torch.tensor(ref["logprobs"]), atol=1e-4, rtol=0)


def test_paged_decode_reads_tables_through_row_indirection():
    """CUDA-graph layout: sequence i's blocks are in row table_rows[i] of a persistent table."""
    from slime.engine.kernels.paged_attention import paged_decode

    g = torch.Generator().manual_seed(17)
    heads, kv_heads, head_dim, block_size, num_blocks = 4, 2, 16, 4, 32
    context_lens = [9, 3, 14]
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(DEVICE)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(DEVICE)
    tables, padded = _paged_layout(context_lens, block_size, num_blocks, g)
    persistent = torch.zeros(6, padded.shape[1], dtype=torch.int32, device=DEVICE)
    rows = torch.tensor([4, 0, 2], device=DEVICE)
    persistent[rows] = padded
    q = torch.randn(3, heads, head_dim, generator=g).to(DEVICE)
    out = paged_decode(q, k_cache, v_cache, persistent, torch.tensor(context_lens, device=DEVICE), 0.3,
                       table_rows=rows)
    ref = _reference_attention(q, k_cache, v_cache, tables, context_lens, [1, 1, 1], 0.3)
    assert _rel_error(out, ref) < 1e-5
