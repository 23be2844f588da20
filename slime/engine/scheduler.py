"""Continuous batching: which sequences run in the next forward pass, and what happens after it.

    from slime.engine.scheduler import Scheduler
    scheduler = Scheduler(block_manager, max_num_seqs=256, max_num_batched_tokens=8192, eos_token_ids=[2],
                          max_seq_len=2048)

Each step is either a prefill (admit waiting sequences, oldest first, while their uncached tokens fit
`max_num_batched_tokens` and their blocks fit the cache) or a decode of every running sequence.
New requests therefore join a running batch at the next step (unless `defer_prefills` holds small
prefills back for a few steps). When a decode needs a block and none is free, the newest running
sequence is preempted: its blocks are freed and it goes back to the front of the queue to be
recomputed (prompt + tokens so far) later; its outputs are unaffected.
A stop id ends a sequence only past its `min_new_tokens` (the sampler masks them before that).
"""

from __future__ import annotations

from collections import deque

from slime.engine.block_manager import BlockManager
from slime.engine.sequence import Sequence, SequenceStatus


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 eos_token_ids: list[int], max_seq_len: int) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.eos_token_ids = set(eos_token_ids)
        self.max_seq_len = max_seq_len  # context length, capped by what the KV cache can hold
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.num_preemptions = 0
        # prefill deferral (off by default; the HTTP server turns it on, see `defer_prefills`)
        self.prefill_wait_ratio = 0.0
        self.max_deferred_steps = 0
        self.num_deferred_steps = 0

    def defer_prefills(self, wait_ratio: float, max_steps: int) -> None:
        """While a batch decodes, admit waiting requests only once they number `wait_ratio` x the running ones,
        or after `max_steps` decode steps: requests that trickle in over HTTP then join in a few large prefills
        instead of costing one small prefill step each (TGI's waiting_served_ratio / max_waiting_tokens)."""
        if wait_ratio < 0 or max_steps < 0:
            raise ValueError(f"prefill deferral needs wait_ratio >= 0 and max_steps >= 0, got {wait_ratio}, {max_steps}")
        self.prefill_wait_ratio, self.max_deferred_steps = float(wait_ratio), int(max_steps)

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[list[Sequence], bool]:
        """Returns (sequences, is_prefill); empty when nothing can run."""
        prefill = self._schedule_prefill() if self.prefill_due() else []
        if prefill:
            self.num_deferred_steps = 0
            return prefill, True
        if self.waiting:
            self.num_deferred_steps += 1
        return self._schedule_decode(), False

    def prefill_due(self) -> bool:
        if not self.waiting or not self.running or self.prefill_wait_ratio <= 0:
            return bool(self.waiting)
        return (len(self.waiting) >= self.prefill_wait_ratio * len(self.running)
                or self.num_deferred_steps >= self.max_deferred_steps)

    def _schedule_prefill(self) -> list[Sequence]:
        scheduled: list[Sequence] = []
        num_tokens = 0
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            hits = self.block_manager.match_prefix(seq)
            new_tokens = len(seq) - len(hits) * self.block_manager.block_size
            if scheduled and num_tokens + new_tokens > self.max_num_batched_tokens:
                break
            if not self.block_manager.can_allocate(seq, hits):
                break
            self.block_manager.allocate(seq, hits)
            if seq.cached_tokens is None:
                seq.cached_tokens = min(seq.num_computed_tokens, seq.num_prompt_tokens)
            num_tokens += new_tokens
            seq.status = SequenceStatus.RUNNING
            self.waiting.popleft()
            self.running.append(seq)
            scheduled.append(seq)
        return scheduled

    def _schedule_decode(self) -> list[Sequence]:
        if self.block_manager.append_slots(self.running):
            return list(self.running)
        scheduled: list[Sequence] = []
        while self.running:
            seq = self.running.popleft()
            while not self.block_manager.can_append(seq):
                if self.running:
                    self._preempt(self.running.pop())
                else:
                    self._preempt(seq)
                    break
            else:
                self.block_manager.append_slot(seq)
                scheduled.append(seq)
        self.running.extend(scheduled)
        return scheduled

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.deallocate(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def postprocess(self, seqs: list[Sequence], token_ids: list[int], logprobs: list[float]) -> None:
        """Append each sampled token and finish sequences that hit a stop condition."""
        finished = []
        for seq, token_id, logprob in zip(seqs, token_ids, logprobs, strict=True):
            seq.num_computed_tokens = len(seq.token_ids)
            seq.append_token(token_id, logprob)
            reason = self.finish_reason(seq, token_id, len(seq.token_ids))
            if reason is not None:
                finished.append((seq, reason))
        self.finish_all(finished)

    def finish_all(self, finished: list[tuple[Sequence, dict]]) -> None:
        """End each (sequence, reason): its blocks are freed and it leaves its queue; each queue is filtered once."""
        left = {SequenceStatus.RUNNING: False, SequenceStatus.WAITING: False}
        for seq, reason in finished:
            if seq.status == SequenceStatus.RUNNING:
                self.block_manager.deallocate(seq)
            if seq.status in left:
                left[seq.status] = True
            seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason
        for status, queue in ((SequenceStatus.RUNNING, self.running), (SequenceStatus.WAITING, self.waiting)):
            if left[status]:
                kept = [seq for seq in queue if seq.status != SequenceStatus.FINISHED]
                queue.clear()
                queue.extend(kept)

    def finish_reason(self, seq: Sequence, token_id: int, length: int) -> dict | None:
        """Why `seq` ends once `token_id` is its token number `length` (prompt included), or None."""
        params = seq.params
        num_output = length - seq.num_prompt_tokens
        if num_output >= params.max_new_tokens:
            return {"type": "length", "length": params.max_new_tokens}
        may_stop = not params.ignore_eos and num_output > params.min_new_tokens
        if may_stop and (token_id in self.eos_token_ids or token_id in params.stop_token_ids):
            return {"type": "stop", "matched": token_id}
        if length >= self.max_seq_len:
            return {"type": "length", "length": num_output}
        return None

    def finish(self, seq: Sequence, reason: dict) -> None:
        self.finish_all([(seq, reason)])
