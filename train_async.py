"""One-step off-policy RL training: the rollout of step n+1 is generated while step n trains (disaggregated only).

    python train_async.py --hf-checkpoint DIR --prompt-data train.jsonl --rollout-batch-size 8 --num-rollout 10 \
        --actor-num-gpus-per-node 1 --rollout-num-gpus 1 ...

The loop (`slime.train_loop.run_async`):

    next_rollout = rollout_manager.generate(start)           # in flight
    for rollout_id in range(start, num_rollout):
        rollout_data = wait(next_rollout)
        next_rollout = rollout_manager.generate(rollout_id + 1)   # overlaps the training below
        trainer.train(rollout_id, rollout_data)
        save if due
        pause generation -> trainer.update_weights(engines) -> continue generation

--colocate is refused: engines and trainer cannot share GPUs while both run.
"""

from slime.train_loop import main_async

if __name__ == "__main__":
    main_async()
