"""The built-in engine's HTTP server, speaking SGLang's native protocol.

    python -m slime.engine.server --model-path DIR --port 30000      # or: slime engine --model-path DIR ...
    curl -s localhost:30000/generate -d '{"text": "1+1=", "sampling_params": {"max_new_tokens": 8, "temperature": 0}}'

Endpoints: /generate, /health, /health_generate, /get_model_info, /get_server_info, /flush_cache,
/abort_request, /pause_generation, /continue_generation, /release_memory_occupation,
/resume_memory_occupation, /update_weights_from_disk, /update_weights_from_tensor,
/init_weights_update_group, /update_weights_from_distributed, /destroy_weights_update_group,
/get_weight_version, /update_weight_version. Client errors answer HTTP 400 with {"error": {"message"}}.
The tokenizer lives here (the engine sees token ids only). Flags follow `sglang.launch_server`;
ones the built-in engine does not know exit with code 2.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import (
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)

from slime.engine.async_engine import (
    AsyncEngine,
    EngineNotReady,
    RequestState,
    RequestStream,
)
from slime.engine.protocol import (
    GenerateItem,
    ProtocolError,
    StopStringWatcher,
    build_generate_response,
    decode_json,
    parse_generate_request,
    read_json_object,
)
from slime.engine.server_args import engine_config_kwargs, parse_server_args
from slime.engine.weight_transport import (
    WeightUpdateGroup,
    check_load_format,
    destroy,
    dtype_from_name,
    init_weights_update_group,
    receive_named_tensors,
)

logger = logging.getLogger("slime.engine.server")

MEMORY_TAGS = ("kv_cache", "weights", "cuda_graph")
HEALTH_GENERATE_TIMEOUT_S = 30.0


def _error(message: str, status: int = 400) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "code": status}}, status_code=status)


def _result(success: bool, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"success": success, "message": message, **extra}, status_code=200 if success else 400)


class EngineServer:
    """Request handling shared by the endpoints; one per app."""

    def __init__(self, engine: AsyncEngine, tokenizer: Any, model_path: str, tokenizer_path: str | None,
                 server_args: dict[str, Any], sampling_params_cls: Callable[..., Any]):
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_path = model_path
        self.tokenizer_path = tokenizer_path
        self.server_args = server_args
        self.sampling_params_cls = sampling_params_cls
        self.groups: dict[str, WeightUpdateGroup] = {}
        self.num_generate_requests = 0

    # ----- generation ------------------------------------------------------------------------------
    @property
    def max_context_len(self) -> int:
        return int(self.engine.engine.max_context_len)

    @property
    def engine_device(self) -> str | None:
        config = getattr(self.engine.engine, "config", None)
        device = getattr(config, "device", None)
        return device if isinstance(device, str) and device.startswith("cuda") else None

    @property
    def tp_size(self) -> int:
        return int(getattr(getattr(self.engine.engine, "config", None), "tp_size", 1) or 1)

    @property
    def vocab_size(self) -> int | None:
        return getattr(self.engine.engine.hf_config, "vocab_size", None)

    async def start(self, items: list[GenerateItem], stream: bool = False) -> list[RequestStream]:
        """Queue the items; unless streamed or watched for stop strings, a request wakes us only when it ends."""
        final_only = () if stream else {item.rid for item in items if not (item.stop and self.tokenizer is not None)}
        try:
            params = [self.sampling_params_cls(**item.engine_params) for item in items]
        except (TypeError, ValueError) as e:
            raise ProtocolError(str(e)) from e
        self.num_generate_requests += len(items)
        try:
            return await self.engine.add_requests([(item.rid, item.prompt_ids, p) for item, p in zip(items, params)],
                                                  final_only=final_only)
        except RuntimeError as e:  # e.g. memory released: the server cannot take requests right now
            raise EngineNotReady(str(e)) from e

    async def follow(self, item: GenerateItem, stream: RequestStream) -> AsyncIterator[RequestState]:
        """Yield the request's states; aborts it at the first stop string, and when the client goes away."""
        watcher = StopStringWatcher(self.tokenizer, item) if item.stop and self.tokenizer is not None else None
        finished = False
        try:
            async for state in stream:
                if watcher is not None:
                    hit = watcher.check(state.output_ids)
                    if hit is not None:
                        reason = {"type": "stop", "matched": hit[0]}
                        if not state.finished:
                            await self.engine.abort(item.rid, reason)
                        finished = True
                        final = stream.state  # the engine may have finished it meanwhile: the stop string wins
                        final.finished, final.finish_reason = True, reason
                        del final.output_ids[hit[1]:], final.logprobs[hit[1]:]
                        yield final
                        return
                finished = state.finished
                yield state
        finally:
            if not finished and not stream.state.finished:
                with contextlib.suppress(Exception):
                    await asyncio.shield(self.engine.abort(item.rid))

    async def run_to_end(self, item: GenerateItem, stream: RequestStream, started: float) -> dict:
        async for _ in self.follow(item, stream):
            pass
        return build_generate_response(self.tokenizer, item, stream.state, time.perf_counter() - started)

    async def generate(self, request: Request) -> Response:
        started = time.perf_counter()
        if not self.engine.ready:
            raise EngineNotReady("the engine is still loading" if self.engine.load_error is None
                                 else f"engine failed to load: {self.engine.load_error}")
        body = decode_json(await request.body())
        call = parse_generate_request(body, self.tokenizer, self.max_context_len, self.vocab_size)
        streams = await self.start(call.items, stream=call.stream)
        if call.stream:
            return StreamingResponse(self._sse(call.items[0], streams[0], started), media_type="text/event-stream")
        results = await asyncio.gather(*(self.run_to_end(i, s, started) for i, s in zip(call.items, streams)))
        return JSONResponse(results if call.is_batch else results[0])

    async def _sse(self, item: GenerateItem, stream: RequestStream, started: float) -> AsyncIterator[bytes]:
        async for state in self.follow(item, stream):
            chunk = build_generate_response(self.tokenizer, item, state, time.perf_counter() - started)
            yield b"data: " + json.dumps(chunk).encode() + b"\n\n"
        yield b"data: [DONE]\n\n"

    async def health_generate(self) -> Response:
        if not self.engine.ready or not self.engine.alive:
            return _error("the engine is not ready", 503)
        if self.engine.paused or self.engine.memory_released:
            return Response(status_code=200)  # alive; generation is held on purpose
        item = GenerateItem(rid=f"HEALTH_CHECK_{time.time_ns()}", prompt_ids=[0],
                            engine_params=dict(max_new_tokens=1, temperature=0.0))
        try:
            (stream,) = await self.start([item])
            state = await asyncio.wait_for(stream.final(), HEALTH_GENERATE_TIMEOUT_S)
        except (asyncio.TimeoutError, EngineNotReady) as e:
            return _error(f"health generation failed: {type(e).__name__}", 503)
        if (state.finish_reason or {}).get("type") == "abort":
            return _error(f"health generation aborted: {state.finish_reason}", 503)
        return Response(status_code=200)

    # ----- weights ----------------------------------------------------------------------------------
    async def _update_weights(self, body: dict, load: Any, failure: str) -> tuple[int, JSONResponse | None]:
        """Shared tail of the three weight-update endpoints: optional abort, update between steps, flush.

        A loader failure is the caller's answer (400 with `failure`), never a server crash."""
        if body["abort_all_requests"]:
            await self.engine.abort_all()
        flush = True if body.get("flush_cache") is None else body["flush_cache"]
        try:
            return await self.engine.update_weights(load, body["weight_version"], flush_cache=flush), None
        except Exception as e:  # noqa: BLE001
            return 0, _result(False, f"{failure}: {type(e).__name__}: {e}")

    async def update_from_disk(self, body: dict) -> JSONResponse:
        if body["load_format"] not in (None, "auto", "safetensors"):
            raise ProtocolError(f"load_format {body['load_format']!r} is not supported by the built-in engine")
        path = body["model_path"]
        _, failed = await self._update_weights(body, lambda engine: engine.load_weights_from_disk(path),
                                               f"failed to load weights from {path!r} (weights may be partly updated)")
        if failed is not None:
            return failed
        self.model_path = path
        return _result(True, f"loaded weights from {path}", num_paused_requests=0)

    async def update_from_tensor(self, body: dict) -> JSONResponse:
        if body["load_format"] not in (None, "direct", "flattened_bucket"):  # both read by deserialize_named_tensors
            raise ProtocolError(f"load_format {body['load_format']!r} is not supported by the built-in engine")
        payloads = body["serialized_named_tensors"]
        if not payloads or not all(isinstance(p, str) for p in payloads):
            raise ProtocolError("serialized_named_tensors must be a non-empty list of strings (one per tp rank)")

        def load(engine: Any) -> int:
            return engine.load_serialized_weights(payloads)  # tp rank r takes payloads[r]; waits for the copies

        count, failed = await self._update_weights(body, load, "update from tensors failed")
        return failed or _result(True, f"updated {count} tensors")

    async def init_group(self, body: dict) -> JSONResponse:
        name = body["group_name"] or "weight_update_group"
        if name in self.groups:
            return _result(False, f"weight update group {name!r} already exists; destroy it first")
        rank = int(body["rank_offset"] or 0)
        address, port, world_size = body["master_address"], int(body["master_port"]), int(body["world_size"])
        backend = body["backend"] or "gloo"
        try:
            if self.tp_size > 1:  # every tp rank joins, as rank_offset + r, from the engine thread
                group = await self.engine.call(
                    lambda e: e.runner.join_weight_group(address, port, rank, world_size, name, backend))
            else:
                group = await asyncio.to_thread(init_weights_update_group, address, port, rank, world_size, name,
                                                backend, device=self.engine_device)
        except (ValueError, RuntimeError) as e:
            return _result(False, f"could not join weight update group {name!r}: {type(e).__name__}: {e}")
        self.groups[name] = group
        return _result(True, f"joined weight update group {name!r} as rank {rank}")

    async def update_from_distributed(self, body: dict) -> JSONResponse:
        """Receive a bucket over a weight update group: one broadcast per tensor, or with load_format
        "flattened_bucket" one per dtype (offsets derived from names, dtypes and shapes)."""
        load_format = check_load_format(body["load_format"])
        names, dtypes, shapes = body["names"], body["dtypes"], body["shapes"]
        if not (len(names) == len(dtypes) == len(shapes)):
            raise ProtocolError(f"names, dtypes and shapes differ in length ({len(names)}, {len(dtypes)}, {len(shapes)})")
        for dtype in dtypes:
            dtype_from_name(str(dtype))
        if not all(isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape) for shape in shapes):
            raise ProtocolError("shapes must be lists of non-negative integers")
        name = body["group_name"] or "weight_update_group"
        group = self.groups.get(name)
        if group is None:
            raise ProtocolError(f"no weight update group {name!r}; call /init_weights_update_group first")

        def load(engine: Any) -> int:
            if self.tp_size > 1:  # every tp rank receives the full tensors and keeps its shard
                engine.runner.receive_weights(group, names, dtypes, shapes, load_format)
                engine.block_manager.reset_prefix_cache()  # as engine.load_weights does, requests running or not
            else:
                engine.load_weights(receive_named_tensors(group, names, dtypes, shapes, src=0, load_format=load_format))
            return len(names)

        count, failed = await self._update_weights(body, load, "update from distributed failed")
        return failed or _result(True, f"received {count} tensors over group {name!r}")

    async def destroy_group(self, body: dict) -> JSONResponse:
        name = body["group_name"] or "weight_update_group"
        group = self.groups.pop(name, None)
        if group is None:
            return _result(False, f"no weight update group {name!r}")
        if self.tp_size > 1:
            await self.engine.call(lambda e: e.runner.leave_weight_group(group))
        else:
            await asyncio.to_thread(destroy, group)
        return _result(True, f"destroyed weight update group {name!r}")

    # ----- info -------------------------------------------------------------------------------------
    def model_info(self) -> dict:
        hf_config = self.engine.engine.hf_config if self.engine.ready else None
        return {
            "model_path": self.model_path, "tokenizer_path": self.tokenizer_path, "is_generation": True,
            "preferred_sampling_params": None, "weight_version": self.engine.weight_version,
            "has_image_understanding": False, "has_audio_understanding": False,
            "model_type": getattr(hf_config, "model_type", None),
            "architectures": getattr(hf_config, "architectures", None),
        }

    def server_info(self) -> dict:
        engine = self.engine
        state = {
            "num_running_requests": len(engine.running_request_ids), "num_requests_total": engine.num_requests_total,
            "num_steps": engine.num_steps, "step_seconds": engine.step_seconds, "paused": engine.paused,
            "memory_released": engine.memory_released,
            "last_step_error": engine.last_step_error,
        }
        if engine.ready:
            state["max_context_len"] = self.max_context_len
        return {**self.server_args, "model_path": self.model_path, "version": "slime-builtin",
                "weight_version": engine.weight_version, "num_generate_requests": self.num_generate_requests,
                "internal_states": [state]}


