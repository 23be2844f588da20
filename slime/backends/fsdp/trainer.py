"""FSDPTrainer: the default train backend (HF model + FSDP2), one instance per data-parallel rank.

    trainer = FSDPTrainer(args); start_rollout_id = trainer.init(); metrics = trainer.train(rollout_id, shard)

Plain class without Ray (`slime/ray/` wraps it). The caller initialises torch.distributed (one
rank per GPU, or CPU processes with gloo); without a group the trainer starts a 1-rank one.
`train` receives this rank's shard of the rollout dict (docs/internals.md "Rollout data handed
to the trainer"), computes old / reference log-probs, advantages (`slime.algo`), then takes
`steps_per_rollout(args)` optimizer steps. The loss of each micro-batch is divided by the number
of samples (or loss tokens with --calculate-per-token-loss) of the whole step over all ranks and
multiplied by the data-parallel size (FSDP averages gradients over ranks), so N ranks make the
same update as one process on the concatenated data.

PPO (`--advantage-estimator ppo`) runs a second instance with role="critic" (same backbone, a
1-output `score` head; checkpoints in `<--save>/critic/`): `values = critic.compute_values(shard)`,
`critic.train(id, shard)` (add the actor's `log_probs` / `ref_log_probs` when `--kl-coef` shapes
the rewards), then `actor.train(id, dict(shard, values=values))`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from slime.algo.reduce import concat_samples, flat_mask, get_sum_of_sample_mean, masked
from slime.algo.rl_loss import EXTREMUM_METRICS, compute_advantages_from_args, compute_rl_loss
from slime.rollout.train_data import apply_rollout_data_postprocess
from slime.backends.fsdp import checkpoint as ckpt
from slime.backends.fsdp.batching import (pack_samples, plan_micro_batches, samples_to_device, split_into_steps,
                                         validate_rollout_data)
from slime.backends.fsdp.distributed import all_reduce_max, all_reduce_sums, build_mesh, ensure_process_group
from slime.backends.fsdp.model import PolicyModel, ValueModel, build_sharded_policy, hf_name, reshard_all
from slime.backends.fsdp.offload import offload_to_cpu, onload_to_device
from slime.backends.fsdp.optimizer import LRSchedule, build_optimizer, reset_optimizer_states, steps_per_rollout
from slime.backends.fsdp.ref_model import load_shards, snapshot_shards, swapped_in
from slime.backends.fsdp.weight_export import iter_weight_buckets
from slime.logging.profiler import PhaseProfiler
from slime.utils.plugins import load_function

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Too many optimizer steps in a row had a NaN/Inf loss or gradient (--max-nan-steps)."""


PER_SAMPLE_TENSOR_KEYS = ("log_probs", "ref_log_probs", "rollout_log_probs", "values", "advantages", "returns",
                          "loss_masks", "kl")


def _arg(args: Any, name: str, default: Any = None) -> Any:
    value = getattr(args, name, default)
    return default if value is None else value


def _select(batch: dict[str, Any], indices: list[int]) -> dict[str, Any]:
    """The sub-batch of the given sample indices (per-sample lists and tensors sliced, the rest kept)."""
    n = len(batch["tokens"])
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, list) and len(value) == n:
            out[key] = [value[i] for i in indices]
        elif torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == n:
            out[key] = value[indices]
        else:
            out[key] = value
    return out


def _mismatch_sums(log_probs: Any, rollout_log_probs: Any, loss_masks: Any) -> tuple[Any, Any]:
    """(sum of |train - rollout| log-prob over loss tokens, number of loss tokens), per-sample tensors in."""
    if not log_probs:
        return 0.0, 0.0
    lp = concat_samples(log_probs, log_probs[0].device)
    rollout = concat_samples(rollout_log_probs, lp.device).to(lp.dtype)
    mask = flat_mask(loss_masks, lp)
    return masked((lp - rollout).abs(), mask).sum(), mask.sum()


