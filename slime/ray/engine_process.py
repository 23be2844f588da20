"""Start, watch and stop one engine server (built-in or SGLang) or the router as a child process.

    proc = ServerProcess(["python", "-m", "slime.engine.server", "--model-path", DIR, "--port", "30001"],
                         url="http://127.0.0.1:30001", name="engine 0")
    proc.start(); proc.wait_healthy(timeout_s=300); ...; proc.stop()

Output goes to a log file whose last lines are quoted when the server dies or never becomes healthy.
"""

from __future__ import annotations

import importlib.util
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

import httpx

from slime.ray.train_group import free_port


def tail(path: str, lines: int = 30) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            return "\n".join(f.read().decode("utf-8", "replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


PR_SET_DEATHSIG = 1


def _die_with_parent(parent_pid: int) -> Callable[[], None]:
    """preexec_fn (Linux): the child gets SIGKILL when the thread that started it exits, so a SIGKILLed
    driver or Ray actor leaves no engine or router behind (they run in their own session for killpg)."""

    def preexec() -> None:
        import ctypes

        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):  # not Linux: no parent-death signal
            return
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


class ServerProcess:
    def __init__(self, argv: list[str], url: str, name: str, env: dict[str, str] | None = None,
                 health_path: str = "/health") -> None:
        self.argv = argv
        self.url = url
        self.name = name
        self.env = dict(os.environ, **(env or {}))
        self.health_path = health_path
        fd, self.log_path = tempfile.mkstemp(prefix=f"slime_{name.replace(' ', '_')}_", suffix=".log")
        os.close(fd)
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        log = open(self.log_path, "ab")
        preexec = _die_with_parent(os.getpid()) if sys.platform.startswith("linux") else None
        self.process = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                        start_new_session=True, preexec_fn=preexec)
        log.close()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def healthy(self, timeout_s: float = 5.0) -> bool:
        if not self.alive():
            return False
        try:
            return httpx.get(self.url + self.health_path, timeout=timeout_s).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                code = self.process.returncode if self.process else None
                raise RuntimeError(f"{self.name} exited with code {code} before it became healthy; "
                                   f"command: {' '.join(self.argv)}\nlast log lines ({self.log_path}):\n{tail(self.log_path)}")
            if self.healthy():
                return
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"{self.name} was not healthy at {self.url}{self.health_path} after {timeout_s:.0f}s; "
                           f"last log lines ({self.log_path}):\n{tail(self.log_path)}")

    def stop(self, grace_s: float = 10.0) -> None:
        if not self.alive():
            return
        assert self.process is not None
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=grace_s)


def engine_argv(args: Any, host: str, port: int, tp_size: int, use_gpu: bool) -> list[str]:
    """Command line of one engine server for `--rollout-backend` (builtin | sglang)."""
    from slime.utils.arguments.sglang import engine_server_argv

    backend = getattr(args, "rollout_backend", "builtin")
    extra = engine_server_argv(args)
    if backend == "sglang":
        if importlib.util.find_spec("sglang") is None:
            raise ValueError("--rollout-backend sglang needs SGLang installed on every rollout node "
                             "(pip install 'sglang[all]'); or use --rollout-backend builtin")
        argv = [sys.executable, "-m", "sglang.launch_server", "--model-path", args.hf_checkpoint,
                "--host", host, "--port", str(port), "--tp-size", str(tp_size), "--trust-remote-code"]
        if getattr(args, "offload_rollout", False) and "--enable-memory-saver" not in extra:
            argv.append("--enable-memory-saver")
        return argv + extra
    if backend != "builtin":
        raise ValueError(f"--rollout-backend {backend!r} is unknown (builtin | sglang)")
    argv = [sys.executable, "-m", "slime.engine.server", "--model-path", args.hf_checkpoint,
            "--host", host, "--port", str(port)]
    argv += ["--device", "cuda" if use_gpu else "cpu"]
    if tp_size != 1:
        argv += ["--tp-size", str(tp_size)]
    return argv + extra


