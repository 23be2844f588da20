"""The RL loops behind `python train.py` (synchronous) and `python train_async.py` (one step off-policy).

    python train.py --hf-checkpoint DIR --prompt-data train.jsonl --rollout-batch-size 8 --num-rollout 10 ...
    slime train ... / slime train-async ...          # the same, through the console script

Per rollout (DESIGN §3): eval if due -> generate -> (colocated: engines release memory, trainer onloads)
-> train -> save if due -> weight sync if due -> (colocated: trainer offloads, engines resume).
`run(args)` is the importable form; it returns a summary (last metrics, every eval).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import ray

from slime.logging.metrics import MetricsLogger
from slime.logging.progress import progress_bar
from slime.logging.rollout_metrics import train_data_tokens
from slime.logging.timer import PhaseTimer
from slime.ray.placement import create_placement, init_ray
from slime.ray.rollout_manager import create_rollout_manager
from slime.ray.train_group import TrainGroup
from slime.ray.weight_sync import check_weight_update_equal, weight_sync_mode

logger = logging.getLogger(__name__)

BUILTIN_DATA_SOURCE = "slime.data.data_source.RolloutDataSourceWithBuffer"
FAULT_TOLERANT_SYNC_ATTEMPTS = 3


def add_loop_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("run outputs")
    group.add_argument("--metrics-dir", type=str, default=None,
                       help="Folder for metrics.jsonl (and tensorboard/ when --tb-project-name is unset); default --save.")


def parse_train_args(argv: list[str] | None) -> argparse.Namespace:
    from slime.utils.arguments import parse_args

    return parse_args(argv, add_custom_arguments=add_loop_arguments)


def critic_args(args: argparse.Namespace) -> argparse.Namespace:
    """The critic group's arguments: the actor's, with --critic-lr as its learning rate when given."""
    critic = argparse.Namespace(**vars(args))
    if getattr(args, "critic_lr", None) is not None:
        critic.lr = args.critic_lr
    return critic


def check_rollout_backend(args: argparse.Namespace) -> None:
    """Fail before Ray starts when --rollout-backend sglang is asked for but SGLang is not installed here."""
    import importlib.util

    from slime.ray.placement import needs_engines

    if getattr(args, "rollout_backend", "builtin") == "sglang" and needs_engines(args):
        if importlib.util.find_spec("sglang") is None:
            raise ValueError("--rollout-backend sglang needs SGLang installed (pip install 'sglang[all]'); "
                             "or use --rollout-backend builtin")


@dataclass
class RunSummary:
    start_rollout_id: int
    num_rollout: int
    last_metrics: dict[str, float] = field(default_factory=dict)
    evals: dict[int, dict[str, float]] = field(default_factory=dict)  # step (rollouts trained) -> eval metrics
    weight_version: int | None = None


class Run:
    """Everything one training run holds: placement, rollout manager, train group, logger."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        check_rollout_backend(args)
        self.started_ray = init_ray(args)
        self.placement = create_placement(args)
        self.manager = create_rollout_manager(args, self.placement)
        self.trainer = None if args.debug_rollout_only else TrainGroup(args, self.placement)
        self.critic = None  # PPO: the value model, on the actor's bundles or (--critic-num-gpus-per-node) its own
        if self.trainer is not None and getattr(args, "use_critic", False):
            self.critic = TrainGroup(critic_args(args), self.placement, role="critic")
        self.engines: list[dict[str, Any]] = ray.get(self.manager.engine_endpoints.remote())
        self.sync_mode = weight_sync_mode(args)
        self.metrics = MetricsLogger.from_args(args)
        self.timer = PhaseTimer()

    # ---- set-up -------------------------------------------------------------------------------
    def start(self) -> int:
        args = self.args
        start = int(getattr(args, "start_rollout_id", None) or 0)
        if self.trainer is not None:
            start = self.trainer.init()
        if self.critic is not None:
            critic_start = self.critic.init()
            if critic_start != start:
                raise ValueError(f"--load {getattr(args, 'load', None)}: the actor resumes at rollout {start} but the "
                                 f"critic (its checkpoints in <load>/critic) at {critic_start}; PPO needs both from "
                                 f"the same save")
        resumed = start > 0 and bool(getattr(args, "load", None))
        if resumed:
            found = ray.get(self.manager.load.remote(start - 1))
            builtin_source = getattr(args, "data_source_path", None) in (None, "", BUILTIN_DATA_SOURCE)
            if not found and builtin_source and getattr(args, "start_rollout_id", None) is None:
                raise ValueError(f"--load {args.load}: the checkpoint of rollout {start - 1} has no data-source state "
                                 f"(rollout/global_dataset_state_dict_{start - 1}.pt); resuming would restart the "
                                 "prompt order. Pass --start-rollout-id to start from there with fresh data order.")
        elif self.trainer is None and getattr(args, "load", None):
            ray.get(self.manager.load.remote(None))
        if self.trainer is not None and self.engines and resumed:
            self.trainer.update_weights(self.engines, self.sync_mode)  # engines start from --hf-checkpoint
        if self.trainer is not None and self.engines and getattr(args, "check_weight_update_equal", False):
            check_weight_update_equal([e["url"] for e in self.engines],
                                      lambda: self.trainer.update_weights(self.engines, self.sync_mode))
        if self.colocated_offload:
            self._trainers("offload")
        return start

    def _trainers(self, method: str, *args: Any) -> None:
        """Call `method` on the actor group and, under PPO, a critic that shares the actor's GPUs."""
        for group in (self.trainer, self.critic):
            if group is not None and (group is self.trainer or not group.owns_gpus):
                getattr(group, method)(*args)

    @property
    def colocated_offload(self) -> bool:
        return bool(self.args.colocate and self.trainer is not None and self.engines and self.args.offload_train)

    def num_rollout(self) -> int:
        from slime.data.data_source import resolve_num_rollout

        return resolve_num_rollout(self.args, ray.get(self.manager.dataset_size.remote()))

    # ---- schedule -----------------------------------------------------------------------------
    def eval_due(self, step: int, start: int, num_rollout: int) -> bool:
        interval = getattr(self.args, "eval_interval", None)
        if interval is None or not getattr(self.args, "eval_datasets", None):
            return False
        if step == start:
            return not getattr(self.args, "skip_eval_before_train", False)
        return step % interval == 0 or step == num_rollout

    def save_due(self, rollout_id: int, num_rollout: int) -> bool:
        if not getattr(self.args, "save", None) or self.trainer is None and not self.args.debug_rollout_only:
            return False
        interval = getattr(self.args, "save_interval", None)
        if interval is None:
            return False
        return (rollout_id + 1) % interval == 0 or rollout_id + 1 == num_rollout

    def sync_due(self, rollout_id: int) -> bool:
        if self.trainer is None or not self.engines:
            return False
        interval = int(getattr(self.args, "update_weights_interval", 1) or 1)
        return (rollout_id + 1) % interval == 0

    # ---- phases -------------------------------------------------------------------------------
    def evaluate(self, step: int, summary: RunSummary) -> dict[str, float]:
        with self.timer("eval"):
            metrics = ray.get(self.manager.eval.remote(step))
        summary.evals[step] = metrics
        return metrics

    def train(self, rollout_id: int, rollout_data: dict[str, Any]) -> dict[str, float]:
        assert self.trainer is not None
        if self.colocated_offload:
            sync_now = self.sync_due(rollout_id)
            tags = None if sync_now else ["kv_cache"]  # keep engine weights when no new ones follow
            with self.timer("onload"):
                if self.args.offload_rollout:
                    ray.get(self.manager.release_memory.remote(tags))
                self._trainers("onload")
        metrics: dict[str, float] = {}
        critic_pending = None
        actor_trains = self.critic is None or rollout_id >= int(getattr(self.args, "num_critic_only_steps", 0) or 0)
        if self.critic is not None:
            if float(getattr(self.args, "kl_coef", 0.0) or 0.0) != 0.0:  # the critic's rewards are KL-shaped too
                with self.timer("log_probs"):
                    rollout_data = dict(rollout_data, **self.trainer.handover_log_probs(rollout_data))
            with self.timer("critic_train"):
                rollout_data = dict(rollout_data, values=self.critic.compute_values(rollout_data))  # before its update
                critic_pending = self.critic.start_train(rollout_id, rollout_data)
                if not (self.critic.owns_gpus and actor_trains):  # on the actor's GPUs the two take turns
                    metrics.update(self._critic_metrics(critic_pending))
                    critic_pending = None
            if not actor_trains:
                return metrics  # --num-critic-only-steps: the actor waits for a trained critic
        with self.timer("train"):
            metrics.update(self.trainer.train(rollout_id, rollout_data))
        if critic_pending is not None:  # on GPUs of its own the critic trained while the actor did
            with self.timer("critic_wait"):
                metrics.update(self._critic_metrics(critic_pending))
        seconds = self.timer.seconds("train")
        if seconds > 0:
            metrics["train/tokens_per_s"] = train_data_tokens(rollout_data) / seconds
        return metrics

    def _critic_metrics(self, pending: list[Any]) -> dict[str, float]:
        assert self.critic is not None
        metrics = self.critic.finish_train(pending)
        return {"critic/" + k.split("/", 1)[-1]: v for k, v in metrics.items() if k != "steps"}

    def save_trainers(self, rollout_id: int) -> None:
        """The critic first: the actor's tracker file, written last, commits the checkpoint."""
        if self.critic is not None:
            self.critic.save(rollout_id)
        if self.trainer is not None:
            self.trainer.save(rollout_id)

    def save(self, rollout_id: int) -> None:
        with self.timer("save"):
            # data-source state first: the trainer's tracker file, written last, commits the checkpoint as a whole
            ray.get(self.manager.save.remote(rollout_id))
            self.save_trainers(rollout_id)

    @property
    def fault_tolerant(self) -> bool:
        return bool(getattr(self.args, "use_fault_tolerance", False))

    def sync_targets(self, due: bool) -> list[dict[str, Any]]:
        """Engines to push weights to now: all when due; under --use-fault-tolerance only those up, and, when
        no sync is due, the restarted engines that still wait for the current weights."""
        if not self.fault_tolerant:
            return self.engines if due else []
        if due:
            return ray.get(self.manager.sync_targets.remote())
        return ray.get(self.manager.awaiting_weights.remote())

    def push_weights(self, due: bool) -> int | None:
        """One weight sync; under --use-fault-tolerance an engine dying meanwhile costs one retry without it,
        and restarted engines rejoin the router once they hold the pushed weights."""
        attempts = FAULT_TOLERANT_SYNC_ATTEMPTS if self.fault_tolerant else 1
        for attempt in range(1, attempts + 1):
            targets = self.sync_targets(due)
            if not targets:
                return None
            try:
                version = self.trainer.update_weights(targets, self.sync_mode)
            except Exception as e:  # noqa: BLE001 - re-raised unless an engine died (fault tolerance retries)
                if attempt == attempts:
                    raise
                logger.warning("weight sync failed (%s); checking the engines and retrying (%d/%d)", e, attempt,
                               attempts)
                continue
            if self.fault_tolerant:
                ray.get(self.manager.weights_pushed.remote(targets))
            return version
        return None

    def after_train(self, rollout_id: int) -> int | None:
        """Weight sync (and the colocated memory hand-back); returns the pushed version, if any."""
        version = None
        released = self.colocated_offload and self.args.offload_rollout
        due = self.sync_due(rollout_id)
        if released and due:
            with self.timer("offload"):  # the engine takes its weight memory back before the sync fills it
                ray.get(self.manager.resume_memory.remote(["weights"]))
        if due:
            with self.timer("update_weights"):
                version = self.push_weights(due=True)
        elif self.fault_tolerant and self.engines and not released:
            self.push_weights(due=False)  # restarted engines get the current weights without waiting for a due sync
        if self.colocated_offload:
            with self.timer("offload"):
                self._trainers("offload")
                if released:
                    ray.get(self.manager.resume_memory.remote(["kv_cache"]))
        return version

    def log(self, step: int, *parts: dict[str, Any]) -> dict[str, float]:
        merged: dict[str, Any] = {}
        for part in parts:
            merged.update(part)
        merged.update(self.timer.pop_metrics())
        return self.metrics.log(step, merged)

    def close(self) -> None:
        """Tear everything down; one failing step does not keep the others (engine processes above all) alive."""
        steps = [self.metrics.close]
        steps += [group.shutdown for group in (self.trainer, self.critic) if group is not None]
        steps += [lambda: ray.get(self.manager.shutdown.remote()), lambda: ray.kill(self.manager), self.placement.remove]
        if self.started_ray:
            steps.append(ray.shutdown)
        for step in steps:
            try:
                step()
            except Exception as e:  # noqa: BLE001 - keep tearing down, report each failure
                logger.warning("shutdown step failed: %s", e)


