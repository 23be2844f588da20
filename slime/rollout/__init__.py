"""Rollout: generate, score and filter samples for the trainer; every stage is a plugin path.

    python train.py --rollout-function-path slime.rollout.sglang_rollout.generate_rollout ...   # the default

| module | job |
|---|---|
| `sglang_rollout` | default rollout function: over-sampling, dynamic filter, abort, partial rollout |
| `generate` | default generate function (one SGLang `/generate` call per turn) |
| `rewarding`, `rm_hub/` | rewards (`--rm-type`, `--custom-rm-path`, `--group-rm`); failures become FAILED samples |
| `filters`, `filter_hub/` | dynamic sampling filters |
| `sample_hooks`, `log_hooks` | `--rollout-sample-hook-path`, custom rollout log functions |
| `eval` | evaluation rollout: per-dataset mean reward and pass@k |
| `sft_rollout`, `mask_utils` | SFT: chat conversations to tokens + assistant-only loss mask |
| `train_data` | samples -> the trainer's dict (reward post-processing, custom conversion) |
| `base_types`, `errors`, `metrics`, `tokenization`, `async_runner` | shared pieces of the above |
"""
