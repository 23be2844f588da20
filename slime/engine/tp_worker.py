"""Tensor-parallel ranks 1..N-1 of one engine, and rank 0's runner that drives them.

    from slime.engine.tp_worker import TPModelRunner
    runner = TPModelRunner(config, hf_config, max_positions, eos_token_ids)   # config.tp_size > 1
    token_ids, logprobs = runner.run(seqs, is_prefill)                       # same API as ModelRunner
    runner.close()

Rank 0 (the process of `LLMEngine`, i.e. the server) keeps the scheduler, its own `ModelRunner`
shard and the sampler. Ranks 1..N-1 are processes started here (spawn), one `ModelRunner` shard
each on device `cuda:k+r` (CPU: all on the CPU), joined with rank 0 in the group of
`slime.engine.parallel`. Every call rank 0 makes is sent first to each worker over its pipe, then
run locally, so the ranks meet in the same collectives: a forward is one pickled message with only
the new tokens and the new KV blocks of each sequence (no reply; the all-reduces keep the ranks in
step), other calls (weight loads, memory release/resume, weight-update groups) wait for every
worker's answer and raise the first error. Workers leave when rank 0 says stop, when their pipe
closes, or (Linux) by SIGKILL when the thread that started them exits (PR_SET_DEATHSIG): no orphans
after a SIGKILLed server. The engine must therefore be built in a thread that lives as long as it
(`AsyncEngine` builds it in its engine thread).
"""

from __future__ import annotations

import copy
import ctypes
import faulthandler
import logging
import os
import pickle
import signal
import threading
import time
import traceback
from typing import Any, Callable, Iterable

import torch

from slime.engine.config import EngineConfig
from slime.engine.model_runner import ModelRunner
from slime.engine.parallel import create_tp_store, init_tp_group, rank_device

logger = logging.getLogger("slime.engine.tp_worker")
PR_SET_DEATHSIG = 1
STARTUP_POLL_S = 0.2


class TokenTail:
    """The tokens of a sequence from `offset` on; indexable with absolute positions like `Sequence.token_ids`."""

    __slots__ = ("offset", "tokens")

    def __init__(self, offset: int, tokens: list[int]) -> None:
        self.offset, self.tokens = offset, tokens

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            assert index.step is None and index.stop is None and (index.start or 0) >= self.offset
            return self.tokens[(index.start or 0) - self.offset:]
        assert index >= self.offset, "a worker only knows the new tokens of a sequence"
        return self.tokens[index - self.offset]


class SeqView:
    """What `ModelRunner.forward` reads of a `Sequence`, rebuilt on a worker from one batch message."""

    __slots__ = ("request_id", "token_ids", "num_computed_tokens", "block_table", "length")

    def __init__(self, request_id: str, token_ids: TokenTail, num_computed_tokens: int, block_table: list[int],
                 length: int) -> None:
        self.request_id, self.token_ids, self.block_table = request_id, token_ids, block_table
        self.num_computed_tokens, self.length = num_computed_tokens, length

    def __len__(self) -> int:
        return self.length


class BatchEncoder:
    """Rank 0: per sequence (id, first new position, new tokens, length, computed, reset?, new blocks).

    Block tables grow by appending (a preempted sequence gets a new list), so after the first message
    only the blocks added since are sent; on a decode step both sides forget the sequences not in it."""

    def __init__(self) -> None:
        self.sent: dict[str, tuple[list[int], int]] = {}

    def encode(self, seqs: list[Any], is_prefill: bool) -> bytes:
        if not is_prefill:
            live = {seq.request_id for seq in seqs}
            self.sent = {rid: entry for rid, entry in self.sent.items() if rid in live}
        items = []
        for seq in seqs:
            table = seq.block_table
            start = seq.num_computed_tokens if is_prefill else len(seq) - 1
            entry = self.sent.get(seq.request_id)
            reset = entry is None or entry[0] is not table or entry[1] > len(table)
            synced = 0 if reset else entry[1]
            items.append((seq.request_id, start, seq.token_ids[start:], len(seq), seq.num_computed_tokens, reset,
                          table[synced:]))
            self.sent[seq.request_id] = (table, len(table))
        return pickle.dumps(items, pickle.HIGHEST_PROTOCOL)


