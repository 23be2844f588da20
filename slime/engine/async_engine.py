"""Drive the single-threaded LLMEngine from asyncio: one engine thread, commands between steps.

    engine = AsyncEngine(lambda: LLMEngine(EngineConfig(model_path)), weight_version="default")
    engine.start(); await engine.wait_ready()
    stream = await engine.add_request("r1", [1, 2, 3], SamplingParams(max_new_tokens=8))
    async for state in stream: ...            # RequestState after every engine step that touched r1

Every call that touches the engine (add / abort / weight update / memory / flush) is a command queued
to the engine thread and run between two `step()`s, so a weight update never lands in the middle of
a forward pass. `pause()` stops stepping (in-flight requests wait), `resume()` continues. Each request
gets a `RequestStream`; each step's outputs reach the event loop in one `call_soon_threadsafe`, and a
stream added as `final_only` wakes its reader once, when it finishes (its request is `quiet` in the engine:
no per-step outputs are made or handed over for it, only the finished one with every token).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Collection

logger = logging.getLogger(__name__)

_IDLE_WAIT_S = 0.5


@dataclass
class RequestState:
    """Everything the engine has produced for one request so far (tokens are cumulative)."""

    request_id: str
    prompt_tokens: int = 0
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    cached_tokens: int = 0
    finished: bool = False
    finish_reason: dict | None = None
    weight_version: str = "default"
    created_at: float = field(default_factory=time.perf_counter)

    def apply(self, out: Any, weight_version: str, abort_reason: dict | None = None) -> None:
        """Fold one engine TokenOutput (this step's new tokens only) in; an abort we asked for ends with our reason."""
        self.output_ids.extend(out.token_ids)
        self.logprobs.extend(out.logprobs)
        self.prompt_tokens = out.prompt_tokens or self.prompt_tokens
        self.cached_tokens = out.cached_tokens or 0
        self.weight_version = weight_version
        if out.finished:
            self.finished = True
            aborted = (out.finish_reason or {}).get("type") == "abort"
            self.finish_reason = abort_reason if aborted and abort_reason is not None else out.finish_reason


class RequestStream:
    """Async iterator over a request's states; ends after the finished state."""

    def __init__(self, request_id: str, prompt_tokens: int, final_only: bool = False):
        self.state = RequestState(request_id, prompt_tokens=prompt_tokens)
        self.abort_reason: dict | None = None  # set before the engine is told, so its abort output cannot win
        self.final_only = final_only  # wake the reader only with the finished state, not after every step
        self._updates: asyncio.Queue[RequestState | None] = asyncio.Queue()
        self.closed = False

    def _push(self) -> None:
        self._updates.put_nowait(self.state)

    def _close(self) -> None:
        if not self.closed:
            self.closed = True
            self._updates.put_nowait(None)

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestState:
        item = await self._updates.get()
        # collapse a backlog of updates: the state is cumulative, only the newest matters
        while item is not None and not self._updates.empty():
            nxt = self._updates.get_nowait()
            if nxt is None:
                self._updates.put_nowait(None)
                break
            item = nxt
        if item is None:
            raise StopAsyncIteration
        return item

    async def final(self) -> RequestState:
        async for _ in self:
            pass
        return self.state


class EngineNotReady(RuntimeError):
    pass


class AsyncEngine:
    """Owns one engine object inside a dedicated thread; all methods are called from the event loop."""

    def __init__(self, engine_factory: Callable[[], Any], weight_version: str = "default"):
        self._engine_factory = engine_factory
        self.weight_version = weight_version
        self.engine: Any = None
        self.load_error: BaseException | None = None
        self._commands: queue.SimpleQueue[tuple[Callable[[Any], Any], concurrent.futures.Future] | None] = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}
        self._paused = False
        self._memory_released = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self.num_requests_total = 0
        self.num_steps = 0
        self.step_seconds = 0.0  # wall time inside engine.step() (the rest of the thread's time is host overhead)
        self.last_step_error: str | None = None

    # ----- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="slime-engine", daemon=True)
        self._thread.start()

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and self.load_error is None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    async def wait_ready(self) -> None:
        await asyncio.to_thread(self._ready.wait)
        if self.load_error is not None:
            raise EngineNotReady(f"engine failed to load: {self.load_error}") from self.load_error

    async def shutdown(self) -> None:
        if self._thread is None:
            return
        self._stopping = True
        self._commands.put(None)
        await asyncio.to_thread(self._thread.join, 30)
        for stream in list(self._streams.values()):
            self._finish_stream(stream, {"type": "abort", "message": "server shutting down"})

    # ----- commands --------------------------------------------------------------------------------
    async def call(self, fn: Callable[[Any], Any]) -> Any:
        """Run `fn(engine)` in the engine thread between two steps and return its result (or raise its error)."""
        if not self.ready:
            raise EngineNotReady("the engine is not loaded yet" if self.load_error is None else f"engine failed to load: {self.load_error}")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put((fn, future))
        return await asyncio.wrap_future(future)

    async def add_request(self, request_id: str, prompt_ids: list[int], params: Any) -> RequestStream:
        return (await self.add_requests([(request_id, prompt_ids, params)]))[0]

    async def add_requests(self, requests: list[tuple[str, list[int], Any]],
                           final_only: Collection[str] = ()) -> list[RequestStream]:
        """Add several requests in one engine command: all are added, or none (the engine's ValueError is raised).

        Streams of the ids in `final_only` yield only their finished state (no per-step wake-ups)."""
        ids = [request_id for request_id, _, _ in requests]
        taken = [request_id for request_id in ids if request_id in self._streams]
        if taken or len(set(ids)) != len(ids):
            raise ValueError(f"request id (rid) {(taken or ids)[0]!r} is already in use")
        streams = []
        for request_id, prompt_ids, _ in requests:
            stream = RequestStream(request_id, len(prompt_ids), final_only=request_id in final_only)
            stream.state.weight_version = self.weight_version
            self._streams[request_id] = stream
            streams.append(stream)

        def add_all(engine: Any) -> None:
            added: list[str] = []
            try:
                for request_id, prompt_ids, params in requests:
                    # a final-only stream needs no per-step outputs: the engine reports the request once
                    engine.add_request(request_id, list(prompt_ids), params, quiet=request_id in final_only)
                    added.append(request_id)
            except BaseException:
                for request_id in added:
                    engine.abort_request(request_id)
                raise

        try:
            await self.call(add_all)
        except BaseException as e:
            if isinstance(e, asyncio.CancelledError):  # the command may still run: undo it afterwards
                self._commands.put((lambda engine: [engine.abort_request(r) for r in ids], concurrent.futures.Future()))
            for request_id in ids:
                self._streams.pop(request_id, None)
            raise
        self.num_requests_total += len(requests)
        return streams

    async def abort(self, request_id: str, finish_reason: dict | None = None) -> bool:
        """Abort one request; its stream ends with `finish_reason` (default: abort). False if unknown."""
        stream = self._streams.get(request_id)
        if stream is None:
            return False
        reason = finish_reason or {"type": "abort", "message": "Abort requested"}
        stream.abort_reason = reason
        await self._abort_in_engine([request_id], lambda engine: engine.abort_request(request_id))
        self._finish_stream(stream, reason)
        return True

    async def abort_all(self) -> list[str]:
        ids = list(self._streams)
        reason = {"type": "abort", "message": "Abort all requested"}
        for request_id in ids:
            self._streams[request_id].abort_reason = self._streams[request_id].abort_reason or dict(reason)
        await self._abort_in_engine(ids, lambda engine: engine.abort_all())
        for request_id in ids:
            stream = self._streams.get(request_id)
            if stream is not None:
                self._finish_stream(stream, dict(reason))
        return ids

    async def _abort_in_engine(self, request_ids: list[str], abort: Callable[[Any], Any]) -> None:
        """Run `abort(engine)` on the engine thread, then hand the aborted requests' final outputs to their
        streams before they close (a quiet request's tokens so far arrive only with that output)."""
        def run(engine: Any) -> list[Any]:
            abort(engine)
            return engine.take_outputs(set(request_ids))

        self._dispatch(await self.call(run), self.weight_version)

    async def pause(self) -> None:
        await self.call(lambda engine: self._set_paused(True))

    async def resume(self) -> None:
        await self.call(lambda engine: self._set_paused(False))

    async def release_memory(self, tags: list[str] | None) -> None:
        def release(engine: Any) -> None:
            engine.release_memory(tags)
            if tags is None or "kv_cache" in tags or "weights" in tags:
                self._memory_released = True

        await self.call(release)

    async def resume_memory(self, tags: list[str] | None) -> None:
        def resume(engine: Any) -> None:
            engine.resume_memory(tags)
            self._memory_released = False

        await self.call(resume)

    async def update_weights(self, load: Callable[[Any], Any], weight_version: str | None, flush_cache: bool = True) -> Any:
        """Run `load(engine)` between steps, flush the prefix cache, then publish the new version."""

        def update(engine: Any) -> Any:
            result = load(engine)
            if flush_cache:
                engine.flush_cache()
            if weight_version is not None:
                self.weight_version = str(weight_version)
            return result

        return await self.call(update)

    # ----- introspection ---------------------------------------------------------------------------
    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def memory_released(self) -> bool:
        return self._memory_released

    @property
    def running_request_ids(self) -> list[str]:
        return list(self._streams)

    # ----- engine thread -----------------------------------------------------------------------------
    def _set_paused(self, paused: bool) -> None:
        self._paused = paused

    def _run(self) -> None:
        try:
            self.engine = self._engine_factory()
        except BaseException as e:  # report any load failure to the server instead of dying silently
            logger.error("engine failed to load:\n%s", traceback.format_exc())
            self.load_error = e
            self._ready.set()
            return
        self._ready.set()
        while not self._stopping:
            can_step = not self._paused and not self._memory_released and self.engine.has_unfinished_requests()
            if not self._drain_commands(block=not can_step):
                break
            if self._paused or self._memory_released or not self.engine.has_unfinished_requests():
                continue
            started = time.perf_counter()
            try:
                outputs = self.engine.step()
            except Exception:
                self._fail_all(traceback.format_exc())
                continue
            self.num_steps += 1
            self.step_seconds += time.perf_counter() - started
            if outputs:
                self._loop.call_soon_threadsafe(self._dispatch, outputs, self.weight_version)
        close = getattr(self.engine, "close", None)  # tensor-parallel workers leave with the engine thread
        if close is not None:
            try:
                close()
            except Exception:  # noqa: BLE001
                logger.exception("closing the engine failed")

    def _settle(self) -> None:
        """Overlap scheduling: the decode step in flight lands (and its outputs go out) before a command runs."""
        if getattr(self.engine, "overlap", None) is None:
            return
        self.engine.settle()
        landed, self.engine.pending_outputs = self.engine.pending_outputs, []
        if landed:
            self._loop.call_soon_threadsafe(self._dispatch, landed, self.weight_version)

    def _drain_commands(self, block: bool) -> bool:
        """Run queued commands; False once shutdown was requested."""
        try:
            item = self._commands.get(timeout=_IDLE_WAIT_S) if block else self._commands.get_nowait()
        except queue.Empty:
            return True
        while True:
            if item is None:
                return False
            fn, future = item
            if future.set_running_or_notify_cancel():
                try:
                    self._settle()
                    future.set_result(fn(self.engine))
                except BaseException as e:
                    future.set_exception(e)
            try:
                item = self._commands.get_nowait()
            except queue.Empty:
                return True

    def _fail_all(self, error: str) -> None:
        logger.error("engine step failed; aborting all running requests:\n%s", error)
        self.last_step_error = error.strip().splitlines()[-1]
        try:
            self.engine.abort_all()
        except Exception:
            logger.exception("abort_all after a failed step also failed")
        reason = {"type": "abort", "message": f"engine error: {self.last_step_error}"}
        self._loop.call_soon_threadsafe(self._fail_streams, reason)

    # ----- event loop side ---------------------------------------------------------------------------
    def _dispatch(self, outputs: list[Any], weight_version: str) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue  # aborted or cancelled at the edge already
            stream.state.apply(out, weight_version, stream.abort_reason)
            if not stream.final_only or stream.state.finished:
                stream._push()
            if stream.state.finished:
                self._streams.pop(out.request_id, None)
                stream._close()

    def _finish_stream(self, stream: RequestStream, finish_reason: dict) -> None:
        self._streams.pop(stream.state.request_id, None)
        if not stream.state.finished:
            stream.state.finished = True
            stream.state.finish_reason = finish_reason
            stream.state.weight_version = self.weight_version
            stream._push()
        stream._close()

    def _fail_streams(self, reason: dict) -> None:
        for stream in list(self._streams.values()):
            self._finish_stream(stream, dict(reason))
