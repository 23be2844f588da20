"""Paged KV-cache bookkeeping: fixed-size blocks, reference counts and prefix sharing.

    from slime.engine.block_manager import BlockManager
    manager = BlockManager(num_blocks=64, block_size=16)

A block is `block_size` token slots in every layer's K/V tensors; slot = block_id * block_size +
offset. Full blocks are registered under a chained hash of all token ids up to and including the
block as soon as the step that writes their K/V is scheduled, so another sequence with the same prefix (e.g. the n samples of one
prompt) maps the same physical blocks (ref_count > 1) instead of recomputing them. Freed blocks keep
their hash and stay reusable until they are evicted (least recently freed first; unhashed blocks are
handed out before any cached one). A sequence's last token is never served from the cache, so each
admission computes at least one position and gets logits.

Because a block can be shared in the same step that first writes it (the n samples of a group are
admitted together), attention backends must write every new K/V of a layer before any sequence of
the batch reads the cache for that layer.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable

from slime.engine.sequence import Sequence


def chain_hash(prefix_hash: int, token_ids: tuple[int, ...]) -> int:
    return hash((prefix_hash, token_ids))


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.token_ids: tuple[int, ...] = ()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        assert num_blocks > 0 and block_size > 0
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_unhashed: deque[int] = deque(range(num_blocks))
        self.free_cached: OrderedDict[int, None] = OrderedDict()  # ref_count 0 but still holding a prefix
        self.hash_to_block: dict[int, int] = {}
        self.epoch = 0

    # ---- capacity -------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_unhashed) + len(self.free_cached)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def blocks_needed(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    # ---- admission (prefill) ----------------------------------------------------------------------
    def match_prefix(self, seq: Sequence) -> list[int]:
        """Physical blocks already holding this sequence's leading full blocks (never its last token)."""
        hits: list[int] = []
        prefix_hash = -1
        for index in range((len(seq) - 1) // self.block_size):
            tokens = seq.block_tokens(index, self.block_size)
            prefix_hash = chain_hash(prefix_hash, tokens)
            block_id = self.hash_to_block.get(prefix_hash)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            hits.append(block_id)
        return hits

    def can_allocate(self, seq: Sequence, hits: list[int]) -> bool:
        fresh = self.blocks_needed(len(seq)) - len(hits)
        revived = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        return fresh + revived <= self.num_free_blocks

    def allocate(self, seq: Sequence, hits: list[int]) -> None:
        """Give `seq` blocks for all its tokens, sharing `hits` (from `match_prefix`)."""
        assert not seq.block_table
        seq.block_hashes = []
        for block_id in hits:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_cached[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
            assert block.hash is not None
            seq.block_hashes.append(block.hash)
        seq.num_computed_tokens = len(hits) * self.block_size
        seq.cache_epoch = self.epoch
        self._grow(seq, len(seq))
        self._register_full_blocks(seq)

    # ---- decode ---------------------------------------------------------------------------------
    def can_append(self, seq: Sequence) -> bool:
        return self.blocks_needed(len(seq)) - len(seq.block_table) <= self.num_free_blocks

    def append_slot(self, seq: Sequence) -> None:
        self._grow(seq, len(seq))
        self._register_full_blocks(seq)

    def append_slots(self, seqs: Iterable[Sequence]) -> bool:
        """`append_slot` for every sequence when the free blocks cover all of them (one pass, the decode step's
        common case); False, with nothing changed, when they do not."""
        seqs = list(seqs)
        block_size = self.block_size
        short = [seq for seq in seqs if len(seq.token_ids) > len(seq.block_table) * block_size]
        needed = sum(self.blocks_needed(len(seq.token_ids)) - len(seq.block_table) for seq in short)
        if needed > self.num_free_blocks:
            return False
        for seq in short:
            self._grow(seq, len(seq.token_ids))
        epoch = self.epoch
        for seq in seqs:
            if seq.cache_epoch == epoch and self._num_full_blocks(seq) > len(seq.block_hashes):
                self._register_full_blocks(seq)
        return True

    def _num_full_blocks(self, seq: Sequence) -> int:
        """Blocks full of known tokens (overlap scheduling's trailing placeholders are not content)."""
        return (len(seq.token_ids) - seq.num_pending) // self.block_size

    def _register_full_blocks(self, seq: Sequence) -> None:
        """Register the full blocks whose K/V the scheduled step writes, so other sequences can share them."""
        if seq.cache_epoch != self.epoch:
            return
        for index in range(len(seq.block_hashes), self._num_full_blocks(seq)):
            tokens = seq.block_tokens(index, self.block_size)
            prev = seq.block_hashes[-1] if seq.block_hashes else -1
            block_hash = chain_hash(prev, tokens)
            seq.block_hashes.append(block_hash)
            block = self.blocks[seq.block_table[index]]
            if block.hash is not None:  # shared block, already registered
                continue
            if block_hash in self.hash_to_block:  # same content computed twice: keep the first copy
                continue
            block.hash = block_hash
            block.token_ids = tokens
            self.hash_to_block[block_hash] = block.block_id

    # ---- release --------------------------------------------------------------------------------
    def deallocate(self, seq: Sequence) -> None:
        # Free the tail first so the leading (most shareable) blocks are evicted last.
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            assert block.ref_count > 0
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.hash is not None:
                    self.free_cached[block_id] = None
                else:
                    self.free_unhashed.append(block_id)
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0

    def reset_prefix_cache(self) -> None:
        """Forget every registered prefix (after a weight update the cached K/V are stale)."""
        self.epoch += 1
        self.hash_to_block.clear()
        for block in self.blocks:
            block.hash = None
            block.token_ids = ()
        self.free_unhashed.extend(self.free_cached)
        self.free_cached.clear()

    def num_shared_blocks(self) -> int:
        return sum(1 for b in self.blocks if b.ref_count > 1)

    # ---- internals ------------------------------------------------------------------------------
    def _grow(self, seq: Sequence, num_tokens: int) -> None:
        for _ in range(self.blocks_needed(num_tokens) - len(seq.block_table)):
            seq.block_table.append(self._take_free_block())

    def _take_free_block(self) -> int:
        if self.free_unhashed:
            block_id = self.free_unhashed.popleft()
        else:
            assert self.free_cached, "no free KV block; the scheduler must check capacity first"
            block_id, _ = self.free_cached.popitem(last=False)
            block = self.blocks[block_id]
            if self.hash_to_block.get(block.hash) == block_id:  # type: ignore[arg-type]
                del self.hash_to_block[block.hash]  # type: ignore[arg-type]
        block = self.blocks[block_id]
        assert block.ref_count == 0
        block.ref_count = 1
        block.hash = None
        block.token_ids = ()
        return block_id