def _to_host_floats(values: dict[str, Any]) -> dict[str, float]:
    """Scalars (device tensors or numbers) as floats, the tensors in one device-to-host copy."""
    tensors = {k: v for k, v in values.items() if torch.is_tensor(v)}
    out = {k: float(v) for k, v in values.items() if k not in tensors}
    if tensors:
        stacked = torch.stack([t.reshape(()).float() for t in tensors.values()]).cpu().tolist()
        out.update(zip(tensors, stacked))
    return {k: out[k] for k in values}


class FSDPTrainer:
    def __init__(self, args: Any, role: str = "actor") -> None:
        if role not in ("actor", "critic"):
            raise ValueError(f"FSDPTrainer role must be 'actor' or 'critic', got {role!r}")
        self.args = args
        self.role = role
        self.device = _arg(args, "device", "cuda" if torch.cuda.is_available() else "cpu")
        self.weight_version = 0
        self.model: PolicyModel | ValueModel | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: LRSchedule | None = None
        self.ref_shards: dict[str, torch.Tensor] | None = None
        self.old_actor_shards: dict[str, torch.Tensor] | None = None  # --keep-old-actor: the engines' weights
        self.offloaded = False
        self.nan_steps_in_a_row = 0
        self._mismatch_sums: dict[str, Any] | None = None  # set while a skipped old-log-prob pass is measured
        self._told_skip = False
        self._pending_save: ckpt.PendingSave | None = None  # --async-save: the checkpoint being written
        self.profiler = PhaseProfiler(args, rank=0)  # its rank is set by init()
        self._save_group: Any = None

    # ----------------------------------------------------------------- setup
    def init(self) -> int:
        args = self.args
        ensure_process_group(self.device, _arg(args, "distributed_timeout_minutes", 10))
        torch.manual_seed(_arg(args, "seed", 1234))
        self.rank, self.dp_size = dist.get_rank(), dist.get_world_size()
        self.profiler.rank = self.rank
        self.mesh = build_mesh(self.device)
        self.model = build_sharded_policy(args, self.mesh, role=self.role)
        self.optimizer = build_optimizer(self.model.named_parameters(), args)
        self.scheduler = LRSchedule(self.optimizer, args)
        if self.needs_ref:
            self.ref_shards = self._load_ref_shards()
        start = int(_arg(args, "start_rollout_id", 0))
        load = self._role_dir(_arg(args, "load", None))
        iteration = ckpt.latest_iteration(load)
        if iteration is not None:
            state = ckpt.load_checkpoint(load, iteration, self.model, self.optimizer,
                                         load_optim=not _arg(args, "no_load_optim", False))
            self.scheduler.load_state_dict(state["scheduler"])
            self.weight_version = int(state.get("weight_version", 0))
            # the rollout the checkpoint finished (-1 for one converted from HF); --start-rollout-id overrides
            if getattr(args, "start_rollout_id", None) is None:
                start = int(state.get("rollout_id", iteration)) + 1
        self.weights_synced()  # the engines start from these weights (resumed runs push them first)
        return start

    def weights_synced(self) -> None:
        """The engines now hold the current weights: under --keep-old-actor, keep a copy (on the CPU) that computes
        the old log-probs until the next sync, so the PPO ratio's denominator is the policy that generated them."""
        if self.role == "actor" and _arg(self.args, "keep_old_actor", False):
            self.old_actor_shards = snapshot_shards(self.model)

    @property
    def needs_ref(self) -> bool:
        if self.role == "critic":
            return False
        return bool(_arg(self.args, "use_kl_loss", False)) or float(_arg(self.args, "kl_coef", 0.0)) != 0.0

    def _load_ref_shards(self) -> dict[str, torch.Tensor]:
        """--ref-load (an HF directory or a --save directory), else the initial weights."""
        ref_load = _arg(self.args, "ref_load", None)
        if not ref_load:
            return snapshot_shards(self.model)
        path = Path(ref_load)
        if (path / "config.json").exists():
            ref_model = build_sharded_policy(self.args, self.mesh, path=str(path))
            shards = snapshot_shards(ref_model)
            del ref_model
            return shards
        iteration = ckpt.latest_iteration(path)
        if iteration is None:
            raise ValueError(f"--ref-load {ref_load}: neither a Hugging Face checkpoint (config.json) nor a "
                             f"checkpoint directory ({ckpt.TRACKER})")
        own = snapshot_shards(self.model)
        ckpt.load_model_weights(ckpt.iteration_dir(path, iteration), self.model)
        shards = snapshot_shards(self.model)
        load_shards(self.model, own)
        return shards

    # ----------------------------------------------------------------- data
    def _prepare_batch(self, rollout_data: dict[str, Any]) -> dict[str, Any]:
        validate_rollout_data(rollout_data)
        batch: dict[str, Any] = {
            "tokens": [list(map(int, t)) for t in rollout_data["tokens"]],
            "response_lengths": [int(r) for r in rollout_data["response_lengths"]],
            "loss_masks": [torch.as_tensor(m, dtype=torch.float32) for m in rollout_data["loss_masks"]],
            "rewards": torch.as_tensor(rollout_data["rewards"], dtype=torch.float32),
        }
        batch["total_lengths"] = [len(t) for t in batch["tokens"]]
        rollout_lp = rollout_data.get("rollout_log_probs")
        if rollout_lp is not None and all(x is not None for x in rollout_lp):
            batch["rollout_log_probs"] = [torch.as_tensor(x, dtype=torch.float32) for x in rollout_lp]
        for key in ("values", "log_probs", "ref_log_probs"):  # handed over between actor and critic (PPO)
            if rollout_data.get(key) is not None:
                batch[key] = [torch.as_tensor(x, dtype=torch.float32) for x in rollout_data[key]]
        for key in ("raw_reward", "truncated", "sample_indices"):
            if key in rollout_data:
                batch[key] = rollout_data[key]
        return batch

    def _agree(self, n: int) -> int:
        return all_reduce_max(n, self.device)

    def _plan(self, lengths: list[int], max_tokens: int | None) -> list[list[int]]:
        return plan_micro_batches(lengths, dynamic=bool(_arg(self.args, "use_dynamic_batch_size", False)),
                                  max_tokens=max_tokens, micro_batch_size=int(_arg(self.args, "micro_batch_size", 1)),
                                  agree_count=self._agree)

    def _row(self, batch: dict[str, Any], indices: list[int]):
        return pack_samples([batch["tokens"][i] for i in indices], [batch["response_lengths"][i] for i in indices],
                            self.device)

    @property
    def temperature(self) -> float:
        return float(_arg(self.args, "rollout_temperature", 1.0))

    # ----------------------------------------------------------------- log-probs
    def _log_probs_of(self, batch: dict[str, Any]) -> list[torch.Tensor]:
        """Per-sample response log-probs with the current weights, no grad; CPU tensors."""
        assert self.model is not None
        max_tokens = _arg(self.args, "log_probs_max_tokens_per_gpu", None) or _arg(self.args, "max_tokens_per_gpu")
        log_probs: list[torch.Tensor | None] = [None] * len(batch["tokens"])
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            for indices in self._plan(batch["total_lengths"], max_tokens):
                row = self._row(batch, indices)
                lp, _ = self.model(row, self.temperature, int(_arg(self.args, "log_probs_chunk_size", -1)), False)
                for i, sample_lp in zip(indices, lp.float().cpu().split(row.response_lengths)):  # one copy per row
                    log_probs[i] = sample_lp.clone()  # its own storage: a view would pickle the whole row
        self.model.train(was_training)
        reshard_all(self.model)
        return log_probs  # type: ignore[return-value]

    def _values_of(self, batch: dict[str, Any]) -> list[torch.Tensor]:
        """Critic: per-sample values at the response positions with the current weights, no grad; CPU tensors."""
        assert self.model is not None and self.role == "critic"
        max_tokens = _arg(self.args, "log_probs_max_tokens_per_gpu", None) or _arg(self.args, "max_tokens_per_gpu")
        values: list[torch.Tensor | None] = [None] * len(batch["tokens"])
        self.model.eval()
        with torch.no_grad():
            for indices in self._plan(batch["total_lengths"], max_tokens):
                row = self._row(batch, indices)
                for i, v in zip(indices, self.model(row).float().cpu().split(row.response_lengths)):
                    values[i] = v.clone()
        self.model.train()
        reshard_all(self.model)
        return values  # type: ignore[return-value]

    def compute_values(self, rollout_data: dict[str, Any]) -> list[torch.Tensor]:
        """Critic only: per-sample values of this rank's samples, for the actor's GAE (collective)."""
        if self.role != "critic":
            raise ValueError("compute_values needs FSDPTrainer(args, role='critic')")
        self._check_onloaded()
        return self._values_of(self._prepare_batch(rollout_data))

    def compute_log_probs(self, rollout_data: dict[str, Any]) -> list[torch.Tensor]:
        """Response-token log-probs of this rank's samples under the current weights (collective)."""
        if self.role != "actor":
            raise ValueError("compute_log_probs needs the actor; the critic has compute_values")
        self._check_onloaded()
        return self._log_probs_of(self._prepare_batch(rollout_data))

    def compute_ref_log_probs(self, rollout_data: dict[str, Any]) -> list[torch.Tensor]:
        if self.ref_shards is None:
            raise ValueError("no reference model: enable --use-kl-loss or --kl-coef")
        self._check_onloaded()
        with swapped_in(self.model, self.ref_shards):
            return self._log_probs_of(self._prepare_batch(rollout_data))

    # ----------------------------------------------------------------- training
    def train(self, rollout_id: int, rollout_data: dict[str, Any]) -> dict[str, Any]:
        """Old/ref log-probs, advantages, then the optimizer steps of this rollout. Collective.

        Returns {"train/<metric>": mean over steps, ..., "steps": [per-step metric dicts]}; every
        rank returns the same numbers."""
        with self.profiler.phase("train_overall", rollout_id):
            return self._train(rollout_id, rollout_data)

    def _train(self, rollout_id: int, rollout_data: dict[str, Any]) -> dict[str, Any]:
        self._check_onloaded()
        args = self.args
        start = time.time()
        batch = self._prepare_batch(rollout_data)
        if _arg(args, "reset_optimizer_states", False):
            reset_optimizer_states(self.optimizer)
        rollout_metrics: dict[str, float] = {}
        self._mismatch_sums = None
        if self.role == "critic":
            if "values" not in batch:  # the driver may hand over the values it just had this critic compute
                batch["values"] = self._values_of(batch)
        elif _arg(args, "advantage_estimator", "grpo") == "ppo" and "values" not in batch:
            raise ValueError("--advantage-estimator ppo: the actor needs the critic's values in rollout_data['values'] "
                             "(FSDPTrainer(args, role='critic').compute_values)")
        with self.profiler.phase("train_log_probs", rollout_id):
            self._attach_log_probs(batch, rollout_metrics)
        compute_advantages_from_args(args, batch)
        apply_rollout_data_postprocess(args, rollout_id, batch)  # --rollout-data-postprocess-path sees log-probs + advantages

        steps = split_into_steps(len(batch["tokens"]), steps_per_rollout(args))
        with self.profiler.phase("train_actor", rollout_id):
            step_metrics = [self._train_step(_select(batch, indices)) for indices in steps]
        if self._mismatch_sums is not None:
            rollout_metrics.update(self._mismatch_metric_from_sums(self._mismatch_sums))
            self._mismatch_sums = None
        ref_interval = _arg(args, "ref_update_interval", None)
        if self.ref_shards is not None and ref_interval and (rollout_id + 1) % int(ref_interval) == 0:
            self.ref_shards = snapshot_shards(self.model)  # --ref-update-interval: the reference follows the actor
        out: dict[str, Any] = {f"train/{k}": v for k, v in rollout_metrics.items()}
        for key in sorted(set().union(*step_metrics)):
            values = [m[key] for m in step_metrics if key in m]
            out[f"train/{key}"] = sum(values) / len(values)
        out["steps"] = step_metrics
        out["train/time_s"] = time.time() - start
        out["train/weight_version"] = self.weight_version
        return out

    def handover_log_probs(self, rollout_data: dict[str, Any]) -> dict[str, list[torch.Tensor]]:
        """PPO with --kl-coef: the old and reference log-probs this actor would use, computed now so that the critic
        shapes its rewards with them too (the actor's train() then takes them from rollout_data). Collective."""
        self._check_onloaded()
        batch = self._prepare_batch(rollout_data)
        self._attach_log_probs(batch, {})
        return {key: batch[key] for key in ("log_probs", "ref_log_probs") if key in batch}

    def _attach_log_probs(self, batch: dict[str, Any], rollout_metrics: dict[str, float]) -> None:
        """batch['log_probs'] (old policy) and batch['ref_log_probs'] where the loss needs them."""
        args = self.args
        if "log_probs" in batch and (self.ref_shards is None or "ref_log_probs" in batch):
            return  # handed over by the driver (handover_log_probs)
        if self.role == "critic":
            pass  # old / ref log-probs, when the KL reward needs them, come from the actor in rollout_data
        elif _arg(args, "use_rollout_logprobs", False):
            if "rollout_log_probs" not in batch:
                raise ValueError("--use-rollout-logprobs needs rollout_log_probs in the rollout data")
            batch["log_probs"] = [x.clone() for x in batch["rollout_log_probs"]]
        elif self._old_log_probs_are_current():
            rollout_metrics["log_probs_time_s"] = 0.0  # the loss takes the training forward's own log-probs
            self._mismatch_sums = {} if "rollout_log_probs" in batch else None
            if not self._told_skip and self.rank == 0:
                self._told_skip = True
                logger.info("one optimizer step per rollout: old log-probs come from the training forward "
                            "(no separate pass; --recompute-old-log-probs forces it)")
        else:
            log_prob_start = time.time()
            with swapped_in(self.model, self.old_actor_shards) if self.old_actor_shards else contextlib.nullcontext():
                batch["log_probs"] = self._log_probs_of(batch)  # host tensors: the device work is done
            rollout_metrics["log_probs_time_s"] = time.time() - log_prob_start
            if "rollout_log_probs" in batch:
                rollout_metrics.update(self._mismatch_metric(batch))
        if self.ref_shards is not None and self.role == "actor":
            ref_start = time.time()
            with swapped_in(self.model, self.ref_shards):
                batch["ref_log_probs"] = self._log_probs_of(batch)
            rollout_metrics["log_probs_time_s"] = (rollout_metrics.get("log_probs_time_s", 0.0)
                                                + time.time() - ref_start)

    def _old_log_probs_are_current(self) -> bool:
        """Whether the separate old-log-prob forward can be skipped: it cannot change the update when the
        rollout gets one optimizer step (the weights that would compute the old log-probs are the ones the
        loss sees, so the PPO ratio is 1 either way), no --kl-coef shapes the reward with them, and no plugin
        reads batch['log_probs']. The loss then uses its forward's own detached log-probs (as TRL does for
        one iteration); --recompute-old-log-probs keeps the pass."""
        args = self.args
        if self.role != "actor" or _arg(args, "recompute_old_log_probs", False) or steps_per_rollout(args) != 1:
            return False
        if self.old_actor_shards is not None:  # the kept weights may be older than the current ones
            return False
        if float(_arg(args, "kl_coef", 0.0) or 0.0) != 0.0 or _arg(args, "loss_type", "policy_loss") != "policy_loss":
            return False
        plugins = ("custom_advantage_function_path", "rollout_data_postprocess_path")
        return not any(_arg(args, name, None) for name in plugins)

    def _add_mismatch(self, lp: torch.Tensor, mb: dict[str, Any], row) -> None:
        """Accumulate the mismatch sums of a micro-batch's training forward (device tensors, no sync)."""
        diff, count = _mismatch_sums(lp.detach().float().split(row.response_lengths), mb["rollout_log_probs"],
                                     mb["loss_masks"])
        sums = self._mismatch_sums
        sums["diff"], sums["count"] = sums.get("diff", 0.0) + diff, sums.get("count", 0.0) + count

    def _mismatch_metric(self, batch: dict[str, Any]) -> dict[str, float]:
        """Masked mean |train log-prob - rollout log-prob| over all ranks' loss tokens."""
        diff, count = _mismatch_sums(batch["log_probs"], batch["rollout_log_probs"], batch["loss_masks"])
        return self._mismatch_metric_from_sums({"diff": diff, "count": count})

    def _mismatch_metric_from_sums(self, sums: dict[str, Any]) -> dict[str, float]:
        local = {key: float(sums.get(key, 0.0)) for key in ("diff", "count")}
        totals = all_reduce_sums(local, self.device)
        return {"train_rollout_logprob_abs_diff": totals["diff"] / max(totals["count"], 1.0)}

    def _loss_of_micro_batch(self, mb: dict[str, Any], indices: list[int], row) -> tuple[torch.Tensor, dict]:
        args = self.args
        if self.role == "critic":
            values = self.model(row)
            if not indices:
                return values.sum() * 0.0, {}
            mb = dict(mb, **{k: [t.to(values.device) for t in mb[k]] for k in PER_SAMPLE_TENSOR_KEYS if k in mb})
            return compute_rl_loss(args, mb, log_probs=None, entropy=None,
                                   values=list(values.split(row.response_lengths)))
        if not indices:  # this rank has no samples left for this micro-batch: a zero loss keeps collectives paired
            return self.model(row, self.temperature, return_logits=True).sum() * 0.0, {}
        if _arg(args, "loss_type", "policy_loss") == "custom_loss":
            path = _arg(args, "custom_loss_function_path", None)
            if not path:
                raise ValueError("--loss-type custom_loss needs --custom-loss-function-path")
            fn = load_function(path, flag="--custom-loss-function-path")
            logits = self.model(row, self.temperature, return_logits=True)
            reducer = get_sum_of_sample_mean(mb["total_lengths"], mb["response_lengths"],
                                             [m.to(logits.device) for m in mb["loss_masks"]],
                                             bool(_arg(args, "calculate_per_token_loss", False)))
            mb = dict(mb, unconcat_tokens=[torch.as_tensor(t, device=logits.device) for t in mb["tokens"]])
            loss, metrics = fn(args, mb, logits, reducer)
            return loss, dict(metrics)
        device = row.input_ids.device  # per-sample tensors go over before the forward, without a host sync
        to_dev = {k: samples_to_device(mb[k], device) for k in PER_SAMPLE_TENSOR_KEYS if k in mb and mb[k] is not None}
        mb = dict(mb, **to_dev)
        entropy_grad = float(_arg(args, "entropy_coef", 0.0)) != 0.0
        lp, ent = self.model(row, self.temperature, int(_arg(args, "log_probs_chunk_size", -1)), True,
                             entropy_grad=entropy_grad)
        if self._mismatch_sums is not None:
            self._add_mismatch(lp, mb, row)
        return compute_rl_loss(args, mb, log_probs=list(lp.split(row.response_lengths)),
                               entropy=list(ent.split(row.response_lengths)))

    def _train_step(self, batch: dict[str, Any]) -> dict[str, float]:
        args = self.args
        assert self.model is not None and self.optimizer is not None and self.scheduler is not None
        self.model.train()
        per_token = bool(_arg(args, "calculate_per_token_loss", False))
        local_count = sum(float(m.sum()) for m in batch["loss_masks"]) if per_token else float(len(batch["tokens"]))
        global_count = all_reduce_sums({"n": local_count}, self.device)["n"]
        scale = self.dp_size / max(global_count, 1.0)
        plan = self._plan(batch["total_lengths"], _arg(args, "max_tokens_per_gpu", None))
        sums: dict[str, Any] = defaultdict(float)  # detached tensors: one host sync per step, not per micro-batch
        extrema: dict[str, list[Any]] = defaultdict(list)
        reduce_once = bool(_arg(args, "fsdp_reduce_grads_per_step", False)) and isinstance(self.model, FSDPModule)
        try:
            for position, indices in enumerate(plan):
                mb = _select(batch, indices)
                row = self._row(batch, indices)
                if reduce_once:  # every rank runs the same number of micro-batches (empty ones included)
                    self._communicate_after_backward(position == len(plan) - 1)
                loss, metrics = self._loss_of_micro_batch(mb, indices, row)
                (loss * scale).backward()
                for key, value in metrics.items():
                    value = value.detach().float() if torch.is_tensor(value) else float(value)
                    if key in EXTREMUM_METRICS:
                        extrema[key].append(value)
                    else:
                        sums[key] = sums[key] + value
        finally:
            if reduce_once:
                self._communicate_after_backward(True)
        sums = _to_host_floats(sums)
        extrema = {k: [float(v) for v in vs] for k, vs in extrema.items()}
        keys = sorted(set().union(*self._gather_keys(sums)))
        totals = all_reduce_sums({k: sums.get(k, 0.0) for k in keys}, self.device)
        step_metrics = {k: v / max(global_count, 1.0) for k, v in totals.items()}
        step_metrics.update(self._reduce_extrema(extrema))

        grad_norm = self._clip_grad_norm()
        step_metrics["grad_norm"] = grad_norm
        step_metrics["lr"] = self.scheduler.get_lr()
        finite = math.isfinite(grad_norm) and math.isfinite(step_metrics.get("loss", 0.0))
        step_metrics["skipped_nan_steps"] = 0.0 if finite else 1.0
        if finite:
            self.optimizer.step()
            self.scheduler.step()
            self.weight_version += 1
            self.nan_steps_in_a_row = 0
        self.optimizer.zero_grad(set_to_none=True)
        if not finite:
            self._skip_nonfinite_step(grad_norm, step_metrics.get("loss"))
        return step_metrics

    def _communicate_after_backward(self, communicate: bool) -> None:
        """--fsdp-reduce-grads-per-step: before the step's last micro-batch, backward neither reduce-scatters the
        gradients (they accumulate unsharded) nor frees the gathered parameters (the next micro-batch's forward
        needs no all-gather); the last micro-batch does both, so the step ends sharded as usual."""
        self.model.set_requires_gradient_sync(communicate)
        self.model.set_reshard_after_backward(communicate)

    def _skip_nonfinite_step(self, grad_norm: float, loss: float | None) -> None:
        """The step was not applied (weights, optimizer state, LR schedule unchanged); too many in a row stop the run."""
        self.nan_steps_in_a_row += 1
        limit = int(_arg(self.args, "max_nan_steps", 3))
        message = (f"optimizer step skipped: non-finite loss {loss} / grad norm {grad_norm} "
                   f"({self.nan_steps_in_a_row} in a row; the run stops at --max-nan-steps {limit})")
        if self.rank == 0:
            logger.warning(message)
        if self.nan_steps_in_a_row >= limit:
            raise NonFiniteLossError(f"{self.nan_steps_in_a_row} optimizer steps in a row had a non-finite loss or "
                                     f"gradient (last: loss {loss}, grad norm {grad_norm}); stopping at "
                                     f"--max-nan-steps {limit}. Check rewards and data for NaN/Inf, or lower --lr.")

    def _gather_keys(self, sums: dict[str, float]) -> list[set[str]]:
        keys: list[Any] = [None] * self.dp_size
        dist.all_gather_object(keys, set(sums))
        return keys

    def _reduce_extrema(self, extrema: dict[str, list[float]]) -> dict[str, float]:
        out = {}
        for key in sorted(EXTREMUM_METRICS):
            mode = EXTREMUM_METRICS[key]
            local = (min if mode == "min" else max)(extrema[key]) if extrema.get(key) else (
                math.inf if mode == "min" else -math.inf)
            t = torch.tensor([local], dtype=torch.float64, device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MIN if mode == "min" else dist.ReduceOp.MAX)
            if math.isfinite(t.item()):
                out[key] = float(t.item())
        return out

    def _clip_grad_norm(self) -> float:
        params = [p for p in self.model.parameters() if p.requires_grad and p.grad is not None]
        clip = _arg(self.args, "clip_grad", 1.0)
        max_norm = float(clip) if clip and clip > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=self.device == "cuda")
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        return float(norm)

    # ----------------------------------------------------------------- checkpoints
    def save(self, rollout_id: int) -> None:
        """DCP checkpoint under --save/iter_XXXXXXX (and --save-hf when set). Collective."""
        save = self._role_dir(_arg(self.args, "save", None))
        if not save:
            raise ValueError("FSDPTrainer.save needs --save")
        self._check_onloaded()
        state = {"scheduler": self.scheduler.state_dict(), "weight_version": self.weight_version,
                 "rollout_id": rollout_id}
        save_optim = not _arg(self.args, "no_save_optim", False)
        if _arg(self.args, "async_save", False):
            self.finish_saving()  # one background write at a time; the previous one is committed first
            if self._save_group is None:
                self._save_group = dist.new_group(backend="gloo")  # the writer thread's own collectives
            self._pending_save = ckpt.begin_async_save(save, rollout_id, self.model, self.optimizer, state,
                                                       save_optim=save_optim, process_group=self._save_group)
        else:
            ckpt.save_checkpoint(save, rollout_id, self.model, self.optimizer, state, save_optim=save_optim)
        save_hf = _arg(self.args, "save_hf", None)
        if save_hf and self.role == "actor":
            self.save_hf(save_hf.format(rollout_id=rollout_id))

    def finish_saving(self) -> None:
        """--async-save: wait for the checkpoint being written and commit it (collective; a no-op without one)."""
        pending, self._pending_save = self._pending_save, None
        if pending is not None:
            ckpt.finish_save(pending)

    def _role_dir(self, root: str | None) -> str | None:
        """The critic keeps its checkpoints in a `critic/` sub-directory of --save / --load."""
        return str(Path(root) / "critic") if root and self.role == "critic" else root

    def save_hf(self, path: str) -> None:
        """A Hugging Face checkpoint (config, safetensors, tokenizer) that from_pretrained loads. Collective."""
        self._check_onloaded()
        ckpt.save_hf_checkpoint(path, self.model, self.model.hf, _arg(self.args, "hf_checkpoint", None),
                                name_map=hf_name)

    # ----------------------------------------------------------------- colocation
    def offload(self) -> None:
        if not self.offloaded:
            reshard_all(self.model)
            offload_to_cpu(self.model, self.optimizer)
            self.offloaded = True

    def onload(self) -> None:
        if self.offloaded:
            onload_to_device(self.model, self.optimizer, self.device)
            self.offloaded = False

    def _check_onloaded(self) -> None:
        if self.model is None:
            raise RuntimeError("FSDPTrainer.init() must run first")
        if self.offloaded and self.device != "cpu":
            raise RuntimeError("the trainer is offloaded; call onload() first")
        reshard_all(self.model)

    # ----------------------------------------------------------------- weight sync
    def export_weights(self, bucket_bytes: int | None = None) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """Buckets of (HF name, full tensor); every rank must consume the iterator to the end."""
        self._check_onloaded()
        size = int(bucket_bytes or _arg(self.args, "update_weight_buffer_size", 512 * 1024 ** 2))
        if self.role != "actor":
            raise ValueError("export_weights is for the actor (the engines serve the policy, not the critic)")
        dtype = torch.bfloat16 if self.device == "cuda" else None
        return iter_weight_buckets(self.model.hf, size, dtype=dtype)
