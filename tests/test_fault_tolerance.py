"""Engine fault tolerance: an engine server SIGKILLed mid-rollout is restarted with the current weights,
its in-flight requests finish elsewhere, and the step completes with every sample.

    python -m pytest -q tests/test_fault_tolerance.py

A real run through Ray (`slime.train_loop.run`) with two built-in engines behind the router,
`--use-fault-tolerance` and a 1 s health check. While rollout 1 is generating, the test SIGKILLs the
server process of the engine that has requests running; the restarted engine must stay out of the router
until a weight sync reached it, then serve the trainer's weights. A second test checks that a server
process dies with its parent (PR_SET_DEATHSIG).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from ray_helpers import logprob_gap, ray_session, tiny_task, train_argv
from slime.train_loop import parse_train_args, run

BATCH, N_SAMPLES, RESPONSE_LEN = 4, 2, 160  # long enough that the 10 ms poll catches a rollout in flight


def engine_server_pid(url: str) -> int | None:
    """The pid of the `slime.engine.server` process listening on the port of `url`."""
    port = url.rsplit(":", 1)[1]
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"slime.engine.server" in argv and b"--port" in argv and argv[argv.index(b"--port") + 1] == port.encode():
            return int(entry.name)
    return None


def running_requests(url: str) -> int:
    try:
        info = httpx.get(f"{url}/get_server_info", timeout=2).json()
        return int(info["internal_states"][0]["num_running_requests"])
    except (httpx.HTTPError, KeyError, ValueError):
        return 0


class EngineKiller(threading.Thread):
    """Once armed, SIGKILLs the first engine seen with requests in flight."""

    def __init__(self, urls: list[str]) -> None:
        super().__init__(daemon=True)
        self.urls = urls
        self.armed = threading.Event()
        self.stop = threading.Event()
        self.killed: tuple[str, int, int] | None = None  # url, pid, requests in flight

    def run(self) -> None:
        self.armed.wait()
        while not self.stop.is_set() and self.killed is None:
            for url in self.urls:
                in_flight = running_requests(url)
                pid = engine_server_pid(url)
                if in_flight > 0 and pid is not None:
                    os.kill(pid, signal.SIGKILL)
                    self.killed = (url, pid, in_flight)
                    return
            time.sleep(0.01)


@pytest.fixture(scope="module")
def ray_module():
    os.environ.setdefault("SLIME_ROUTER", "builtin")  # Ray workers inherit it: the balancer that retries elsewhere
    ray = ray_session()
    yield ray
    ray.shutdown()


def test_engine_killed_mid_rollout_is_restarted_and_no_sample_is_lost(ray_module, tiny_model_dir, tmp_path):
    import ray

    from slime.ray.engine_process import list_router_workers
    from slime.ray.weight_sync import engine_weight_version

    task = tiny_task(tmp_path)
    argv = train_argv(tiny_model_dir, task, "--rollout-num-gpus", "2", "--rollout-num-gpus-per-engine", "1",
                      "--use-fault-tolerance", "--rollout-health-check-interval", "1",
                      "--rollout-health-check-timeout", "10", "--rollout-health-check-first-wait", "0",
                      "--rollout-temperature", "1.0", rollouts=3)
    for flag, value in (("--rollout-batch-size", BATCH), ("--rollout-max-response-len", RESPONSE_LEN)):
        argv[argv.index(flag) + 1] = str(value)
    args = parse_train_args(argv)
    seen: dict[Any, Any] = {}
    killer: EngineKiller | None = None

    def router_workers(loop) -> list[str]:
        ip, port = ray.get(loop.manager.router_address.remote())
        return list_router_workers(f"http://{ip}:{port}")

    def on_start(loop, start):
        nonlocal killer
        killer = EngineKiller([e["url"] for e in loop.engines])
        killer.start()

    def on_step(loop, rollout_id, rollout_data, metrics):
        seen[rollout_id] = dict(samples=len(rollout_data["tokens"]), lengths=list(rollout_data["response_lengths"]))
        if rollout_id == 0:
            killer.armed.set()
        if rollout_id == 1:
            killer.stop.set()
            assert killer.killed is not None, "the engine was never killed mid-rollout"
            url, pid, _ = killer.killed
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:  # the health check restarts it in the manager
                state = next(e for e in ray.get(loop.manager.engine_states.remote()) if e["url"] == url)
                if state["state"] in ("up", "awaiting_weights"):
                    break
                time.sleep(0.5)
            assert state["restarts"] == 1 and state["state"] in ("up", "awaiting_weights"), state
            assert engine_server_pid(url) not in (None, pid)
            seen["state_after_restart"] = state["state"]
            if state["state"] == "awaiting_weights":  # restarted after this step's sync: out of the router
                assert url not in router_workers(loop)
        if rollout_id == 2:  # the step-2 sync has reached the restarted engine at the latest
            url, _, _ = killer.killed
            states = ray.get(loop.manager.engine_states.remote())
            restarted_state = next(e for e in states if e["url"] == url)
            assert restarted_state["state"] == "up" and url in router_workers(loop), states
            versions = {e["url"]: engine_weight_version(e["url"]) for e in states if e["state"] == "up"}
            assert len(versions) == 2 and len(set(versions.values())) == 1, versions
            restarted = type("RestartedEngine", (), {"engines": [{"url": url}], "trainer": loop.trainer})
            seen["gap_after_restart"] = logprob_gap(restarted, [[1, 10, 20, 30], [1, 40, 50]])

    run(args, on_start=on_start, on_step=on_step)
    assert killer is not None and killer.killed is not None
    for rollout_id in (0, 1, 2):
        assert seen[rollout_id]["samples"] == BATCH * N_SAMPLES, f"rollout {rollout_id} lost samples: {seen}"
        assert all(n > 0 for n in seen[rollout_id]["lengths"])
    assert seen["gap_after_restart"] < 1e-4, "the restarted engine does not serve the current weights"


PARENT_SCRIPT = """
import sys, time
from slime.ray.engine_process import ServerProcess
proc = ServerProcess([sys.executable, "-c", "import time; time.sleep(120)"], "http://127.0.0.1:1", "sleeper")
proc.start()
print(proc.process.pid, flush=True)
time.sleep(120)
"""


def process_running(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_server_process_dies_with_its_parent():
    """Engines and the router run in their own session (for killpg) yet die when their parent is SIGKILLed."""
    import subprocess
    import sys

    parent = subprocess.Popen([sys.executable, "-c", PARENT_SCRIPT], stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        assert Path(f"/proc/{child}").exists()
        parent.kill()
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and process_running(child):
            time.sleep(0.05)
        assert not process_running(child), "the server process outlived its SIGKILLed parent"
    finally:
        parent.kill()
