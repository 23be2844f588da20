"""RL maths as pure tensor functions (torch only): advantages, KL, policy/value/SFT losses, reductions.

    python -c "import slime.algo as algo; print(algo.compute_approx_kl.__doc__)"

`slime.algo.rl_loss` is the only module that reads parsed args; nothing here imports a backend,
the engine or Ray.
"""

from slime.algo.advantages import (
    ADVANTAGE_ESTIMATORS,
    compute_advantages_and_returns,
    group_normalize_rewards_for,
    kl_penalty,
    normalize_advantages,
    normalize_group_rewards,
)
from slime.algo.kl import KL_TYPES, compute_approx_kl
from slime.algo.losses import (
    cispo_policy_loss,
    entropy_from_logits,
    gspo_policy_loss,
    policy_loss,
    ppo_policy_loss,
    sft_loss,
    value_loss,
    vanilla_tis,
)
from slime.algo.reduce import get_sum_of_sample_mean, sum_of_sample_mean
from slime.algo.rl_loss import (
    EXTREMUM_METRICS,
    compute_advantages_from_args,
    compute_rl_loss,
    normalize_rewards_from_args,
)

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "EXTREMUM_METRICS",
    "KL_TYPES",
    "cispo_policy_loss",
    "compute_advantages_and_returns",
    "compute_advantages_from_args",
    "compute_approx_kl",
    "compute_rl_loss",
    "entropy_from_logits",
    "get_sum_of_sample_mean",
    "group_normalize_rewards_for",
    "gspo_policy_loss",
    "kl_penalty",
    "normalize_advantages",
    "normalize_group_rewards",
    "normalize_rewards_from_args",
    "policy_loss",
    "ppo_policy_loss",
    "sft_loss",
    "sum_of_sample_mean",
    "value_loss",
    "vanilla_tis",
]
