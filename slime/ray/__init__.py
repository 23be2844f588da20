"""Ray orchestration: placement groups, the train actor group, the rollout manager (engines + router), weight sync.

    from slime.ray.placement import init_ray, create_placement
    from slime.ray.rollout_manager import create_rollout_manager
    from slime.ray.train_group import TrainGroup
"""
