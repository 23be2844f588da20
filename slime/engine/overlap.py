"""Overlap scheduling: the host prepares decode step N+1 while the device still runs step N.

    engine = LLMEngine(EngineConfig(path, device="cuda", overlap_schedule=True))  # server: --enable-overlap-schedule

Without it every decode step is schedule -> forward -> wait for the sampled tokens -> append them, and the GPU
idles while the host schedules. With it a decode step is enqueued (`ModelRunner.launch`) and its results
are applied one `step()` later, after the next step was enqueued: step N+1 reads step N's sampled tokens on the
device, while the host holds a placeholder (`PENDING`) for each until they arrive. A sequence that stops at step
N (EOS, a stop id) rides along in step N+1; that extra token is dropped when N's results come in. Sequences
certain to end at N (max_new_tokens, context length) are left out of N+1. Whatever is not a plain continuation
of the running batch (a prefill, a batch the free KV blocks cannot cover) first applies the step in flight, and
so does every engine command (`flush`). Outputs are those of the step-by-step engine. tp_size 1 only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from slime.engine.model_runner import InflightStep
from slime.engine.outputs import TokenOutput
from slime.engine.sequence import Sequence, SequenceStatus

PENDING = -1  # the host's stand-in for a token still being sampled on the device


@dataclass
class _InFlight:
    step: InflightStep
    positions: list[int]  # index in each sequence's token_ids of its placeholder


class OverlapStepper:
    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.inflight: _InFlight | None = None

    def step(self) -> list[TokenOutput]:
        engine = self.engine
        outputs, engine.pending_outputs = engine.pending_outputs, []
        inflight = self.inflight
        if inflight is not None:
            batch = self._continuation()
            self.inflight = self._launch(batch, inflight.step) if batch else None
            return outputs + self._apply(inflight)
        if not engine.scheduler.has_unfinished():
            return outputs
        seqs, is_prefill = engine.schedule()
        if is_prefill:
            return outputs + engine.run_batch(seqs, is_prefill=True)
        self.inflight = self._launch(seqs, None)
        return outputs

    def flush(self) -> None:
        """Apply the step in flight (its outputs go out with the next `step()`)."""
        if self.inflight is not None:
            inflight, self.inflight = self.inflight, None
            self.engine.pending_outputs += self._apply(inflight)

    # ---- internals ------------------------------------------------------------------------------
    def _continuation(self) -> list[Sequence] | None:
        """The next decode batch while a step is in flight, or None when that step must be applied first."""
        scheduler = self.engine.scheduler
        if scheduler.waiting:
            if scheduler.prefill_due():
                return None
            scheduler.num_deferred_steps += 1
        batch = [seq for seq in scheduler.running
                 if seq.num_output_tokens < seq.params.max_new_tokens and len(seq.token_ids) < scheduler.max_seq_len]
        if not batch or not self.engine.block_manager.append_slots(batch):
            return None
        return batch

    def _launch(self, batch: list[Sequence], previous: InflightStep | None) -> _InFlight:
        last_token_ids = None
        if previous is not None:  # every sequence of a continuation was in the previous step
            row = {id(seq): i for i, seq in enumerate(previous.seqs)}
            index = [row[id(seq)] for seq in batch]
            last_token_ids = previous.tokens
            if index != list(range(len(previous.seqs))):
                last_token_ids = previous.tokens.index_select(
                    0, torch.tensor(index, dtype=torch.int64, device=previous.tokens.device))
        step = self.engine.runner.launch(batch, False, last_token_ids)
        positions = []
        for seq in batch:
            tokens = seq.token_ids
            seq.num_computed_tokens = len(tokens)
            positions.append(len(tokens))
            tokens.append(PENDING)
            seq.output_logprobs.append(0.0)
            seq.num_pending += 1
        return _InFlight(step, positions)

    def _apply(self, inflight: _InFlight) -> list[TokenOutput]:
        engine = self.engine
        token_ids, logprobs = engine.runner.collect(inflight.step)
        updated, finished = [], []
        for seq, position, token_id, logprob in zip(inflight.step.seqs, inflight.positions, token_ids, logprobs,
                                                     strict=True):
            if seq.status == SequenceStatus.FINISHED:  # ended at an earlier step (its placeholders are gone)
                continue
            seq.num_pending -= 1
            seq.token_ids[position] = token_id
            seq.output_logprobs[position - seq.num_prompt_tokens] = logprob
            updated.append((seq, token_id, logprob))
            reason = engine.scheduler.finish_reason(seq, token_id, position + 1)
            if reason is not None:  # drop what a later step in flight appended after this token
                del seq.token_ids[position + 1:]
                del seq.output_logprobs[position + 1 - seq.num_prompt_tokens:]
                seq.num_pending = 0
                finished.append((seq, reason))
        engine.scheduler.finish_all(finished)
        return engine.step_outputs(updated)
