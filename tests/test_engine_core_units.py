"""Unit tests of the engine core's pieces that need no model: block manager, scheduler, sampler.

    cd /work/main && python -m pytest -q tests/test_engine_core_units.py
"""

from __future__ import annotations

import torch

from slime.engine.block_manager import BlockManager
from slime.engine.sampler import Sampler, SamplingTensors, uniform_noise
from slime.engine.sampling_params import SamplingParams
from slime.engine.scheduler import Scheduler
from slime.engine.sequence import Sequence


def seq(tokens: list[int], request_id: str = "r", **params) -> Sequence:
    return Sequence(request_id, tokens, SamplingParams(**params), sampling_seed=0)


def admit(manager: BlockManager, s: Sequence) -> list[int]:
    hits = manager.match_prefix(s)
    assert manager.can_allocate(s, hits)
    manager.allocate(s, hits)
    return hits


def test_prefix_blocks_are_shared_and_ref_counted():
    manager = BlockManager(num_blocks=10, block_size=4)
    a, b = seq(list(range(10)), "a"), seq(list(range(10)), "b")
    assert admit(manager, a) == []
    hits = admit(manager, b)
    assert hits == a.block_table[:2] and b.num_computed_tokens == 8
    assert b.block_table[2] != a.block_table[2]  # the block with the last token is never shared
    assert manager.num_free_blocks == 10 - 4
    manager.deallocate(a)
    assert manager.num_free_blocks == 10 - 3  # shared blocks stay with b
    manager.deallocate(b)
    assert manager.num_free_blocks == 10


def test_a_different_prefix_does_not_match_and_last_token_is_recomputed():
    manager = BlockManager(num_blocks=10, block_size=4)
    admit(manager, seq([1, 2, 3, 4, 5, 6, 7, 8], "a"))
    assert manager.match_prefix(seq([1, 2, 3, 4, 5, 6, 7, 9])) == manager.match_prefix(seq([1, 2, 3, 4, 0]))
    assert len(manager.match_prefix(seq([1, 2, 3, 4, 5, 6, 7, 9]))) == 1
    assert manager.match_prefix(seq([9, 2, 3, 4, 5, 6, 7, 8, 1])) == []
    assert len(manager.match_prefix(seq([1, 2, 3, 4, 5, 6, 7, 8]))) == 1  # exactly 2 full blocks: last one recomputed
    assert len(manager.match_prefix(seq([1, 2, 3, 4, 5, 6, 7, 8, 0]))) == 2


def test_freed_prefixes_survive_until_evicted_unhashed_blocks_go_first():
    manager = BlockManager(num_blocks=5, block_size=2)
    a = seq([1, 2, 3, 4, 5], "a")  # blocks [1,2] [3,4] registered, [5] not
    admit(manager, a)
    manager.deallocate(a)  # tail first: [3,4] is the least recently freed cached block
    assert len(manager.match_prefix(seq([1, 2, 3, 4, 0]))) == 2
    b = seq([7, 8, 9, 10, 11, 12, 13], "b")  # 4 blocks: the 3 unhashed ones, then evicts [3,4]
    admit(manager, b)
    assert len(manager.match_prefix(seq([1, 2, 3, 4, 0]))) == 1  # only [1,2] is left
    manager.deallocate(b)
    c = seq([1, 2, 3, 4, 0], "c")
    assert len(admit(manager, c)) == 1 and c.num_computed_tokens == 2


def test_can_allocate_counts_revived_cached_blocks():
    manager = BlockManager(num_blocks=3, block_size=2)
    a = seq([1, 2, 3], "a")
    admit(manager, a)
    manager.deallocate(a)
    b = seq([1, 2, 5, 6, 7], "b")  # reuses the cached [1,2] block but needs 2 more: 3 blocks in all
    hits = manager.match_prefix(b)
    assert len(hits) == 1 and manager.can_allocate(b, hits)
    c = seq([1, 2, 5, 6, 7, 8, 9], "c")  # 4 blocks > 3
    assert not manager.can_allocate(c, manager.match_prefix(c))


