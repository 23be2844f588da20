"""The rollout manager (a Ray actor): engines + router + data source + rollout function.

    manager = create_rollout_manager(args, placement)
    rollout_data, metrics = ray.get(manager.generate.remote(rollout_id))   # dict for the trainer (docs/internals.md)
    ray.get(manager.eval.remote(rollout_id)); ray.get(manager.save.remote(rollout_id))

Engines: one `EngineActor` per engine on the rollout bundles (built-in server, or `sglang.launch_server`
with --rollout-backend sglang), or the servers of --rollout-external-engine-addrs. A router (the
`sglang-router` package when installed, else `slime.ray.router`) fronts them; its address is written to
`args.sglang_router_ip` / `args.sglang_router_port` for the rollout function. A health thread GETs
every engine's /health each --rollout-health-check-interval seconds; with --use-fault-tolerance a dead
engine leaves the router and is restarted (same url, --hf-checkpoint weights); it stays out of the router
until the trainer has pushed the current weights to it (`sync_targets` / `awaiting_weights`, then
`weights_pushed`, driven by slime/train_loop.py), then rejoins. Its in-flight requests fail over through
the router and the rollout's /generate retries (--rollout-max-retries).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
from typing import Any

import httpx
import ray

from slime.logging.rollout_metrics import rollout_metrics
from slime.rollout.log_hooks import call_eval_rollout_log_function, call_rollout_log_function
from slime.ray.engine_actor import EngineActor
from slime.ray.engine_process import ServerProcess, router_add_worker, router_remove_worker, start_router
from slime.ray.debug_dumps import load_debug_rollout_data, save_debug_rollout_data, subsample_groups
from slime.ray.placement import Placement, needs_engines
from slime.utils.plugins import load_function
from slime.utils.types import Sample

logger = logging.getLogger(__name__)

DEFAULT_ROLLOUT_FUNCTION = "slime.rollout.sglang_rollout.generate_rollout"
# up: behind the router; restarting: dead, its actor restarts it; awaiting_weights: restarted, out of the router
# until the trainer pushed the current weights (`weights_pushed`); failed: the restart raised, retried next check
ENGINE_STATES = ("up", "restarting", "awaiting_weights", "failed")


def _call_rollout(fn: Any, *args: Any, **kwargs: Any) -> Any:
    result = fn(*args, **kwargs)
    if inspect.isawaitable(result):
        result = asyncio.run(result)
    return result


def _flatten(groups: list[list[Sample]] | list[Sample]) -> list[Sample]:
    flat: list[Sample] = []
    for item in groups:
        if isinstance(item, Sample):
            flat.append(item)
        else:
            flat.extend(item)
    return flat


def _engine_metrics(before: dict[str, tuple[int, float]], after: dict[str, tuple[int, float]]) -> dict[str, float]:
    """The busiest engine's steps and seconds inside `engine.step()` during one rollout: with `time/rollout` it
    splits the rollout into engine time and the rest (HTTP, rollout function, reward, host work between steps)."""
    deltas = [(after[url][0] - before[url][0], after[url][1] - before[url][1]) for url in after if url in before]
    if not deltas:
        return {}
    steps, seconds = max(deltas, key=lambda d: d[1])
    return {"rollout/engine_steps": float(steps), "time/engine_busy": seconds}


class RolloutManager:
    """Created through `create_rollout_manager`; every method runs inside the actor."""

    def __init__(self, args: Any, placement: Placement) -> None:
        from slime.data.data_source import create_data_source

        self.args = args
        self.placement = placement
        self.data_source = create_data_source(args)
        self.rollout_fn = load_function(getattr(args, "rollout_function_path", None) or DEFAULT_ROLLOUT_FUNCTION,
                                        flag="--rollout-function-path")
        eval_path = getattr(args, "eval_function_path", None)
        self.eval_fn = load_function(eval_path, flag="--eval-function-path") if eval_path else self.rollout_fn
        self.engine_actors: list[Any] = []
        self.engine_urls: list[str] = []
        self.router: ServerProcess | None = None
        self._stop = threading.Event()
        self._health_thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._states: list[str] = []  # per engine: one of ENGINE_STATES
        self._restarts: list[int] = []  # per engine: how often it was restarted (a new process at the same url)

    # ---- engines and router -------------------------------------------------------------------------
    def start_engines(self) -> dict[str, Any]:
        args = self.args
        external = getattr(args, "rollout_external_engine_addrs", None) or []
        if external:
            self.engine_urls = [a if a.startswith("http") else f"http://{a}" for a in external]
            for url in self.engine_urls:
                self._check_reachable(url)
        elif needs_engines(args) and self.placement.rollout_bundles:
            self._start_engine_actors()
        if needs_engines(args) or external:
            if getattr(args, "sglang_router_ip", None) and getattr(args, "sglang_router_port", None):
                logger.info("using the router at %s:%s", args.sglang_router_ip, args.sglang_router_port)
            else:
                self.router = start_router(args, self.engine_urls)
                host, port = self.router.url.removeprefix("http://").rsplit(":", 1)
                args.sglang_router_ip, args.sglang_router_port = host, int(port)
            self._states = ["up"] * len(self.engine_urls)
            self._restarts = [0] * len(self.engine_urls)
            self._start_health_thread()
        return {"engine_urls": list(self.engine_urls), "router_ip": getattr(args, "sglang_router_ip", None),
                "router_port": getattr(args, "sglang_router_port", None)}

    def _check_reachable(self, url: str) -> None:
        try:
            httpx.get(f"{url}/health", timeout=30).raise_for_status()
        except httpx.HTTPError as e:
            raise ValueError(f"--rollout-external-engine-addrs: {url}/health did not answer 200 ({e})") from e

    def _start_engine_actors(self) -> None:
        args, placement = self.args, self.placement
        tp = int(getattr(args, "rollout_num_gpus_per_engine", 1) or 1)
        n_bundles = len(placement.rollout_bundles)
        if n_bundles % tp:
            raise ValueError(f"--rollout-num-gpus {n_bundles} is not a multiple of --rollout-num-gpus-per-engine {tp}")
        multi_node = len({ip for ip in placement.bundle_nodes.values()}) > 1
        actor_cls = ray.remote(EngineActor)
        gpu_share = 0.2 if placement.use_gpu else 0
        for engine_rank in range(n_bundles // tp):
            first = engine_rank * tp
            actor = actor_cls.options(num_cpus=0.25, num_gpus=gpu_share,
                                      scheduling_strategy=placement.rollout_strategy(first)).remote(
                args, engine_rank, tp, multi_node)
            self.engine_actors.append(actor)
        gpu_ids: list[list[str] | None] = [None] * len(self.engine_actors)
        if placement.use_gpu and tp > 1:
            probes = ray.remote(EngineActor)
            for engine_rank in range(len(self.engine_actors)):
                helpers = [probes.options(num_cpus=0, num_gpus=0.01,
                                          scheduling_strategy=placement.rollout_strategy(engine_rank * tp + j)).remote(args, -1, 1)
                           for j in range(tp)]
                gpu_ids[engine_rank] = [g for ids in ray.get([h.gpu_ids.remote() for h in helpers]) for g in ids]
                for h in helpers:
                    ray.kill(h)
        self.engine_urls = ray.get([a.start.remote(placement.use_gpu, ids) for a, ids in zip(self.engine_actors, gpu_ids)])
        logger.info("engines up: %s", self.engine_urls)

    def _start_health_thread(self) -> None:
        interval = float(getattr(self.args, "rollout_health_check_interval", 30) or 30)
        first_wait = float(getattr(self.args, "rollout_health_check_first_wait", 0) or 0)
        self._health_thread = threading.Thread(target=self._health_loop, args=(interval, first_wait), daemon=True)
        self._health_thread.start()

    def _health_loop(self, interval: float, first_wait: float) -> None:
        if self._stop.wait(first_wait):
            return
        while not self._stop.wait(interval):
            self._check_engines()

    def _probe(self, url: str) -> bool:
        timeout = float(getattr(self.args, "rollout_health_check_timeout", 30) or 30)
        try:
            return httpx.get(f"{url}/health", timeout=timeout).status_code == 200
        except httpx.HTTPError:
            return False

    def _check_engines(self) -> None:
        """GET /health of every engine not being restarted; a failed one goes to `_on_unhealthy`."""
        for index, url in enumerate(list(self.engine_urls)):
            if self._stop.is_set():
                return
            with self._lock:
                state = self._states[index] if index < len(self._states) else "up"
            if state == "restarting":
                continue
            if state == "failed" or not self._probe(url):
                self._on_unhealthy(index, url)

    def _fault_tolerant(self) -> bool:
        return bool(getattr(self.args, "use_fault_tolerance", False)) and bool(self.engine_actors)

    def _on_unhealthy(self, index: int, url: str) -> None:
        logger.error("engine %d at %s failed its health check", index, url)
        if not self._fault_tolerant() or index >= len(self.engine_actors):
            return
        with self._lock:
            if self._states[index] == "restarting":
                return
            self._states[index] = "restarting"
        router = f"http://{self.args.sglang_router_ip}:{self.args.sglang_router_port}"
        try:
            router_remove_worker(router, url)
        except httpx.HTTPError as e:
            logger.warning("removing engine %d from the router failed: %s", index, e)
        threading.Thread(target=self._restart, args=(index,), daemon=True).start()

    def _restart(self, index: int) -> None:
        try:
            new_url = ray.get(self.engine_actors[index].restart.remote())
        except Exception as e:  # keep the manager alive; the next health check retries
            logger.error("restarting engine %d failed: %s", index, e)
            with self._lock:
                self._states[index] = "failed"
            return
        with self._lock:
            self.engine_urls[index] = new_url
            self._restarts[index] += 1
            self._states[index] = "awaiting_weights"
        logger.warning("engine %d restarted at %s; it rejoins the router once the trainer pushed weights", index, new_url)

    def _endpoint(self, index: int) -> dict[str, Any]:
        tp = int(getattr(self.args, "rollout_num_gpus_per_engine", 1) or 1)
        restarts = self._restarts[index] if index < len(self._restarts) else 0
        return {"url": self.engine_urls[index], "tp_size": tp, "restarts": restarts}

    def engine_states(self) -> list[dict[str, Any]]:
        """Every engine's endpoint with its state (one of ENGINE_STATES)."""
        with self._lock:
            return [dict(self._endpoint(i), state=self._states[i] if i < len(self._states) else "up")
                    for i in range(len(self.engine_urls))]

    def sync_targets(self) -> list[dict[str, Any]]:
        """Engines a weight sync should reach now. Without --use-fault-tolerance: all of them. With it: a live
        health probe first (a dead engine is sent to restart), then those up or awaiting weights."""
        if not self._fault_tolerant():
            return self.engine_endpoints()
        self._check_engines()
        return [{k: v for k, v in e.items() if k != "state"} for e in self.engine_states()
                if e["state"] in ("up", "awaiting_weights")]

    def awaiting_weights(self) -> list[dict[str, Any]]:
        """Restarted engines that still serve --hf-checkpoint weights (kept out of the router)."""
        return [{k: v for k, v in e.items() if k != "state"} for e in self.engine_states()
                if e["state"] == "awaiting_weights"]

    def weights_pushed(self, engines: list[dict[str, Any]]) -> list[str]:
        """The trainer pushed its current weights to `engines`: restarted ones among them rejoin the router."""
        router = f"http://{self.args.sglang_router_ip}:{self.args.sglang_router_port}"
        rejoined = []
        for engine in engines:
            with self._lock:
                matches = [i for i, url in enumerate(self.engine_urls) if url == engine["url"]
                           and i < len(self._states) and self._states[i] == "awaiting_weights"
                           and self._restarts[i] == engine.get("restarts", 0)]
            for index in matches:
                router_add_worker(router, engine["url"])
                with self._lock:
                    self._states[index] = "up"
                rejoined.append(engine["url"])
                logger.warning("engine %d at %s has the current weights and is back behind the router", index,
                               engine["url"])
        return rejoined

    def health(self) -> list[bool]:
        result = []
        for url in self.engine_urls:
            try:
                result.append(httpx.get(f"{url}/health", timeout=10).status_code == 200)
            except httpx.HTTPError:
                result.append(False)
        return result

    def engine_endpoints(self) -> list[dict[str, Any]]:
        with self._lock:
            return [self._endpoint(i) for i in range(len(self.engine_urls))]

    def router_address(self) -> tuple[str | None, int | None]:
        return getattr(self.args, "sglang_router_ip", None), getattr(self.args, "sglang_router_port", None)

    def _post_all(self, path: str, payload: dict[str, Any] | None = None, timeout: float = 600) -> list[Any]:
        results = []
        with self._lock:  # under --use-fault-tolerance engines being restarted are skipped
            urls = [u for i, u in enumerate(self.engine_urls)
                    if not self._fault_tolerant() or i >= len(self._states) or self._states[i] in ("up", "awaiting_weights")]
        for url in urls:
            r = httpx.post(f"{url}/{path}", json=payload or {}, timeout=timeout)
            if r.status_code >= 400:
                raise RuntimeError(f"POST {url}/{path} answered HTTP {r.status_code}: {r.text[:300]}")
            results.append(r.json() if r.content else None)
        return results

    def release_memory(self, tags: list[str] | None = None) -> None:
        self._post_all("release_memory_occupation", {} if tags is None else {"tags": tags})

    def resume_memory(self, tags: list[str] | None = None) -> None:
        self._post_all("resume_memory_occupation", {} if tags is None else {"tags": tags})

    def pause_generation(self) -> None:
        self._post_all("pause_generation", {})

    def continue_generation(self) -> None:
        self._post_all("continue_generation", {})

    # ---- data ---------------------------------------------------------------------------------------
    def generate(self, rollout_id: int) -> tuple[dict[str, Any], dict[str, float]]:
        from slime.rollout.base_types import split_train_output
        from slime.rollout.train_data import samples_to_train_data

        args = self.args
        counters = self._engine_counters()
        start = time.perf_counter()
        extra_metrics: dict[str, Any] = {}
        if getattr(args, "load_debug_rollout_data", None):
            samples = load_debug_rollout_data(args.load_debug_rollout_data, rollout_id)
            if getattr(args, "load_debug_rollout_data_subsample", None) is not None:
                samples = subsample_groups(samples, args.load_debug_rollout_data_subsample,
                                           multiple_of=max(1, int(getattr(args, "dp_size", 1) or 1)))
        else:
            output = _call_rollout(self.rollout_fn, args, rollout_id, self.data_source, evaluation=False)
            groups, extra_metrics = split_train_output(output)
            samples = _flatten(groups)
        seconds = time.perf_counter() - start
        if getattr(args, "save_debug_rollout_data", None):
            save_debug_rollout_data(args.save_debug_rollout_data, rollout_id, samples)
        sft = getattr(args, "loss_type", None) == "sft_loss"
        metrics = rollout_metrics(args, samples, seconds=None if sft else seconds)
        if sft:  # SFT samples carry no reward; their "generation" is tokenisation
            metrics = {k: v for k, v in metrics.items() if "reward" not in k}
        metrics["time/rollout"] = seconds
        metrics.update(_engine_metrics(counters, self._engine_counters()))
        metrics.update({k: float(v) for k, v in extra_metrics.items() if isinstance(v, (int, float))})
        if call_rollout_log_function(args, rollout_id, samples, extra_metrics, seconds):
            metrics = {k: v for k, v in metrics.items() if k.startswith("time/")}  # the plugin logged them itself
        if getattr(args, "debug_rollout_only", False):
            return {}, metrics
        return samples_to_train_data(args, samples), metrics

    def _engine_counters(self) -> dict[str, tuple[int, float]]:
        """Each built-in engine's (decode + prefill steps, seconds inside its steps) so far, from /get_server_info;
        engines that do not report them (SGLang) or do not answer are left out."""
        counters = {}
        for url in self.engine_urls:
            try:
                state = httpx.get(f"{url}/get_server_info", timeout=5).json()["internal_states"][0]
                counters[url] = (int(state["num_steps"]), float(state["step_seconds"]))
            except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
                continue
        return counters

    def eval(self, rollout_id: int) -> dict[str, float]:
        from slime.rollout.base_types import split_eval_output

        if not self.engine_urls and not getattr(self.args, "sglang_router_ip", None):
            logger.warning("eval skipped at rollout %d: no engines (SFT or --debug-train-only)", rollout_id)
            return {}
        start = time.perf_counter()
        output = _call_rollout(self.eval_fn, self.args, rollout_id, self.data_source, evaluation=True)
        data, extra = split_eval_output(output)
        metrics: dict[str, float] = {}
        means = []
        for name, result in data.items():
            rewards = [float(r) for r in result.get("rewards", [])]
            truncated = result.get("truncated", [])
            mean = sum(rewards) / len(rewards) if rewards else 0.0
            means.append(mean)
            metrics[f"eval/{name}"] = mean
            metrics[f"eval/{name}/num_samples"] = float(len(rewards))
            if truncated:
                metrics[f"eval/{name}/truncated_ratio"] = sum(map(float, truncated)) / len(truncated)
        if means:
            metrics["eval/reward_mean"] = sum(means) / len(means)
        metrics["time/eval"] = time.perf_counter() - start
        metrics.update({k: float(v) for k, v in extra.items() if isinstance(v, (int, float))})
        if call_eval_rollout_log_function(self.args, rollout_id, data, extra):
            metrics = {k: v for k, v in metrics.items() if k.startswith("time/")}  # the plugin logged them itself
        return metrics

    def save(self, rollout_id: int) -> None:
        if getattr(self.args, "save", None):
            self.data_source.save(rollout_id)

    def load(self, rollout_id: int | None) -> bool:
        return bool(self.data_source.load(rollout_id))

    def dataset_size(self) -> int:
        size = getattr(self.data_source, "dataset_size", 0)
        return int((size() if callable(size) else size) or 0)

    def shutdown(self) -> None:
        self._stop.set()
        if self.router is not None:
            self.router.stop()
        if self.engine_actors:
            ray.get([a.stop.remote() for a in self.engine_actors])
            for actor in self.engine_actors:
                ray.kill(actor)
        self.engine_actors = []


def create_rollout_manager(args: Any, placement: Placement) -> Any:
    """Start the manager actor and its engines + router; returns the actor handle."""
    manager = ray.remote(RolloutManager).options(num_cpus=1, max_concurrency=8).remote(args, placement)
    info = ray.get(manager.start_engines.remote())
    args.sglang_router_ip, args.sglang_router_port = info["router_ip"], info["router_port"]
    return manager
