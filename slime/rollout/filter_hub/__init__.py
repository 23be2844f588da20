"""Original slime's module path for dynamic sampling filters; the code lives in `slime.rollout.filters`."""
