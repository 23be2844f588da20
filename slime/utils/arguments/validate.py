"""Cross-flag rules and derived defaults, run by `parse_args` after parsing: `validate_and_derive(args)`.

Every rule raises ValueError with a message naming the flag(s); `parse_args` turns it into an
argparse error (exit code 2). NOT_SUPPORTED_YET / NOT_SUPPORTED_VALUES /
NOT_SUPPORTED_UNDER_FSDP list flags (values) whose feature is not built: remove an entry in the
same change that builds the feature.
"""

from __future__ import annotations

import argparse
import os
import string
from typing import Any

from slime.utils.arguments.eval_config import load_eval_config

# flag -> the only value accepted until the feature exists.
NOT_SUPPORTED_YET: dict[str, Any] = {
    "--train-backend": "fsdp",
    "--http-proxy": None,
    "--record-memory-history": False,
    "--memory-snapshot-dir": ".",
    "--fp16": False,
}

# flag -> values whose feature is not built (other values work).
NOT_SUPPORTED_VALUES: dict[str, list[Any]] = {}

# flag -> the only value accepted under --train-backend fsdp (these need the Megatron backend).
NOT_SUPPORTED_UNDER_FSDP: dict[str, Any] = {
    "--tensor-model-parallel-size": 1,
    "--pipeline-model-parallel-size": 1,
    "--context-parallel-size": 1,
    "--expert-model-parallel-size": 1,
    "--sequence-parallel": False,
}

# Flags whose dest is inverted (store_false): the flag's own name is mirrored as an attribute too.
INVERTED_FLAGS = {
    "disable_rollout_global_dataset": "rollout_global_dataset",
    "disable_grpo_std_normalization": "grpo_std_normalization",
    "disable_rewards_normalization": "rewards_normalization",
    "disable_compute_advantages_and_returns": "compute_advantages_and_returns",
    "disable_wandb_random_suffix": "wandb_random_suffix",
}


def _dest(flag: str) -> str:
    return flag[2:].replace("-", "_")


def check_not_supported(args: argparse.Namespace) -> None:
    registries = [(NOT_SUPPORTED_YET, "")]
    if args.train_backend == "fsdp":
        registries.append((NOT_SUPPORTED_UNDER_FSDP, " under --train-backend fsdp (needs the Megatron backend)"))
    for registry, where in registries:
        for flag, allowed in registry.items():
            value = getattr(args, _dest(flag))
            if value != allowed:
                raise ValueError(f"not supported yet: {flag}{where} (got {value!r}; only {allowed!r} works in this version)")
    for flag, values in NOT_SUPPORTED_VALUES.items():
        value = getattr(args, _dest(flag))
        if value in values:
            raise ValueError(f"not supported yet: {flag} {value}")


def validate_and_derive(args: argparse.Namespace) -> None:
    """Check every cross-flag rule and fill the derived defaults, in place."""
    check_not_supported(args)
    _derive_modes(args)
    _check_batch_sizes(args)
    _check_algorithm(args)
    _check_rollout(args)
    _check_paths(args)
    _derive_resources(args)
    _derive_global_batch(args)
    _derive_critic_placement(args)
    _derive_eval(args)
    _derive_misc(args)


def _derive_modes(args: argparse.Namespace) -> None:
    if args.load_debug_rollout_data is not None:
        args.debug_train_only = True
    if args.debug_rollout_only and args.debug_train_only:
        raise ValueError("--debug-rollout-only and --debug-train-only (or --load-debug-rollout-data) cannot be used together")
    _derive_debug_dumps(args)
    if args.use_pytorch_profiler and not 0 <= args.profile_step_start < args.profile_step_end:
        raise ValueError(f"--profile-step-start {args.profile_step_start} and --profile-step-end "
                         f"{args.profile_step_end}: need 0 <= start < end (rollout ids start <= id < end are traced)")


