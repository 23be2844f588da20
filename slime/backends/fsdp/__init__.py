"""The FSDP2 training backend (default `--train-backend fsdp`).

    from slime.backends.fsdp.trainer import FSDPTrainer

trainer.py (FSDPTrainer ties it together) · model.py (HF load, freezing, fully_shard, rank-0 broadcast)
· log_probs.py (chunked log-prob/entropy) · batching.py (steps, micro-batches, packing, shard split)
· optimizer.py (AdamW + LR schedule) · ref_model.py (reference weights on CPU, swapped in)
· checkpoint.py (DCP save/load, --save-hf) · weight_export.py (bucketed full tensors) · offload.py
· distributed.py (process group, mesh, scalar collectives).
"""