StepHook = Callable[["Run", int, dict[str, Any], dict[str, float]], None]


@contextlib.contextmanager
def _started(args: argparse.Namespace, on_start: Callable[["Run", int], None] | None
             ) -> Iterator[tuple["Run", RunSummary]]:
    """A set-up Run and its summary; on a clean exit the final eval runs, and the run is always torn down."""
    loop = Run(args)
    try:
        start = loop.start()
        if on_start is not None:
            on_start(loop, start)
        summary = RunSummary(start, loop.num_rollout())
        yield loop, summary
        end = summary.num_rollout
        if loop.eval_due(end, start, end) and end > start:
            loop.log(end, loop.evaluate(end, summary))
    finally:
        loop.close()


def _finish_step(loop: "Run", summary: RunSummary, rollout_id: int, rollout_data: dict[str, Any],
                 metrics: tuple[dict[str, float], dict[str, float], dict[str, float]], on_step: StepHook | None) -> None:
    """After training: push weights, log (eval, rollout, train) metrics, call on_step."""
    if loop.trainer is not None:
        version = loop.after_train(rollout_id)
        summary.weight_version = version if version is not None else summary.weight_version
    summary.last_metrics = loop.log(rollout_id, *metrics)
    if on_step is not None:
        on_step(loop, rollout_id, rollout_data, summary.last_metrics)