def _derive_debug_dumps(args: argparse.Namespace) -> None:
    """--dump-details DIR fills the two dump paths left unset; each path template may use only its fields."""
    if args.dump_details is not None:
        if args.save_debug_rollout_data is None:
            args.save_debug_rollout_data = os.path.join(args.dump_details, "rollout_data", "{rollout_id}.pt")
        if args.save_debug_train_data is None:
            args.save_debug_train_data = os.path.join(args.dump_details, "train_data", "{rollout_id}_{rank}.pt")
    for flag, fields in (("--save-debug-rollout-data", {"rollout_id"}), ("--load-debug-rollout-data", {"rollout_id"}),
                         ("--save-debug-train-data", {"rollout_id", "rank"})):
        template = getattr(args, _dest(flag))
        if template is None:
            continue
        try:
            used = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
        except ValueError as e:
            raise ValueError(f"{flag} {template!r}: {e}") from None
        if used - fields:
            raise ValueError(f"{flag} {template!r} may only use the fields {{{'}, {'.join(sorted(fields))}}} "
                             f"(got {sorted(used - fields)})")
        ranks = args.actor_num_nodes * args.actor_num_gpus_per_node
        if flag == "--save-debug-train-data" and "rank" not in used and ranks > 1:
            raise ValueError(f"{flag} {template!r} needs the {{rank}} field: {ranks} train ranks would overwrite "
                             f"each other's file")
    fraction = args.load_debug_rollout_data_subsample
    if fraction is not None:
        if args.load_debug_rollout_data is None:
            raise ValueError("--load-debug-rollout-data-subsample needs --load-debug-rollout-data")
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"--load-debug-rollout-data-subsample must be in (0, 1], got {fraction}")


def _check_batch_sizes(args: argparse.Namespace) -> None:
    if args.rollout_batch_size is None:
        if args.load_debug_rollout_data is None:
            raise ValueError("--rollout-batch-size is required (prompts per rollout step)")
    elif args.rollout_batch_size <= 0:
        raise ValueError(f"--rollout-batch-size must be > 0, got {args.rollout_batch_size}")
    if args.n_samples_per_prompt <= 0:
        raise ValueError(f"--n-samples-per-prompt must be > 0, got {args.n_samples_per_prompt}")
    if args.max_nan_steps < 1:
        raise ValueError(f"--max-nan-steps must be >= 1, got {args.max_nan_steps}")
    if args.over_sampling_batch_size is None:
        args.over_sampling_batch_size = args.rollout_batch_size
    elif args.rollout_batch_size is not None and args.over_sampling_batch_size < args.rollout_batch_size:
        raise ValueError(
            f"--over-sampling-batch-size {args.over_sampling_batch_size} must be >= "
            f"--rollout-batch-size {args.rollout_batch_size}"
        )
    if args.use_dynamic_batch_size and args.max_tokens_per_gpu is None:
        raise ValueError("--use-dynamic-batch-size needs --max-tokens-per-gpu")
    if args.max_tokens_per_gpu is not None and args.max_tokens_per_gpu <= 0:
        raise ValueError(f"--max-tokens-per-gpu must be > 0, got {args.max_tokens_per_gpu}")
    if args.log_probs_max_tokens_per_gpu is None:
        args.log_probs_max_tokens_per_gpu = args.max_tokens_per_gpu
    if args.micro_batch_size <= 0:
        raise ValueError(f"--micro-batch-size must be > 0, got {args.micro_batch_size}")
    positive = ["--rollout-num-gpus-per-engine"]
    if not args.debug_rollout_only:
        positive += ["--actor-num-nodes", "--actor-num-gpus-per-node"]
    _require_positive(args, positive)


def _require_positive(args: argparse.Namespace, flags: list[str]) -> None:
    for flag in flags:
        if getattr(args, _dest(flag)) <= 0:
            raise ValueError(f"{flag} must be > 0, got {getattr(args, _dest(flag))}")


def _check_algorithm(args: argparse.Namespace) -> None:
    if args.kl_coef != 0 and args.kl_loss_coef != 0:
        raise ValueError(
            f"--kl-coef {args.kl_coef} and --kl-loss-coef {args.kl_loss_coef} cannot both be non-zero: "
            "use --kl-coef (KL in the reward) or --use-kl-loss --kl-loss-coef (KL in the loss)"
        )
    if args.eps_clip_high is None:
        args.eps_clip_high = args.eps_clip
    if args.eps_clip_c is not None and args.eps_clip_c <= 1.0:
        raise ValueError(f"--eps-clip-c (dual-clip bound) must be > 1, got {args.eps_clip_c}")
    if args.only_train_params_name_list and args.freeze_params_name_list:
        raise ValueError("use only one of --only-train-params-name-list and --freeze-params-name-list")
    if args.loss_type == "custom_loss" and args.custom_loss_function_path is None:
        raise ValueError("--loss-type custom_loss needs --custom-loss-function-path")
    if args.advantage_estimator in ("reinforce_plus_plus", "reinforce_plus_plus_baseline") and not args.normalize_advantages:
        raise ValueError(f"--advantage-estimator {args.advantage_estimator} needs --normalize-advantages")
    if args.n_samples_per_prompt == 1:
        args.grpo_std_normalization = False
    args.use_critic = args.advantage_estimator == "ppo"
    if args.num_critic_only_steps < 0 or (args.num_critic_only_steps and not args.use_critic):
        raise ValueError(f"--num-critic-only-steps {args.num_critic_only_steps}: needs --advantage-estimator ppo "
                         f"and a count >= 0")
    if args.critic_lr is not None and (not args.use_critic or args.critic_lr <= 0):
        raise ValueError(f"--critic-lr {args.critic_lr}: needs --advantage-estimator ppo and a rate > 0")