class BatchDecoder:
    """Worker: the inverse of `BatchEncoder`, keeping one persistent block-table list per sequence (so the
    decode graphs' persistent table rows see the same list object step after step, as on rank 0)."""

    def __init__(self) -> None:
        self.tables: dict[str, list[int]] = {}

    def decode(self, data: bytes, is_prefill: bool) -> list[SeqView]:
        items = pickle.loads(data)
        if not is_prefill:
            live = {item[0] for item in items}
            self.tables = {rid: table for rid, table in self.tables.items() if rid in live}
        seqs = []
        for request_id, start, tokens, length, computed, reset, blocks in items:
            if reset:
                table = self.tables[request_id] = list(blocks)
            else:
                table = self.tables[request_id]
                table.extend(blocks)
            seqs.append(SeqView(request_id, TokenTail(start, tokens), computed, table, length))
        return seqs


# ---- worker process -------------------------------------------------------------------------------
def _die_with_parent(parent_pid: int) -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the closed pipe still ends the worker when it is idle
        pass
    if os.getppid() != parent_pid:
        os._exit(1)


class TPWorker:
    """Rank r >= 1: executes rank 0's calls on its shard."""

    def __init__(self, runner: ModelRunner, conn: Any) -> None:
        self.runner = runner
        self.conn = conn
        self.decoder = BatchDecoder()
        self.groups: dict[str, Any] = {}

    def loop(self) -> None:
        while True:
            try:
                message = self.conn.recv_bytes()
            except (EOFError, OSError):
                return
            kind, payload = pickle.loads(message) if message[:1] != b"F" else ("forward", message)
            if kind == "stop":
                return
            if kind == "forward":
                is_prefill = payload[1:2] == b"1"
                self.runner.forward(self.decoder.decode(payload[2:], is_prefill), is_prefill)
                continue
            method, args = payload
            try:
                reply = ("ok", getattr(self, f"op_{method}")(*args))
            except Exception as e:  # noqa: BLE001  (sent to rank 0, which raises it)
                logger.error("tp worker call %s failed:\n%s", method, traceback.format_exc())
                reply = ("error", f"{type(e).__name__}: {e}")
            self.conn.send(reply)

    def op_runner(self, method: str, args: tuple) -> Any:
        return getattr(self.runner, method)(*args)

    def op_load_weights(self, named: list[tuple[str, torch.Tensor]]) -> None:
        self.runner.load_weights(named)

    def op_load_serialized(self, payload: str) -> None:
        from slime.engine.weight_transport import deserialize_named_tensors, finish_reading

        named = deserialize_named_tensors(payload)
        self.runner.load_weights(named)
        finish_reading(named)

    def op_join_group(self, address: str, port: int, rank: int, world_size: int, name: str, backend: str) -> None:
        from slime.engine.weight_transport import init_weights_update_group

        self.groups[name] = init_weights_update_group(address, port, rank, world_size, name, backend,
                                                      device=self.runner.device)

    def op_receive_weights(self, name: str, names: list[str], dtypes: list[str], shapes: list[list[int]],
                           load_format: str | None = None) -> None:
        from slime.engine.weight_transport import receive_named_tensors

        self.runner.load_weights(receive_named_tensors(self.groups[name], names, dtypes, shapes, src=0,
                                                       load_format=load_format))

    def op_leave_group(self, name: str) -> None:
        from slime.engine.weight_transport import destroy

        group = self.groups.pop(name, None)
        if group is not None:
            destroy(group)


def worker_main(config: EngineConfig, hf_config: Any, max_positions: int, eos_token_ids: list[int], rank: int,
                port: int, conn: Any, parent_pid: int) -> None:
    """Entry of a spawned tp rank: join the group, build the shard, say ready, serve rank 0's calls.
    `kill -USR1 <pid>` prints the rank's Python stacks to its stderr (what a hung collective waits on)."""
    _die_with_parent(parent_pid)
    if hasattr(signal, "SIGUSR1"):
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        tp = init_tp_group(port, rank, config.tp_size, torch.device(config.device))
        runner = ModelRunner(config, hf_config, max_positions, eos_token_ids=eos_token_ids, tp=tp)
    except BaseException as e:  # noqa: BLE001
        conn.send(("error", f"tp rank {rank} failed to load: {type(e).__name__}: {e}"))
        return
    conn.send(("ready", None))
    try:
        TPWorker(runner, conn).loop()
    finally:
        release_tp_group(runner)  # at the same time as rank 0 (TPModelRunner.close)
        if runner.device.type == "cuda":  # no interpreter teardown: CUDA and NCCL state go with the process
            os._exit(0)