def run(args: argparse.Namespace, on_start: Callable[["Run", int], None] | None = None,
        on_step: StepHook | None = None) -> RunSummary:
    """The synchronous loop of DESIGN §3. `on_start(run, start)` / `on_step(run, rollout_id, rollout_data, metrics)`
    are called after set-up and after each rollout's weight sync (tests and tools inspect the live run there)."""
    with _started(args, on_start) as (loop, summary):
        start, num_rollout = summary.start_rollout_id, summary.num_rollout
        bar = progress_bar(total=num_rollout - start, desc="rollouts", unit="rollout")
        for rollout_id in range(start, num_rollout):
            eval_metrics = loop.evaluate(rollout_id, summary) if loop.eval_due(rollout_id, start, num_rollout) else {}
            with loop.timer("rollout_total"):
                rollout_data, rollout_metrics = ray.get(loop.manager.generate.remote(rollout_id))
            train_metrics = loop.train(rollout_id, rollout_data) if loop.trainer is not None else {}
            if loop.save_due(rollout_id, num_rollout):
                loop.save(rollout_id)
            _finish_step(loop, summary, rollout_id, rollout_data, (eval_metrics, rollout_metrics, train_metrics),
                         on_step)
            bar.update(1)
        bar.close()
    return summary


def run_async(args: argparse.Namespace, on_start: Callable[["Run", int], None] | None = None,
              on_step: StepHook | None = None) -> RunSummary:
    """Rollout of step n+1 runs while step n trains; weights are pushed with generation paused."""
    if args.colocate:
        raise ValueError("train_async.py does not support --colocate: the engines would generate while the trainer "
                         "holds the same GPUs; drop --colocate (disaggregated) or use train.py")
    if getattr(args, "keep_old_actor", False):
        raise ValueError("train_async.py does not support --keep-old-actor: each rollout comes from the weights one "
                         "sync before the kept copy; use --use-rollout-logprobs (the engine's own log-probs)")
    with _started(args, on_start) as (loop, summary):
        start, num_rollout = summary.start_rollout_id, summary.num_rollout
        next_rollout = loop.manager.generate.remote(start) if start < num_rollout else None
        for rollout_id in range(start, num_rollout):
            eval_metrics = loop.evaluate(rollout_id, summary) if loop.eval_due(rollout_id, start, num_rollout) else {}
            with loop.timer("rollout_wait"):
                rollout_data, rollout_metrics = ray.get(next_rollout)
            save_now = loop.save_due(rollout_id, num_rollout)
            if save_now:  # data-source state after this rollout, before the next one draws prompts
                ray.get(loop.manager.save.remote(rollout_id))
            next_rollout = loop.manager.generate.remote(rollout_id + 1) if rollout_id + 1 < num_rollout else None
            train_metrics = loop.train(rollout_id, rollout_data) if loop.trainer is not None else {}
            if save_now and loop.trainer is not None:
                with loop.timer("save"):
                    loop.save_trainers(rollout_id)
            _finish_step(loop, summary, rollout_id, rollout_data, (eval_metrics, rollout_metrics, train_metrics),
                         on_step)
    return summary


def _main(loop: Any, argv: list[str] | None, prog: str) -> RunSummary:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_train_args(argv)
    try:
        return loop(args)
    except ValueError as e:  # user errors (flags, files, plugins) end with their message, not a traceback
        if os.environ.get("SLIME_DEBUG"):
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def main(argv: list[str] | None = None) -> RunSummary:
    return _main(run, argv, "train.py")


def main_async(argv: list[str] | None = None) -> RunSummary:
    return _main(run_async, argv, "train_async.py")