def _check_rollout(args: argparse.Namespace) -> None:
    if args.rollout_temperature <= 0:
        raise ValueError(
            f"--rollout-temperature must be > 0, got {args.rollout_temperature} (0 is greedy decoding, not a policy to train)"
        )
    if args.eval_temperature is not None and args.eval_temperature <= 0:
        raise ValueError(f"--eval-temperature must be > 0, got {args.eval_temperature}")
    if args.rollout_max_context_len is not None:
        if args.rollout_max_prompt_len is None:
            args.rollout_max_prompt_len = args.rollout_max_context_len - 1
        elif args.rollout_max_prompt_len > args.rollout_max_context_len - 1:
            raise ValueError(
                f"--rollout-max-prompt-len {args.rollout_max_prompt_len} must be below "
                f"--rollout-max-context-len {args.rollout_max_context_len} (leave room for one response token)"
            )
    if args.eval_prompt_data is not None and len(args.eval_prompt_data) % 2 != 0:
        raise ValueError(
            f"--eval-prompt-data takes name/path pairs (e.g. aime aime.jsonl), got {len(args.eval_prompt_data)} values: "
            + " ".join(args.eval_prompt_data)
        )
    if args.eval_interval is not None and not args.eval_prompt_data and not args.eval_config:
        raise ValueError("--eval-interval needs --eval-prompt-data or --eval-config")
    if args.rm_type is not None and args.rm_type.removeprefix("boxed_") == "remote_rm" and args.rm_url is None:
        raise ValueError("--rm-type remote_rm needs --rm-url")


def _check_paths(args: argparse.Namespace) -> None:
    for name, value in args.train_env_vars.items():
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ValueError(f"--train-env-vars: the value of {name!r} must be a string or a number, got {value!r}")
    args.train_env_vars = {str(name): str(value) for name, value in args.train_env_vars.items()}
    if args.hf_checkpoint is not None and not os.path.isdir(args.hf_checkpoint):
        raise ValueError(f"--hf-checkpoint {args.hf_checkpoint} is not a directory")
    if args.save_interval is not None and args.save is None:
        raise ValueError("--save-interval needs --save")
    if args.update_weight_transport == "disk" and args.update_weight_disk_dir is None:
        raise ValueError("--update-weight-transport disk needs --update-weight-disk-dir (a folder trainer and engines share)")


