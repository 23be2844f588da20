"""`from slime.rollout.filter_hub.base_types import DynamicFilterOutput` as in the original slime."""

from slime.rollout.filters import DynamicFilterOutput, call_dynamic_filter

__all__ = ["DynamicFilterOutput", "call_dynamic_filter"]