def create_app(engine: AsyncEngine, tokenizer: Any, *, model_path: str, tokenizer_path: str | None = None,
               server_args: dict[str, Any] | None = None, sampling_params_cls: Callable[..., Any] | None = None,
               on_ready: Callable[[bool], None] | None = None) -> FastAPI:
    """FastAPI app around a (not yet started) AsyncEngine; the engine starts with the app's lifespan."""
    if sampling_params_cls is None:
        from slime.engine.sampling_params import SamplingParams as sampling_params_cls
    server = EngineServer(engine, tokenizer, model_path, tokenizer_path, dict(server_args or {}), sampling_params_cls)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()

        async def announce() -> None:
            try:
                await engine.wait_ready()
            except EngineNotReady as e:
                logger.error("%s", e)
                if on_ready is not None:
                    on_ready(False)
                return
            if on_ready is not None:
                on_ready(True)

        task = asyncio.create_task(announce())
        yield
        task.cancel()
        for group in list(server.groups.values()):
            with contextlib.suppress(Exception):
                destroy(group)
        await engine.shutdown()

    app = FastAPI(title="slime built-in engine", lifespan=lifespan)
    app.state.engine_server = server

    @app.exception_handler(ProtocolError)
    async def _protocol_error(request: Request, e: ProtocolError):
        return _error(str(e))

    @app.exception_handler(ValueError)
    async def _value_error(request: Request, e: ValueError):
        return _error(str(e))

    @app.exception_handler(EngineNotReady)
    async def _not_ready(request: Request, e: EngineNotReady):
        return _error(str(e), 503)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        details = "; ".join(f"{'.'.join(map(str, err.get('loc', ())))}: {err.get('msg')}" for err in e.errors())
        return _error(f"invalid request: {details}")

    @app.get("/health")
    async def health():
        if engine.ready and engine.alive:
            return Response(status_code=200)
        return _error("the engine is still loading" if engine.load_error is None else f"engine failed: {engine.load_error}", 503)

    @app.get("/health_generate")
    async def health_generate():
        return await server.health_generate()

    @app.api_route("/generate", methods=["POST", "PUT"])
    async def generate(request: Request):
        return await server.generate(request)

    @app.get("/get_model_info")
    @app.get("/model_info")
    async def get_model_info():
        return server.model_info()

    @app.get("/get_server_info")
    @app.get("/server_info")
    async def get_server_info():
        return server.server_info()

    @app.get("/get_weight_version")
    async def get_weight_version():
        return {"weight_version": engine.weight_version}

    @app.post("/update_weight_version")
    async def update_weight_version(request: Request):
        body = await read_json_object(request, {"new_version": str, "abort_all_requests": bool}, required=("new_version",))
        if body["abort_all_requests"]:
            await engine.abort_all()
        engine.weight_version = body["new_version"]
        return _result(True, f"weight version is now {body['new_version']!r}", new_version=body["new_version"])

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache():
        if await engine.call(lambda e: e.flush_cache()):
            return PlainTextResponse("Cache flushed.\n")
        return PlainTextResponse("Cache not flushed: requests are running.\n", status_code=400)

    @app.post("/abort_request")
    async def abort_request(request: Request):
        body = await read_json_object(request, {"rid": str, "abort_all": bool, "abort_message": str})
        if body["abort_all"]:
            return {"success": True, "aborted": await engine.abort_all()}
        rid = body["rid"]
        if not rid:
            raise ProtocolError("/abort_request needs 'rid' or 'abort_all': true")
        targets = [r for r in engine.running_request_ids if r == rid or r.startswith(rid + "-")]
        message = body["abort_message"] or "Abort requested"
        aborted = [r for r in targets if await engine.abort(r, {"type": "abort", "message": message})]
        return {"success": True, "aborted": aborted}

    @app.post("/pause_generation")
    async def pause_generation(request: Request):
        body = await read_json_object(request, {"mode": str})
        mode = body["mode"] or "in_place"
        if mode not in ("in_place", "retract", "abort"):
            raise ProtocolError(f"pause mode {mode!r} is not one of in_place, retract, abort")
        if mode == "abort":
            await engine.abort_all()
        await engine.pause()
        return _result(True, f"generation paused ({mode})")

    @app.post("/continue_generation")
    async def continue_generation(request: Request):
        await read_json_object(request, {})
        await engine.resume()
        return _result(True, "generation continued")

    async def memory_tags(request: Request) -> list[str] | None:
        tags = (await read_json_object(request, {"tags": list}))["tags"]
        if tags is not None:
            bad = [t for t in tags if t not in MEMORY_TAGS]
            if bad:
                raise ProtocolError(f"unknown memory tag {bad[0]!r} (known: {list(MEMORY_TAGS)})")
            tags = [t for t in tags if t != "cuda_graph"]
        return tags

    async def change_memory(request: Request, change: Callable[[list[str] | None], Any], verb: str) -> JSONResponse:
        tags = await memory_tags(request)
        try:
            await change(tags)
        except (RuntimeError, ValueError) as e:
            return _result(False, f"cannot {verb} memory: {e}")
        return _result(True, f"{verb}d {tags if tags is not None else 'all'}")

    @app.post("/release_memory_occupation")
    async def release_memory_occupation(request: Request):
        return await change_memory(request, engine.release_memory, "release")

    @app.post("/resume_memory_occupation")
    async def resume_memory_occupation(request: Request):
        return await change_memory(request, engine.resume_memory, "resume")

    @app.post("/update_weights_from_disk")
    async def update_weights_from_disk(request: Request):
        body = await read_json_object(request, {"model_path": str, "load_format": str, "abort_all_requests": bool,
                                        "weight_version": (str, int), "is_async": bool, "torch_empty_cache": bool,
                                        "keep_pause": bool, "recapture_cuda_graph": bool, "token_step": int,
                                        "flush_cache": bool}, required=("model_path",))
        return await server.update_from_disk(body)

    @app.post("/update_weights_from_tensor")
    async def update_weights_from_tensor(request: Request):
        body = await read_json_object(request, {"serialized_named_tensors": list, "load_format": str, "flush_cache": bool,
                                        "abort_all_requests": bool, "weight_version": (str, int)},
                              required=("serialized_named_tensors",))
        return await server.update_from_tensor(body)

    @app.post("/init_weights_update_group")
    async def init_weights_update_group_endpoint(request: Request):
        body = await read_json_object(request, {"master_address": str, "master_port": int, "rank_offset": int,
                                        "world_size": int, "group_name": str, "backend": str},
                              required=("master_address", "master_port", "world_size"))
        return await server.init_group(body)

    @app.post("/update_weights_from_distributed")
    async def update_weights_from_distributed(request: Request):
        body = await read_json_object(request, {"names": list, "dtypes": list, "shapes": list, "group_name": str,
                                        "flush_cache": bool, "abort_all_requests": bool, "weight_version": (str, int),
                                        "load_format": str}, required=("names", "dtypes", "shapes"))
        return await server.update_from_distributed(body)

    @app.post("/weights_checker")
    async def weights_checker(request: Request):
        """--check-weight-update-equal: snapshot / reset_tensors / compare the parameters (weight_checker.py)."""
        body = await read_json_object(request, {"action": str}, required=("action",))
        try:
            message = await engine.call(lambda e: e.runner.check_weights(body["action"]))
        except (RuntimeError, ValueError) as e:
            return _result(False, f"weights_checker {body['action']}: {e}")
        return _result(True, message)

    @app.post("/destroy_weights_update_group")
    async def destroy_weights_update_group(request: Request):
        body = await read_json_object(request, {"group_name": str})
        return await server.destroy_group(body)

    return app