def needs_abort_broadcast(args: Any) -> bool:
    """Partial rollout and over-sampling abort in-flight requests on every engine (found via /list_workers)."""
    over = getattr(args, "over_sampling_batch_size", None)
    batch = getattr(args, "rollout_batch_size", None)
    return bool(getattr(args, "partial_rollout", False)) or (over is not None and batch is not None and over > batch)


def use_sglang_router(args: Any) -> bool:
    """SLIME_ROUTER=sglang|builtin forces a choice; by default the `sglang-router` package when importable,
    except where aborts must reach every engine: sglang-router 0.3 has no /list_workers or /abort_request."""
    choice = os.environ.get("SLIME_ROUTER", "auto")
    if choice not in ("auto", "sglang", "builtin"):
        raise ValueError(f"SLIME_ROUTER={choice!r}: use auto, sglang or builtin")
    installed = importlib.util.find_spec("sglang_router") is not None
    if choice == "sglang":
        if not installed:
            raise ValueError("SLIME_ROUTER=sglang but the sglang-router package is not installed (pip install sglang-router)")
        return True
    return choice == "auto" and installed and not needs_abort_broadcast(args)


def router_argv(host: str, port: int, worker_urls: list[str], args: Any) -> list[str]:
    """Command line of the router (see `use_sglang_router`)."""
    timeout = str(getattr(args, "sglang_router_request_timeout_secs", 14400) or 14400)
    interval = str(max(1, math.ceil(float(getattr(args, "rollout_health_check_interval", 30) or 30))))  # whole seconds
    if use_sglang_router(args):
        return [sys.executable, "-m", "sglang_router.launch_router", "--host", host, "--port", str(port),
                "--worker-urls", *worker_urls, "--policy", "round_robin", "--request-timeout-secs", timeout,
                "--health-check-interval-secs", interval, "--log-level", "warn",
                "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port())]  # default 29000 clashes between routers
    return [sys.executable, "-m", "slime.ray.router", "--host", host, "--port", str(port),
            "--worker-urls", *worker_urls, "--health-check-interval", interval, "--request-timeout-secs", timeout]


def start_router(args: Any, worker_urls: list[str], host: str = "127.0.0.1", timeout_s: float = 120.0) -> ServerProcess:
    port = free_port()
    proc = ServerProcess(router_argv(host, port, worker_urls, args), f"http://{host}:{port}", "router")
    proc.start()
    proc.wait_healthy(timeout_s)
    return proc


def list_router_workers(router_url: str) -> list[str]:
    """Worker URLs behind either router: ours answers GET /list_workers, sglang-router 0.3 GET /workers."""
    r = httpx.get(f"{router_url}/list_workers", timeout=10)
    if r.status_code == 200:
        return [u.rstrip("/") for u in r.json()["urls"]]
    r = httpx.get(f"{router_url}/workers", timeout=10)
    r.raise_for_status()
    return [w["url"].rstrip("/") for w in r.json()["workers"]]


def router_add_worker(router_url: str, worker_url: str) -> None:
    r = httpx.post(f"{router_url}/add_worker", params={"url": worker_url}, timeout=30)
    if r.status_code == 404:
        r = httpx.post(f"{router_url}/workers", json={"url": worker_url}, timeout=30)
    if r.status_code >= 400:
        raise RuntimeError(f"router {router_url} refused worker {worker_url}: HTTP {r.status_code} {r.text[:200]}")


def router_remove_worker(router_url: str, worker_url: str) -> None:
    r = httpx.post(f"{router_url}/remove_worker", params={"url": worker_url}, timeout=30)
    if r.status_code != 404:
        return
    listed = httpx.get(f"{router_url}/workers", timeout=10)
    if listed.status_code != 200:
        return
    for worker in listed.json().get("workers", []):
        if worker.get("url", "").rstrip("/") == worker_url.rstrip("/") and worker.get("id"):
            httpx.delete(f"{router_url}/workers/{worker['id']}", timeout=30)
