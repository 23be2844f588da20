"""Cluster and resource flags: `python train.py --actor-num-gpus-per-node 1 --rollout-num-gpus 1 --colocate ...`."""

from __future__ import annotations

import argparse

from slime.utils.arguments.value_types import json_object


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("cluster and resources")
    group.add_argument("--actor-num-nodes", type=int, default=1, help="Nodes for the training actors.")
    group.add_argument("--actor-num-gpus-per-node", type=int, default=8,
                       help="Training ranks per node (GPUs; CPU processes on a host without GPUs).")
    group.add_argument("--critic-num-nodes", type=int, default=None,
                       help="PPO: nodes for the critic's own ranks (default --actor-num-nodes once "
                            "--critic-num-gpus-per-node is set). Unset, the critic shares the actor's GPUs.")
    group.add_argument("--critic-num-gpus-per-node", type=int, default=None,
                       help="PPO: critic ranks per node on GPUs of their own, so the critic trains while the actor "
                            "does (default --actor-num-gpus-per-node once --critic-num-nodes is set). Unset, one "
                            "critic rank shares each actor rank's GPU and the two train one after the other.")
    group.add_argument("--num-gpus-per-node", type=int, default=8,
                       help="GPUs per node used to place rollout engines; set it when a node has fewer than 8.")
    group.add_argument("--rollout-num-gpus", type=int, default=None,
                       help="GPUs for rollout engines. Under --colocate defaults to the actor GPU count; "
                            "0 starts the router only. Without --colocate it defaults to one engine's worth "
                            "(--rollout-num-gpus-per-engine).")
    group.add_argument("--rollout-num-gpus-per-engine", type=int, default=1,
                       help="GPUs of one engine (its tensor-parallel size).")
    group.add_argument("--colocate", action="store_true", default=False,
                       help="Trainer and engines share the same GPUs; turns on --offload-train/--offload-rollout "
                            "unless they are switched off explicitly.")
    group.add_argument("--offload", action="store_true", default=False,
                       help="Same as --offload-train --offload-rollout.")
    group.add_argument("--offload-train", action=argparse.BooleanOptionalAction, default=None,
                       help="Move trainer params/optimizer state to CPU during rollout (default: on under --colocate).")
    group.add_argument("--offload-rollout", action=argparse.BooleanOptionalAction, default=None,
                       help="Release engine KV cache and weights during training (default: on under --colocate).")
    group.add_argument("--train-backend", choices=["fsdp", "megatron"], default="fsdp",
                       help="Training backend.")
    group.add_argument("--rollout-backend", choices=["builtin", "sglang"], default="builtin",
                       help="Rollout engine: the built-in engine or an installed SGLang server.")
    group.add_argument("--train-env-vars", type=json_object, default="{}",
                       help='Extra environment variables for the train actors, as a JSON object, e.g. \'{"NCCL_DEBUG": "WARN"}\'.')
    group.add_argument("--distributed-backend", choices=["nccl", "gloo"], default=None,
                       help="torch.distributed backend for training (default: nccl on GPU, gloo on CPU).")
