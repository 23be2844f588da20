"""`--dynamic-sampling-filter-path slime.rollout.filter_hub.dynamic_sampling_filters.check_reward_nonzero_std`."""

from slime.rollout.filters import check_reward_nonzero_std

__all__ = ["check_reward_nonzero_std"]
