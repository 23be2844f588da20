"""Megatron's own flags: `python train.py --lr 1e-6 --global-batch-size 64 --num-layers 28 --hidden-size 1024 ...`.

Training hyper-parameters are used by every backend. Parallel sizes above 1 need the Megatron
backend. Model-architecture flags are checked against the HF config of --hf-checkpoint under
--train-backend fsdp (hf_config_check.py). The flags in NO_OP_FLAGS and any other `--moe-*` flag
are accepted so that Megatron launch scripts run, and have no effect under fsdp.
"""

from __future__ import annotations

import argparse
from typing import Any

# Megatron flags that launch scripts pass and the fsdp backend does not use: name -> type or "flag".
NO_OP_FLAGS: dict[str, Any] = {
    "use-distributed-optimizer": "flag",
    "attention-dropout": float,
    "hidden-dropout": float,
    "accumulate-allreduce-grads-in-fp32": "flag",
    "attention-softmax-in-fp32": "flag",
    "attention-backend": str,
    "position-embedding-type": str,
    "use-rotary-position-embeddings": "flag",
    "rotary-percent": float,
    "rotary-seq-len-interpolation-factor": float,
    "use-rope-scaling": "flag",
    "rope-scaling-factor": float,
    "make-vocab-size-divisible-by": int,
    "padded-vocab-size": int,
    "seq-length": int,
    "init-method-std": float,
    "apply-layernorm-1p": "flag",
    "transformer-impl": str,
    "use-flash-attn": "flag",
    "no-gradient-accumulation-fusion": "flag",
    "no-masked-softmax-fusion": "flag",
    "no-bias-gelu-fusion": "flag",
    "no-bias-swiglu-fusion": "flag",
    "no-bias-dropout-fusion": "flag",
    "no-rope-fusion": "flag",
    "no-persist-layer-norm": "flag",
    "cross-entropy-loss-fusion": "flag",
    "cross-entropy-fusion-impl": str,
    "overlap-grad-reduce": "flag",
    "overlap-param-gather": "flag",
    "optimizer-cpu-offload": "flag",
    "overlap-cpu-optimizer-d2h-h2d": "flag",
    "use-precision-aware-optimizer": "flag",
    "main-grads-dtype": str,
    "main-params-dtype": str,
    "exp-avg-dtype": str,
    "exp-avg-sq-dtype": str,
    "ckpt-format": str,
    "megatron-to-hf-mode": str,
    "no-check-for-nan-in-loss-and-grad": "flag",
    "use-checkpoint-opt_param-scheduler": "flag",
    "tokenizer-type": str,
    "tokenizer-model": str,
    "log-interval": int,
    "log-throughput": "flag",
    "log-params-norm": "flag",
    "log-num-zeros-in-grad": "flag",
    "timing-log-level": int,
    "eval-iters": int,
    "train-iters": int,
    "lr-decay-iters": int,
    "lr-warmup-init": float,
    "expert-tensor-parallel-size": int,
    "virtual-pipeline-model-parallel-size": int,
    "decoder-first-pipeline-num-layers": int,
    "decoder-last-pipeline-num-layers": int,
    "account-for-embedding-in-pipeline-split": "flag",
    "account-for-loss-in-pipeline-split": "flag",
    "q-lora-rank": int,
    "kv-lora-rank": int,
    "qk-head-dim": int,
    "qk-pos-emb-head-dim": int,
    "v-head-dim": int,
    "multi-latent-attention": "flag",
    "mtp-num-layers": int,
    "enable-mtp-training": "flag",
}

