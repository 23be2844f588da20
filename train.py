"""Synchronous RL training: rollout -> train -> weight sync, colocated or disaggregated, on GPUs or CPU processes.

    python train.py --hf-checkpoint DIR --prompt-data train.jsonl --input-key messages --label-key label \
        --apply-chat-template --rollout-batch-size 8 --n-samples-per-prompt 4 --num-rollout 10 \
        --actor-num-nodes 1 --actor-num-gpus-per-node 1 --colocate --rm-type math

The loop (`slime.train_loop.run`, DESIGN §3):

    start = trainer.init()                                   # honours --load
    for rollout_id in range(start, num_rollout):
        eval if due
        rollout_data = rollout_manager.generate(rollout_id)  # data source -> generate -> reward -> filter
        if colocated: engines.release_memory(); trainer.onload()
        trainer.train(rollout_id, rollout_data)              # split across ranks; log-probs, advantages, steps
        save if due                                          # trainer checkpoint + data-source state
        trainer.update_weights(engines) if due               # tensors / broadcast / disk; version checked
        if colocated: trainer.offload(); engines.resume_memory()
        log metrics                                          # stdout line, metrics.jsonl, tensorboard, wandb

Joins the Ray cluster named by RAY_ADDRESS (`ray job submit -- python train.py ...`), else starts a local one.
"""

from slime.train_loop import main

if __name__ == "__main__":
    main()
