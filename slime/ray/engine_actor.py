"""A Ray actor per rollout engine: it sits on the engine's placement bundle and runs the server process there.

    actor = ray.remote(EngineActor).options(scheduling_strategy=...).remote(args, engine_rank=0, tp_size=1)
    url = ray.get(actor.start.remote(use_gpu=False))

On GPU hosts Ray narrows CUDA_VISIBLE_DEVICES to the actor's GPU; an engine of several GPUs
(--rollout-num-gpus-per-engine) gets the GPUs of its consecutive bundles, passed in `gpu_ids`.
"""

from __future__ import annotations

import os
from typing import Any

import ray

from slime.ray.engine_process import ServerProcess, engine_argv
from slime.ray.train_group import free_port

ENGINE_START_TIMEOUT_S = float(os.environ.get("SLIME_ENGINE_START_TIMEOUT_S", "600"))


class EngineActor:
    def __init__(self, args: Any, engine_rank: int, tp_size: int, bind_all: bool = False) -> None:
        self.args = args
        self.engine_rank = engine_rank
        self.tp_size = tp_size
        self.bind_all = bind_all
        self.process: ServerProcess | None = None

    def gpu_ids(self) -> list[str]:
        return [str(g) for g in ray.get_gpu_ids()]

    def start(self, use_gpu: bool, gpu_ids: list[str] | None = None) -> str:
        node_ip = ray.util.get_node_ip_address()
        host = "0.0.0.0" if self.bind_all else "127.0.0.1"
        url_host = node_ip if self.bind_all else "127.0.0.1"
        port = free_port()
        env: dict[str, str] = {}
        if use_gpu:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpu_ids or self.gpu_ids())
        self.process = ServerProcess(engine_argv(self.args, host, port, self.tp_size, use_gpu),
                                     f"http://{url_host}:{port}", f"engine {self.engine_rank}", env=env)
        self.process.start()
        self.process.wait_healthy(ENGINE_START_TIMEOUT_S)
        return self.process.url

    def restart(self) -> str:
        """A new server process at the same url; it loads --hf-checkpoint, so the caller pushes the current weights."""
        assert self.process is not None
        self.process.stop()
        self.process.start()
        self.process.wait_healthy(ENGINE_START_TIMEOUT_S)
        return self.process.url

    def healthy(self) -> bool:
        return self.process is not None and self.process.healthy()

    def log_path(self) -> str | None:
        return self.process.log_path if self.process else None

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