def test_reset_prefix_cache_forgets_everything():
    manager = BlockManager(num_blocks=6, block_size=2)
    a = seq([1, 2, 3, 4, 5], "a")
    admit(manager, a)
    manager.reset_prefix_cache()
    assert manager.match_prefix(seq([1, 2, 3, 4, 5])) == []
    manager.append_slot(a)  # a keeps running but no longer registers blocks from before the reset
    assert manager.hash_to_block == {}
    manager.deallocate(a)
    assert manager.num_free_blocks == 6 and not manager.free_cached


def test_scheduler_budget_prefill_then_decode_and_preemption():
    manager = BlockManager(num_blocks=4, block_size=2)
    scheduler = Scheduler(manager, max_num_seqs=8, max_num_batched_tokens=5, eos_token_ids=[0], max_seq_len=8)
    seqs = [seq([10 + i, 20 + i, 30 + i], f"s{i}", max_new_tokens=10) for i in range(3)]
    for s in seqs:
        scheduler.add(s)
    batch, is_prefill = scheduler.schedule()
    assert is_prefill and batch == seqs[:1]  # 3 + 3 tokens exceed the budget of 5
    scheduler.postprocess(batch, [1], [0.0])
    batch, is_prefill = scheduler.schedule()
    assert is_prefill and batch == seqs[1:2]  # s2 would need blocks 5-6 of 4
    scheduler.postprocess(batch, [1], [0.0])
    batch, is_prefill = scheduler.schedule()
    assert not is_prefill and batch == seqs[:2]  # 4 tokens each fit their 2 blocks
    scheduler.postprocess(batch, [1, 1], [0.0, 0.0])
    batch, is_prefill = scheduler.schedule()  # 5 tokens need a third block each: the newest is preempted
    assert not is_prefill and batch == seqs[:1] and scheduler.num_preemptions == 1
    assert list(scheduler.waiting) == [seqs[1], seqs[2]] and seqs[1].block_table == []
    scheduler.postprocess(batch, [0], [0.0])  # EOS finishes s0 and frees its blocks
    assert seqs[0].finish_reason == {"type": "stop", "matched": 0} and manager.num_free_blocks == 4
    batch, is_prefill = scheduler.schedule()
    assert is_prefill and batch == [seqs[1]] and seqs[1].num_output_tokens == 2  # recomputed with its tokens


def test_noise_is_a_pure_function_of_seed_position_and_index():
    seeds = torch.tensor([1, 2, 1, 2**40 + 1])
    positions = torch.tensor([0, 0, 5, 0])
    noise = uniform_noise(seeds, positions, 1000)
    assert ((noise > 0) & (noise < 1)).all()
    assert torch.equal(uniform_noise(seeds[2:3], positions[2:3], 1000)[0], noise[2])
    assert not torch.equal(noise[0], noise[1]) and not torch.equal(noise[0], noise[2])
    assert not torch.equal(noise[0], noise[3])  # the high 32 bits of the seed count
    assert abs(noise.mean().item() - 0.5) < 0.02 and abs(noise.var().item() - 1 / 12) < 0.01


# seed 96 at output position 3 hashes vocabulary index 33699 of a 151,936-token vocabulary to the top 24-bit
# value, whose u rounded to 1.0 in float32: -log(-log(u)) = inf, so that token won the Gumbel race whatever its
# logit (a uniformly random token for 0.9% of all sampled tokens; found by rollout_fidelity.py on an H100)
TOP_NOISE_SEED, TOP_NOISE_POSITION, TOP_NOISE_INDEX, QWEN_VOCAB = 96, 3, 33699, 151936