def release_tp_group(runner: ModelRunner) -> None:
    """Graphs first (a communicator whose collectives live graphs captured cannot be released), then the group."""
    runner.drop_graphs()
    if runner.device.type == "cuda":
        torch.cuda.synchronize(runner.device)
    runner.tp.shutdown()


# ---- rank 0 ---------------------------------------------------------------------------------------
class TPModelRunner:
    """Rank 0's runner for tp_size > 1: `ModelRunner`'s API, every call mirrored on the worker ranks."""

    def __init__(self, config: EngineConfig, hf_config: Any, max_positions: int,
                 eos_token_ids: Iterable[int] = ()) -> None:
        size = config.tp_size
        assert size > 1
        eos = list(eos_token_ids)
        context = torch.multiprocessing.get_context("spawn")
        store = create_tp_store(size)
        self.procs: list[Any] = []
        self.conns: list[Any] = []
        self.encoder = BatchEncoder()
        self.closed = False
        for rank in range(1, size):
            parent_end, child_end = context.Pipe()
            rank_config = copy.copy(config)
            rank_config.device = rank_device(config.device, rank)
            proc = context.Process(target=worker_main, name=f"slime-engine-tp{rank}", daemon=True,
                                   args=(rank_config, hf_config, max_positions, eos, rank, store.port, child_end,
                                         os.getpid()))
            proc.start()
            child_end.close()
            self.procs.append(proc)
            self.conns.append(parent_end)
        local_config = copy.copy(config)
        local_config.device = rank_device(config.device, 0)
        if local_config.device.startswith("cuda"):
            torch.cuda.set_device(torch.device(local_config.device))  # this (engine) thread runs rank 0's kernels
        try:
            self.local: ModelRunner = self._while_workers_live(lambda: ModelRunner(
                local_config, hf_config, max_positions, eos_token_ids=eos,
                tp=init_tp_group(store.port, 0, size, torch.device(local_config.device), store=store)))
            for rank, conn in enumerate(self.conns, start=1):
                kind, value = conn.recv()
                if kind != "ready":
                    raise RuntimeError(value)
        except BaseException:
            self.close()
            raise

    def _while_workers_live(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` (which meets the workers in collectives) in a thread; raise if a worker dies first."""
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                box["result"] = fn()
            except BaseException as e:  # noqa: BLE001
                box["error"] = e

        thread = threading.Thread(target=target, name="slime-engine-tp-init", daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(STARTUP_POLL_S)
            for rank, (proc, conn) in enumerate(zip(self.procs, self.conns), start=1):
                if not proc.is_alive():
                    message = conn.recv()[1] if conn.poll() else f"exit code {proc.exitcode}"
                    raise RuntimeError(f"tensor-parallel rank {rank} died while loading: {message}")
        if "error" in box:
            raise box["error"]
        return box["result"]

    # ---- plumbing ---------------------------------------------------------------------------------
    def _call_all(self, worker_args: Callable[[int], tuple[str, tuple]], local: Callable[[], Any]) -> list[Any]:
        """Send each worker its call, run `local` here, then collect every reply (errors raised after).
        Returns every rank's result, rank 0 (this process) first."""
        if self.closed:
            raise RuntimeError("the tensor-parallel workers are shut down")
        for rank, conn in enumerate(self.conns, start=1):
            conn.send_bytes(pickle.dumps(("call", worker_args(rank))))
        error: BaseException | None = None
        result = None
        try:
            result = local()
        except BaseException as e:  # noqa: BLE001  (re-raised once the workers have answered)
            error = e
        failures, results = [], [result]
        for rank, conn in enumerate(self.conns, start=1):
            try:
                kind, value = conn.recv()
            except (EOFError, OSError) as e:
                kind, value = "error", f"worker is gone ({type(e).__name__})"
            if kind == "error":
                failures.append(f"tp rank {rank}: {value}")
            results.append(value)
        if error is not None:
            raise error
        if failures:
            raise RuntimeError("; ".join(failures))
        return results

    def _call_runner(self, method: str, *args: Any) -> list[Any]:
        return self._call_all(lambda rank: ("runner", (method, args)), lambda: getattr(self.local, method)(*args))

    def __getattr__(self, name: str) -> Any:  # num_blocks, device, model, kv_cache, ... of the rank-0 shard
        if name == "local":
            raise AttributeError(name)
        return getattr(self.local, name)

    # ---- ModelRunner API --------------------------------------------------------------------------
    def run(self, seqs: list[Any], is_prefill: bool) -> tuple[list[int], list[float]]:
        if self.local.kv_cache is None or self.local.weights_offloaded:
            return self.local.run(seqs, is_prefill)  # raises the "released" error without involving the workers
        message = b"F" + (b"1" if is_prefill else b"0") + self.encoder.encode(seqs, is_prefill)
        for conn in self.conns:
            conn.send_bytes(message)
        return self.local.run(seqs, is_prefill)

    @property
    def weights_offloaded(self) -> bool:
        return self.local.weights_offloaded

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        named = [(name, tensor.detach().cpu()) for name, tensor in named_tensors]  # pickled to the workers
        self._call_all(lambda rank: ("load_weights", (named,)), lambda: self.local.load_weights(named))

    def load_weights_from_disk(self, path: str) -> None:
        self._call_runner("load_weights_from_disk", path)

    def check_weights(self, action: str) -> str:
        """Every rank checks its shard; a rank whose shard differs makes the call fail with its tensor names."""
        return "; ".join(f"tp rank {rank}: {message}"
                         for rank, message in enumerate(self._call_runner("check_weights", action)))

    def load_serialized(self, payloads: list[str]) -> int:
        """`/update_weights_from_tensor`: rank r loads payloads[r] (or payloads[0] when only one is given)."""
        from slime.engine.weight_transport import deserialize_named_tensors, finish_reading

        def pick(rank: int) -> str:
            return payloads[rank] if len(payloads) > 1 else payloads[0]

        def local() -> int:
            named = deserialize_named_tensors(pick(0))
            self.local.load_weights(named)
            finish_reading(named)
            return len(named)

        return self._call_all(lambda rank: ("load_serialized", (pick(rank),)), local)[0]

    def free_kv_cache(self) -> None:
        self._call_runner("free_kv_cache")

    def allocate_kv_cache(self) -> None:
        self._call_runner("allocate_kv_cache")

    def offload_weights(self) -> None:
        self._call_runner("offload_weights")

    def onload_weights(self) -> None:
        self._call_runner("onload_weights")

    # ---- weight-update groups (every tp rank joins as rank_offset + r) -----------------------------
    def join_weight_group(self, address: str, port: int, rank_offset: int, world_size: int, name: str,
                          backend: str) -> Any:
        from slime.engine.weight_transport import init_weights_update_group

        return self._call_all(
            lambda rank: ("join_group", (address, port, rank_offset + rank, world_size, name, backend)),
            lambda: init_weights_update_group(address, port, rank_offset, world_size, name, backend,
                                              device=self.local.device))[0]

    def receive_weights(self, group: Any, names: list[str], dtypes: list[str], shapes: list[list[int]],
                        load_format: str | None = None) -> None:
        """Every rank receives the bucket (per tensor, or "flattened_bucket": per dtype) and keeps its shard."""
        from slime.engine.weight_transport import receive_named_tensors

        self._call_all(lambda rank: ("receive_weights", (group.group_name, names, dtypes, shapes, load_format)),
                       lambda: self.local.load_weights(receive_named_tensors(group, names, dtypes, shapes, src=0,
                                                                             load_format=load_format)))

    def leave_weight_group(self, group: Any) -> None:
        from slime.engine.weight_transport import destroy

        self._call_all(lambda rank: ("leave_group", (group.group_name,)), lambda: destroy(group))

    # ---- lifetime ---------------------------------------------------------------------------------
    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the workers; every rank releases its graphs and the group at the same time, then the workers
        exit (killed if they linger); idempotent."""
        if self.closed:
            return
        self.closed = True
        for conn in self.conns:
            try:
                conn.send_bytes(pickle.dumps(("stop", None)))
            except (OSError, ValueError):
                pass
        local = self.__dict__.get("local")
        store = local.tp.store if local is not None else None  # hosted here: kept until the workers are gone
        if local is not None:
            release_tp_group(local)
        deadline = time.monotonic() + timeout_s
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        for conn in self.conns:
            conn.close()
        del store
