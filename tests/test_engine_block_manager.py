"""The block manager's one-pass decode allocation (`append_slots`) against the per-sequence one.

    cd /work/main && python -m pytest -q tests/test_engine_block_manager.py
"""

from __future__ import annotations

import random

from slime.engine.block_manager import BlockManager
from slime.engine.sampling_params import SamplingParams
from slime.engine.sequence import Sequence


def _running_batch(seed: int, num_blocks: int, block_size: int = 4) -> tuple[BlockManager, list[Sequence]]:
    """A block manager whose sequences were admitted, then each given one new token (the decode step's input)."""
    rng = random.Random(seed)
    manager = BlockManager(num_blocks, block_size)
    seqs = []
    shared_prompt = [rng.randrange(100) for _ in range(9)]
    for i in range(12):
        prompt = shared_prompt if i % 3 == 0 else [rng.randrange(100) for _ in range(rng.randrange(1, 14))]
        seq = Sequence(f"r{i}", prompt, SamplingParams(), sampling_seed=i)
        hits = manager.match_prefix(seq)
        if not manager.can_allocate(seq, hits):
            break
        manager.allocate(seq, hits)
        seq.append_token(rng.randrange(100), -1.0)
        seqs.append(seq)
    return manager, seqs


def _state(manager: BlockManager, seqs: list[Sequence]) -> tuple:
    return ([(s.block_table, s.block_hashes) for s in seqs], sorted(manager.hash_to_block.items()),
            manager.num_free_blocks, [(b.ref_count, b.hash) for b in manager.blocks])


def test_append_slots_gives_what_append_slot_gives_one_by_one():
    for seed in range(20):
        one_pass, seqs_a = _running_batch(seed, num_blocks=64)
        one_by_one, seqs_b = _running_batch(seed, num_blocks=64)
        assert one_pass.append_slots(seqs_a)
        for seq in seqs_b:
            assert one_by_one.can_append(seq)
            one_by_one.append_slot(seq)
        assert _state(one_pass, seqs_a) == _state(one_by_one, seqs_b)
        assert all(len(s.block_table) * 4 >= len(s) for s in seqs_a)


def test_append_slots_changes_nothing_when_the_free_blocks_do_not_cover_the_batch():
    manager, seqs = _running_batch(0, num_blocks=64)
    needing = [s for s in seqs if len(s) > len(s.block_table) * manager.block_size]
    assert needing, "the fixture must leave some sequences one block short"
    while manager.num_free_blocks >= len(needing):  # take free blocks away until one is missing
        manager._take_free_block()
    before = _state(manager, seqs)
    assert not manager.append_slots(seqs)
    assert _state(manager, seqs) == before
