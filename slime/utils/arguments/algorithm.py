"""Algorithm flags: `python train.py --advantage-estimator grpo --eps-clip 0.2 --use-kl-loss --kl-loss-coef 0.01 ...`."""

from __future__ import annotations

import argparse

# mirrors slime.algo.advantages.ADVANTAGE_ESTIMATORS (parsing flags does not import torch); a test keeps them equal
ADVANTAGE_ESTIMATORS = ["grpo", "gspo", "cispo", "reinforce_plus_plus", "reinforce_plus_plus_baseline", "ppo"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("algorithm")
    group.add_argument("--advantage-estimator", choices=ADVANTAGE_ESTIMATORS, default="grpo",
                       help="How advantages are computed; ppo trains a critic (value model) beside the actor and "
                            "uses GAE (--gamma, --lambd).")
    group.add_argument("--loss-type", choices=["policy_loss", "sft_loss", "custom_loss"], default="policy_loss",
                       help="custom_loss uses --custom-loss-function-path.")
    group.add_argument("--custom-loss-function-path", type=str, default=None,
                       help="module.attr of fn(args, batch, logits, sum_of_sample_mean) -> (loss, metrics).")
    group.add_argument("--eps-clip", type=float, default=0.2, help="PPO clip range (lower side).")
    group.add_argument("--eps-clip-high", type=float, default=None, help="PPO clip range, upper side (default: --eps-clip).")
    group.add_argument("--eps-clip-c", type=float, default=None, help="Dual-clip PPO lower bound; must be > 1.")
    group.add_argument("--value-clip", type=float, default=0.2, help="Clip range of the value loss.")
    group.add_argument("--kl-coef", type=float, default=0.0,
                       help="KL penalty folded into the reward (exclusive with --kl-loss-coef).")
    group.add_argument("--use-kl-loss", action="store_true", default=False, help="Add a KL loss against the reference model.")
    group.add_argument("--kl-loss-coef", type=float, default=0.0, help="Weight of the KL loss.")
    group.add_argument("--kl-loss-type", choices=["k1", "k2", "k3", "low_var_kl"], default="k1", help="KL estimator.")
    group.add_argument("--use-unbiased-kl", action="store_true", default=False,
                       help="Importance-weight the KL estimate by the current/old policy ratio.")
    group.add_argument("--ref-load", type=str, default=None, help="Checkpoint of the reference model (default: --hf-checkpoint).")
    group.add_argument("--ref-update-interval", type=int, default=None,
                       help="Copy the actor into the reference model after every N rollouts (the KL term then "
                            "anchors to a recent policy).")
    group.add_argument("--entropy-coef", type=float, default=0.0, help="Weight of the entropy bonus.")
    group.add_argument("--gamma", type=float, default=1.0, help="Discount (PPO / GAE).")
    group.add_argument("--lambd", type=float, default=1.0, help="GAE lambda.")
    group.add_argument("--normalize-advantages", action="store_true", default=False,
                       help="Whiten advantages over the batch.")
    group.add_argument("--disable-grpo-std-normalization", action="store_false", dest="grpo_std_normalization",
                       help="GRPO: subtract the group mean but do not divide by the std (Dr. GRPO).")
    group.add_argument("--disable-rewards-normalization", action="store_false", dest="rewards_normalization",
                       help="Use raw rewards (no group normalisation).")
    group.add_argument("--disable-compute-advantages-and-returns", action="store_false",
                       dest="compute_advantages_and_returns",
                       help="Skip advantage computation (SFT or custom losses).")
    group.add_argument("--custom-advantage-function-path", type=str, default=None,
                       help="module.attr of fn(args, rollout_data) that fills advantages and returns.")
    group.add_argument("--use-rollout-logprobs", action="store_true", default=False,
                       help="Use the engine's log-probs as the old policy instead of recomputing them.")
    group.add_argument("--recompute-old-log-probs", action="store_true", default=False,
                       help="Always run the separate old-policy log-prob forward. By default it is skipped when it "
                            "cannot change the update (one optimizer step per rollout, --kl-coef 0, no plugin "
                            "reading log-probs): the loss then takes its own forward's detached log-probs.")
    group.add_argument("--get-mismatch-metrics", action="store_true", default=False,
                       help="Log train/rollout log-prob mismatch metrics (needs rollout log-probs).")
    group.add_argument("--reset-optimizer-states", action="store_true", default=False,
                       help="Clear optimizer state after every rollout.")
    group.add_argument("--use-tis", action="store_true", default=False,
                       help="Truncated importance sampling between rollout and train log-probs.")
    group.add_argument("--tis-clip", type=float, default=2.0, help="Upper clip of TIS ratios.")
    group.add_argument("--tis-clip-low", type=float, default=0.0, help="Lower clip of TIS ratios.")
    group.add_argument("--custom-tis-function-path", type=str, default=None, help="module.attr of a custom TIS function.")
    group.add_argument("--custom-pg-loss-reducer-function-path", type=str, default=None,
                       help="module.attr of a reducer used for the policy-gradient loss only.")
    group.add_argument("--calculate-per-token-loss", action="store_true", default=False,
                       help="Average the loss over tokens of the batch instead of per sample.")