def _derive_resources(args: argparse.Namespace) -> None:
    if args.offload:
        args.offload_train = True
        args.offload_rollout = True
    if args.offload_train is None:
        args.offload_train = bool(args.colocate)
    if args.offload_rollout is None:
        args.offload_rollout = bool(args.colocate)
    if args.debug_rollout_only:
        args.offload_train = False
    args.rollout_external = args.rollout_external_engine_addrs is not None
    if args.rollout_num_gpus is None:
        if args.rollout_external:
            args.rollout_num_gpus = 0
        elif args.colocate:
            args.rollout_num_gpus = args.actor_num_nodes * args.actor_num_gpus_per_node
        else:
            args.rollout_num_gpus = args.rollout_num_gpus_per_engine
    if args.rollout_num_gpus < 0:
        raise ValueError(f"--rollout-num-gpus must be >= 0, got {args.rollout_num_gpus}")
    if args.rollout_num_gpus % args.rollout_num_gpus_per_engine != 0:
        raise ValueError(
            f"--rollout-num-gpus {args.rollout_num_gpus} is not a multiple of "
            f"--rollout-num-gpus-per-engine {args.rollout_num_gpus_per_engine}"
        )
    args.rollout_engine_count = args.rollout_num_gpus // args.rollout_num_gpus_per_engine
    args.dp_size = args.actor_num_nodes * args.actor_num_gpus_per_node
    args.device = _device()
    if args.distributed_backend is None:
        args.distributed_backend = "nccl" if args.device == "cuda" else "gloo"


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _derive_global_batch(args: argparse.Namespace) -> None:
    if args.rollout_batch_size is None:
        return
    samples = args.rollout_batch_size * args.n_samples_per_prompt
    if args.num_steps_per_rollout is not None:
        steps = args.num_steps_per_rollout
        if steps <= 0 or samples % steps != 0:
            raise ValueError(
                f"--num-steps-per-rollout {steps} must divide --rollout-batch-size {args.rollout_batch_size} * "
                f"--n-samples-per-prompt {args.n_samples_per_prompt} = {samples}"
            )
        if args.global_batch_size is not None and args.global_batch_size != samples // steps:
            raise ValueError(
                f"--global-batch-size {args.global_batch_size} disagrees with --num-steps-per-rollout {steps} "
                f"({samples} samples per rollout / {steps} steps = {samples // steps}); give only one of them"
            )
        args.global_batch_size = samples // steps
    elif args.global_batch_size is None:
        args.global_batch_size = samples
    if args.global_batch_size <= 0:
        raise ValueError(f"--global-batch-size must be > 0, got {args.global_batch_size}")
    if samples % args.global_batch_size != 0:
        raise ValueError(
            f"--global-batch-size {args.global_batch_size} must divide the samples of one rollout: "
            f"--rollout-batch-size {args.rollout_batch_size} * --n-samples-per-prompt {args.n_samples_per_prompt} = {samples}"
        )
    if not args.debug_rollout_only and args.dp_size > 0 and args.global_batch_size % args.dp_size != 0:
        raise ValueError(
            f"--global-batch-size {args.global_batch_size} is not divisible by the data-parallel size {args.dp_size} "
            f"(--actor-num-nodes {args.actor_num_nodes} * --actor-num-gpus-per-node {args.actor_num_gpus_per_node})"
        )


def _derive_critic_placement(args: argparse.Namespace) -> None:
    """args.critic_num_ranks: the critic's own ranks (0: it shares the actor's GPUs, one rank per actor rank)."""
    args.critic_num_ranks = 0
    if args.critic_num_nodes is None and args.critic_num_gpus_per_node is None:
        return
    if not args.use_critic:
        raise ValueError("--critic-num-nodes / --critic-num-gpus-per-node place the PPO critic: they need "
                         "--advantage-estimator ppo")
    if args.critic_num_nodes is None:
        args.critic_num_nodes = args.actor_num_nodes
    if args.critic_num_gpus_per_node is None:
        args.critic_num_gpus_per_node = args.actor_num_gpus_per_node
    _require_positive(args, ["--critic-num-nodes", "--critic-num-gpus-per-node"])
    args.critic_num_ranks = args.critic_num_nodes * args.critic_num_gpus_per_node
    if args.global_batch_size % args.critic_num_ranks != 0:
        raise ValueError(
            f"--global-batch-size {args.global_batch_size} is not divisible by the critic's ranks "
            f"{args.critic_num_ranks} (--critic-num-nodes {args.critic_num_nodes} * --critic-num-gpus-per-node "
            f"{args.critic_num_gpus_per_node})")


def _derive_eval(args: argparse.Namespace) -> None:
    for eval_name, rollout_name in [
        ("eval_temperature", "rollout_temperature"),
        ("eval_top_p", "rollout_top_p"),
        ("eval_top_k", "rollout_top_k"),
        ("eval_max_response_len", "rollout_max_response_len"),
        ("eval_max_prompt_len", "rollout_max_prompt_len"),
        ("eval_max_context_len", "rollout_max_context_len"),
        ("eval_input_key", "input_key"),
        ("eval_label_key", "label_key"),
        ("eval_tool_key", "tool_key"),
        ("eval_reward_key", "reward_key"),
        ("eval_function_path", "rollout_function_path"),
    ]:
        if getattr(args, eval_name) is None:
            setattr(args, eval_name, getattr(args, rollout_name))
    pairs = args.eval_prompt_data or []
    configured = load_eval_config(args.eval_config) if args.eval_config else []
    args.eval_datasets = configured + [{"name": pairs[i], "path": pairs[i + 1]} for i in range(0, len(pairs), 2)]
    names = [d["name"] for d in args.eval_datasets]
    if len(set(names)) != len(names):
        raise ValueError(f"eval dataset names must be unique across --eval-config and --eval-prompt-data: {names}")


def _derive_misc(args: argparse.Namespace) -> None:
    for flag_dest, inverted_dest in INVERTED_FLAGS.items():
        setattr(args, flag_dest, not getattr(args, inverted_dest))
