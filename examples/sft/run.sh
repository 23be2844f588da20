#!/usr/bin/env bash
# SFT on the shipped chat conversations (no engine): the loss covers assistant turns only.
#   bash examples/sft/run.sh [OUTPUT_DIR] [more train.py flags, e.g. --loss-mask-type qwen3]
# Uses MODEL_DIR if set, else makes a small Qwen3 checkpoint in OUTPUT_DIR/model.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT="${1:-outputs/sft}"
shift || true
MODEL_DIR="${MODEL_DIR:-$OUT/model}"
if [ ! -f "$MODEL_DIR/config.json" ]; then
  python tools/make_tiny_model.py --preset "${PRESET:-small}" --output "$MODEL_DIR"
fi
exec python train.py \
  --hf-checkpoint "$MODEL_DIR" \
  --actor-num-nodes 1 --actor-num-gpus-per-node 1 \
  --prompt-data examples/sft/conversations.jsonl --input-key messages \
  --rollout-function-path slime.rollout.sft_rollout.generate_rollout \
  --loss-type sft_loss --loss-mask-type "${LOSS_MASK_TYPE:-qwen}" \
  --rollout-batch-size 8 --rollout-shuffle --num-rollout "${NUM_ROLLOUT:-6}" \
  --lr 1e-3 --clip-grad 1.0 \
  --use-dynamic-batch-size --max-tokens-per-gpu 8192 \
  --metrics-dir "$OUT" \
  "$@"
