"""slime training flags: `python train.py --use-dynamic-batch-size --max-tokens-per-gpu 4096 ...`.

Megatron-style hyper-parameters shared by every backend (--lr, --global-batch-size, ...) live in
`megatron.py`.
"""

from __future__ import annotations

import argparse

GRAD_REDUCE_DTYPE_NAMES = ("float32", "bfloat16")  # torch dtype names (slime.backends.fsdp.model maps them)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training")
    group.add_argument("--use-dynamic-batch-size", action="store_true", default=False,
                       help="Pack micro-batches to --max-tokens-per-gpu instead of --micro-batch-size samples.")
    group.add_argument("--max-tokens-per-gpu", type=int, default=None,
                       help="Token budget of one micro-batch per GPU under --use-dynamic-batch-size.")
    group.add_argument("--log-probs-max-tokens-per-gpu", type=int, default=None,
                       help="Token budget when computing log-probs (default: --max-tokens-per-gpu).")
    group.add_argument("--log-probs-chunk-size", type=int, default=-1,
                       help="Tokens per chunk when computing log-probs over the vocabulary (-1: no chunking).")
    group.add_argument("--balance-data", action="store_true", default=False,
                       help="Even out tokens across data-parallel ranks (may split a prompt's group across steps).")
    group.add_argument("--data-pad-size-multiplier", type=int, default=128,
                       help="Pad packed sequences to a multiple of this.")
    group.add_argument("--only-train-params-name-list", type=str, nargs="*", default=None,
                       help="Regexes (re.search) of parameter names to train; all others are frozen.")
    group.add_argument("--freeze-params-name-list", type=str, nargs="*", default=None,
                       help="Regexes (re.search) of parameter names to freeze; all others are trained.")
    group.add_argument("--fsdp-reshard-after-forward", choices=["auto", "true", "false"], default="auto",
                       help="Free each layer's gathered parameters after its forward (true: one more all-gather in "
                            "backward) or keep them until its backward (false: + the bf16 model per GPU). auto: "
                            "false on one GPU without --recompute-granularity full, true otherwise.")
    group.add_argument("--fsdp-reduce-grads-per-step", action="store_true", default=False,
                       help="Reduce-scatter gradients once per optimizer step instead of after every micro-batch; "
                            "holds an unsharded gradient (4 bytes per parameter in fp32) and the gathered bf16 "
                            "parameters between micro-batches, so only the step's first all-gather and last "
                            "reduce-scatter communicate.")
    group.add_argument("--fsdp-grad-reduce-dtype", choices=GRAD_REDUCE_DTYPE_NAMES, default="float32",
                       help="dtype of the gradient reduce-scatter on GPU (and of the unsharded accumulation under "
                            "--fsdp-reduce-grads-per-step): bfloat16 halves the bytes; the sharded gradients "
                            "and Adam stay fp32.")
    group.add_argument("--max-nan-steps", type=int, default=3,
                       help="Optimizer steps with a NaN/Inf loss or gradient are skipped and logged; the run stops "
                            "with an error after this many in a row.")
    group.add_argument("--num-critic-only-steps", type=int, default=0,
                       help="PPO: rollouts (ids 0..N-1) that train only the critic, so the actor starts from "
                            "trained values.")
    group.add_argument("--critic-lr", type=float, default=None,
                       help="PPO: the critic's learning rate (default --lr); its schedule follows the --lr-* flags.")
    group.add_argument("--custom-model-provider-path", type=str, default=None,
                       help="module.attr of provider(args, path, role) -> nn.Module: the HF-style model to train "
                            "instead of from_pretrained (slime/backends/fsdp/model.py: provided_model).")