def run_server(argv: list[str]) -> int:
    args = parse_server_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="[%(asctime)s] %(levelname)s %(name)s: %(message)s")
    import uvicorn

    from slime.engine.config import EngineConfig

    tokenizer_path = args.tokenizer_path or args.model_path
    try:
        if args.prefill_wait_ratio < 0 or args.prefill_max_wait_steps < 0 or args.gil_switch_interval_ms <= 0:
            raise ValueError("--prefill-wait-ratio and --prefill-max-wait-steps must be >= 0, "
                             "--gil-switch-interval-ms > 0")
        config = EngineConfig(**engine_config_kwargs(args))
    except ValueError as e:
        print(f"slime engine: {e}", file=sys.stderr)
        return 2
    tokenizer = None
    if not args.skip_tokenizer_init:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        except (OSError, ValueError) as e:
            print(f"slime engine: cannot load the tokenizer from --tokenizer-path {tokenizer_path!r}: {e}", file=sys.stderr)
            return 2

    # the engine thread gives the GIL up around every torch call; when the event loop holds it meanwhile,
    # the engine waits up to this long to get it back (Python's default, 5 ms, is a whole decode step)
    sys.setswitchinterval(args.gil_switch_interval_ms / 1000)

    def make_engine() -> Any:
        from slime.engine.llm_engine import LLMEngine

        engine = LLMEngine(config)
        if config.device.startswith("cuda") and not args.skip_server_warmup:
            engine.warmup()
        engine.scheduler.defer_prefills(args.prefill_wait_ratio, args.prefill_max_wait_steps)
        return engine

    uvicorn_server: uvicorn.Server | None = None
    exit_code = 0

    def on_ready(ok: bool) -> None:
        nonlocal exit_code
        if ok:
            print(f"slime engine server ready at http://{args.host}:{args.port} (model {args.model_path}, "
                  f"device {config.device})", flush=True)
        else:
            exit_code = 1
            uvicorn_server.should_exit = True

    app = create_app(AsyncEngine(make_engine, weight_version=args.weight_version), tokenizer,
                     model_path=args.model_path, tokenizer_path=None if tokenizer is None else tokenizer_path,
                     server_args={**vars(args), "tokenizer_path": tokenizer_path}, on_ready=on_ready)
    uvicorn_server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                                   access_log=False, timeout_keep_alive=60, backlog=4096))
    uvicorn_server.run()
    return exit_code or (0 if uvicorn_server.started else 1)


def main(argv: list[str] | None = None) -> None:
    from slime.engine.parallel import exit_process

    exit_process(run_server(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