# `--<prefix>...` flags outside the tables above that are accepted and ignored under fsdp.
NO_OP_PREFIXES = ("--moe-",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _add_training(parser)
    _add_parallelism(parser)
    _add_architecture(parser)
    _add_no_ops(parser)


def _add_training(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training hyper-parameters (Megatron names, every backend)")
    group.add_argument("--micro-batch-size", type=int, default=1,
                       help="Samples per micro-batch (ignored under --use-dynamic-batch-size).")
    group.add_argument("--global-batch-size", type=int, default=None,
                       help="Samples per optimizer step over all data-parallel ranks "
                            "(default: rollout-batch-size * n-samples-per-prompt, one step per rollout).")
    group.add_argument("--lr", type=float, default=1e-6, help="Peak learning rate.")
    group.add_argument("--min-lr", type=float, default=0.0, help="Learning rate at the end of decay.")
    group.add_argument("--lr-decay-style", choices=["constant", "linear", "cosine", "inverse-square-root", "WSD"],
                       default="linear", help="Learning-rate decay schedule.")
    group.add_argument("--lr-warmup-iters", type=int, default=0, help="Warm-up optimizer steps.")
    group.add_argument("--lr-warmup-fraction", type=float, default=None,
                       help="Warm-up as a fraction of the decay steps (overrides --lr-warmup-iters).")
    group.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay.")
    group.add_argument("--adam-beta1", type=float, default=0.9, help="Adam beta1.")
    group.add_argument("--adam-beta2", type=float, default=0.999, help="Adam beta2.")
    group.add_argument("--adam-eps", type=float, default=1e-8, help="Adam epsilon.")
    group.add_argument("--optimizer", choices=["adam", "sgd"], default="adam", help="Optimizer (adam is AdamW).")
    group.add_argument("--clip-grad", type=float, default=1.0, help="Max global gradient norm (0: no clipping).")
    group.add_argument("--seed", type=int, default=1234, help="Training seed.")
    group.add_argument("--bf16", action="store_true", default=False, help="bf16 mixed precision (GPU).")
    group.add_argument("--fp16", action="store_true", default=False, help="fp16 mixed precision (not supported yet).")
    group.add_argument("--recompute-granularity", choices=["full", "selective"], default=None,
                       help="Activation checkpointing (fsdp: any value checkpoints every decoder layer).")
    group.add_argument("--recompute-method", choices=["uniform", "block"], default=None,
                       help="Megatron recompute method (no effect under fsdp).")
    group.add_argument("--recompute-num-layers", type=int, default=None,
                       help="Megatron recompute layers (no effect under fsdp).")
    group.add_argument("--distributed-timeout-minutes", type=int, default=10, help="torch.distributed timeout.")


def _add_parallelism(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model parallelism (Megatron backend only; must be 1 under fsdp)")
    group.add_argument("--tensor-model-parallel-size", type=int, default=1, help="Tensor-parallel size.")
    group.add_argument("--pipeline-model-parallel-size", type=int, default=1, help="Pipeline-parallel size.")
    group.add_argument("--context-parallel-size", type=int, default=1, help="Context-parallel size.")
    group.add_argument("--expert-model-parallel-size", type=int, default=1, help="Expert-parallel size.")
    group.add_argument("--sequence-parallel", action="store_true", default=False, help="Megatron sequence parallelism.")


def _add_architecture(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "model architecture (Megatron names; checked against --hf-checkpoint's config.json under fsdp)")
    group.add_argument("--num-layers", type=int, default=None, help="HF num_hidden_layers.")
    group.add_argument("--hidden-size", type=int, default=None, help="HF hidden_size.")
    group.add_argument("--ffn-hidden-size", type=int, default=None, help="HF intermediate_size.")
    group.add_argument("--num-attention-heads", type=int, default=None, help="HF num_attention_heads.")
    group.add_argument("--group-query-attention", action="store_true", default=False,
                       help="Use --num-query-groups KV heads.")
    group.add_argument("--num-query-groups", type=int, default=None, help="HF num_key_value_heads.")
    group.add_argument("--kv-channels", type=int, default=None, help="HF head_dim.")
    group.add_argument("--vocab-size", type=int, default=None,
                       help="HF vocab_size (Megatron may pad it: a larger value is accepted).")
    group.add_argument("--max-position-embeddings", type=int, default=None, help="HF max_position_embeddings.")
    group.add_argument("--rotary-base", type=float, default=None, help="HF rope_theta.")
    group.add_argument("--normalization", choices=["LayerNorm", "RMSNorm"], default=None,
                       help="RMSNorm for Qwen/Llama models.")
    group.add_argument("--norm-epsilon", type=float, default=None, help="HF rms_norm_eps.")
    group.add_argument("--swiglu", action="store_true", default=False, help="Gated SiLU MLP (HF hidden_act silu).")
    group.add_argument("--untie-embeddings-and-output-weights", action="store_true", default=False,
                       help="Separate output layer (HF tie_word_embeddings false).")
    group.add_argument("--disable-bias-linear", action="store_true", default=False, help="No biases in linear layers.")
    group.add_argument("--add-qkv-bias", action="store_true", default=False,
                       help="Biases on q/k/v projections (HF attention_bias; implied by qwen2).")
    group.add_argument("--qk-layernorm", action="store_true", default=False, help="RMSNorm on q and k (qwen3).")
    group.add_argument("--num-experts", type=int, default=None, help="HF num_experts (MoE).")
    group.add_argument("--moe-router-topk", type=int, default=None, help="HF num_experts_per_tok (MoE).")
    group.add_argument("--moe-ffn-hidden-size", type=int, default=None, help="HF moe_intermediate_size (MoE).")


def _add_no_ops(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "other Megatron flags (accepted so launch scripts run; no effect under fsdp; any --moe-* flag too)")
    for name, kind in NO_OP_FLAGS.items():
        if kind == "flag":
            group.add_argument("--" + name, action="store_true", default=False, help=argparse.SUPPRESS)
        else:
            group.add_argument("--" + name, type=kind, default=None, help=argparse.SUPPRESS)
    group.description = "Accepted: " + ", ".join("--" + name for name in NO_OP_FLAGS) + ", --moe-*."
