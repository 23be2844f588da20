"""Decode steps replayed from CUDA graphs captured for a ladder of batch sizes, over static input buffers.

    from slime.engine.cuda_graph import DecodeGraphRunner
    graphs = DecodeGraphRunner(model, max_num_seqs=256, max_blocks_per_seq=2560, vocab_size=151936, device="cuda")
    graphs.capture()                      # once the KV cache is attached to the model
    logits = graphs.run(seqs, block_size)  # float32 [len(seqs), vocab], a view of a static buffer

A decode step of a small model is hundreds of short kernels; replaying one graph removes their launch
cost. Batches are padded up to the next captured size: padding rows write no KV (slot -1), attend to
nothing (context length 0) and their logits are ignored. Block tables are persistent: each running
request owns one row of a [max_num_seqs, max_blocks] table and a step writes only its new blocks (the
attention kernel reads row `block_table_rows[i]`), so host work per step does not grow with context.
The graphs bake in the addresses of the weights and of the KV cache, so the owner must call `reset()`
whenever either is reallocated (memory release/resume) and capture again before the next replay.
Needs an attention backend that reads only tensors from the metadata (`TritonPagedAttention`), not
the host lists of the reference one.
"""

from __future__ import annotations

from typing import Any, Sequence as Seq

import torch

from slime.engine.attention import AttentionMetadata


def batch_size_ladder(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16 up to max_num_seqs (always included)."""
    sizes = [s for s in (1, 2, 4, 8) if s < max_num_seqs] + list(range(16, max_num_seqs, 16))
    return sorted(set(sizes + [max_num_seqs]))


class DecodeGraphRunner:
    def __init__(self, model: Any, max_num_seqs: int, max_blocks_per_seq: int, vocab_size: int,
                 device: torch.device | str) -> None:
        self.model = model
        self.device = torch.device(device)
        assert self.device.type == "cuda", "CUDA graphs need a CUDA device"
        self.ladder = batch_size_ladder(max_num_seqs)
        self.max_num_seqs = max_num_seqs
        self.max_blocks = max_blocks_per_seq
        self.vocab_size = vocab_size
        n = max_num_seqs
        # Rows: token ids, positions, KV slots (-1 = padding), context lengths, block-table row; one H2D copy.
        self.rows = torch.zeros(5, n, dtype=torch.int64, device=self.device)
        self.input_ids, self.positions, self.slot_mapping, self.context_lens, self.table_rows = self.rows.unbind(0)
        self.block_tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32, device=self.device)
        self.last_token = torch.arange(n, dtype=torch.int64, device=self.device)
        self.host_rows = torch.zeros(5, n, dtype=torch.int64).pin_memory()
        self.host_tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32).pin_memory()
        self.host_tables_np = self.host_tables.numpy()
        # Persistent block tables: each running request keeps one row; only new blocks are written per step.
        self.table_of: dict[str, tuple[int, list[int], int]] = {}  # request id -> (row, its block_table list, synced)
        self.free_table_rows = list(range(n - 1, -1, -1))
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.pool: Any = None

    @property
    def captured(self) -> bool:
        return bool(self.graphs)

    def padded_size(self, num_seqs: int) -> int:
        for size in self.ladder:
            if size >= num_seqs:
                return size
        raise ValueError(f"decode batch of {num_seqs} exceeds --max-running-requests {self.max_num_seqs}")

    def _metadata(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(is_prefill=False, slot_mapping=self.slot_mapping[:size], query_lens=[1] * size,
                                 context_lens=[], context_slots=[], block_tables=self.block_tables,
                                 context_lens_tensor=self.context_lens[:size], max_query_len=1,
                                 block_table_rows=self.table_rows[:size])

    def _forward(self, size: int) -> torch.Tensor:
        return self.model(self.input_ids[:size], self.positions[:size], self._metadata(size), self.last_token[:size])

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture one graph per ladder size, largest first so smaller ones reuse its memory pool."""
        self.reset()
        self.rows.zero_()
        self.slot_mapping.fill_(-1)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for size in reversed(self.ladder):
                self._forward(size)  # compiles kernels and warms allocator outside the capture
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool, stream=stream):
                    self.logits[size] = self._forward(size)
                if self.pool is None:
                    self.pool = graph.pool()
                self.graphs[size] = graph
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)

    def reset(self) -> None:
        """Forget the graphs (they hold stale addresses after a reallocation) and the table rows."""
        self.graphs.clear()
        self.logits.clear()
        self.pool = None
        self.table_of.clear()
        self.free_table_rows = list(range(self.max_num_seqs - 1, -1, -1))

    def _table_rows(self, seqs: Seq[Any]) -> tuple[list[int], int]:
        """Each sequence's persistent table row, with blocks added since the last step written to the host copy;
        rows of requests that left the batch are freed. Returns (rows, widest table)."""
        live = {seq.request_id for seq in seqs}
        for request_id in [r for r in self.table_of if r not in live]:
            self.free_table_rows.append(self.table_of.pop(request_id)[0])
        tables, rows, width = self.host_tables_np, [], 0
        for seq in seqs:
            table = seq.block_table
            entry = self.table_of.get(seq.request_id)
            if entry is not None and entry[1] is table:
                row, synced = entry[0], entry[2]
            else:  # new, or re-admitted after preemption (the block manager gave it a new list)
                row, synced = (entry[0] if entry is not None else self.free_table_rows.pop()), 0
            count = len(table)
            if count > self.max_blocks:
                raise ValueError(f"a sequence holds {count} KV blocks, more than the {self.max_blocks} the graphs "
                                 "were sized for (--context-length)")
            if count > synced:
                tables[row, synced:count] = table[synced:]
                self.table_of[seq.request_id] = (row, table, count)
            rows.append(row)
            width = max(width, count)
        return rows, width

    def load_inputs(self, seqs: Seq[Any], block_size: int) -> int:
        """Copy one decode batch into the static buffers; returns the padded (graph) batch size."""
        num = len(seqs)
        size = self.padded_size(num)
        token_ids, positions, slots = [], [], []
        for seq in seqs:
            pos = len(seq) - 1
            token_ids.append(seq.token_ids[pos])
            positions.append(pos)
            slots.append(seq.block_table[pos // block_size] * block_size + pos % block_size)
        table_rows, width = self._table_rows(seqs)
        rows = self.host_rows.numpy()
        rows[:, num:] = 0
        rows[0, :num] = token_ids
        rows[1, :num] = positions
        rows[2, :num] = slots
        rows[2, num:] = -1
        rows[3, :num] = rows[1, :num] + 1
        rows[4, :num] = table_rows
        self.rows.copy_(self.host_rows, non_blocking=True)
        self.block_tables[:, :width].copy_(self.host_tables[:, :width], non_blocking=True)
        return size

    def run(self, seqs: Seq[Any], block_size: int, last_token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Replay the decode step for `seqs` (engine `Sequence`s whose last token is new); logits [len, vocab].
        `last_token_ids` (on the device) replaces the last tokens the host holds (overlap scheduling)."""
        assert self.captured, "capture() first"
        size = self.load_inputs(seqs, block_size)
        if last_token_ids is not None:  # after the rows' host-to-device copy, on the same stream
            self.input_ids[:len(seqs)].copy_(last_token_ids)
        self.graphs[size].replay()
        return self.logits[size][:len(seqs)]