def test_no_token_gets_infinite_gumbel_noise():
    u = uniform_noise(torch.tensor([TOP_NOISE_SEED]), torch.tensor([TOP_NOISE_POSITION]), QWEN_VOCAB)
    assert int(u.argmax()) == TOP_NOISE_INDEX and float(u.max()) < 1.0
    logits = torch.full((1, QWEN_VOCAB), -40.0)
    logits[0, 7] = 0.0  # every other token is e**-40 as likely
    t = SamplingTensors.build([SamplingParams(temperature=1.0)], [TOP_NOISE_SEED], [TOP_NOISE_POSITION], QWEN_VOCAB,
                              "cpu")
    tokens, logprobs = Sampler()(logits, t)
    assert tokens.tolist() == [7] and abs(float(logprobs[0])) < 1e-6


def sample_many(logits: torch.Tensor, n: int, **params) -> torch.Tensor:
    rows = logits.expand(n, -1).clone()
    p = [SamplingParams(**params, seed=s) for s in range(n)]
    tensors = SamplingTensors.build(p, list(range(n)), [0] * n, logits.shape[-1], "cpu")
    tokens, _ = Sampler()(rows, tensors)
    return torch.bincount(tokens, minlength=logits.shape[-1]).float() / n


def test_sampling_frequencies_follow_the_truncated_distribution():
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0]])
    n = 6000
    probs = torch.softmax(logits[0] / 0.8, -1)
    freq = sample_many(logits, n, temperature=0.8)
    assert (freq - probs).abs().max() < 4 * (0.25 / n) ** 0.5

    freq = sample_many(logits, n, temperature=1.0, top_k=3)
    expected = torch.softmax(logits[0, :3], -1)
    assert freq[3:].sum() == 0 and (freq[:3] - expected).abs().max() < 0.04

    probs = torch.softmax(logits[0], -1)  # top_p 0.6: keep tokens while the mass before them is <= 0.6
    keep = (probs.cumsum(0) - probs) <= 0.6
    freq = sample_many(logits, n, temperature=1.0, top_p=0.6)
    expected = torch.where(keep, probs, 0) / probs[keep].sum()
    assert freq[~keep].sum() == 0 and (freq - expected).abs().max() < 0.04

    freq = sample_many(logits, n, temperature=1.0, min_p=0.3)  # keep p >= 0.3 * p_max
    keep = probs >= 0.3 * probs.max()
    assert freq[~keep].sum() == 0 and freq[keep].min() > 0


def test_logprobs_are_untruncated_and_greedy_rows_use_temperature_one():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.5, top_k=2, seed=1),
              SamplingParams(temperature=2.0, top_p=0.1, seed=2)]
    tensors = SamplingTensors.build(params, [0, 1, 2], [3, 3, 3], 50, "cpu")
    tokens, logprobs = Sampler()(logits, tensors)
    assert tokens[0] == logits[0].argmax()
    assert tokens[1] in logits[1].topk(2).indices
    for row, temperature in enumerate([1.0, 0.5, 2.0]):
        expected = torch.log_softmax(logits[row] / temperature, -1)[tokens[row]]
        torch.testing.assert_close(logprobs[row], expected)


def test_auto_dtype_is_float32_on_cpu_and_never_float32_on_gpu(tiny_model_dir):
    from slime.engine.config import EngineConfig

    gpu, cpu = EngineConfig(str(tiny_model_dir), device="cuda"), EngineConfig(str(tiny_model_dir), device="cpu")
    assert [cpu.resolve_dtype(d) for d in ("bfloat16", torch.float16, None)] == [torch.float32] * 3
    assert [gpu.resolve_dtype(d) for d in ("bfloat16", "torch.float16", torch.float32, "float32", None)] == [
        torch.bfloat16, torch.float16, torch.bfloat16, torch.bfloat16, torch.bfloat16]
    explicit = EngineConfig(str(tiny_model_dir), device="cuda", dtype="float32")
    assert explicit.resolve_dtype("bfloat16") == torch.float32 and explicit.resolve_dtype("float32") == torch.float32
