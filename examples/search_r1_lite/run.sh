#!/usr/bin/env bash
# Search-R1-lite on CPU: GRPO with multi-turn BM25 search (tool tokens masked out of the loss), tiny model.
#   bash examples/search_r1_lite/run.sh [OUTPUT_DIR] [more train.py flags, e.g. --num-rollout 10]
# Uses MODEL_DIR if set, else makes a tiny Qwen3 checkpoint in OUTPUT_DIR/model.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT="${1:-outputs/search_r1_lite}"
shift || true
MODEL_DIR="${MODEL_DIR:-$OUT/model}"
if [ ! -f "$MODEL_DIR/config.json" ]; then
  python tools/make_tiny_model.py --preset "${PRESET:-tiny}" --output "$MODEL_DIR"
fi
export PYTHONPATH="$PWD/examples/search_r1_lite${PYTHONPATH:+:$PYTHONPATH}"
exec python train.py \
  --hf-checkpoint "$MODEL_DIR" \
  --actor-num-nodes 1 --actor-num-gpus-per-node 1 --colocate \
  --prompt-data examples/search_r1_lite/train.jsonl --input-key question --label-key label \
  --custom-generate-function-path generate_with_search.generate \
  --custom-rm-path generate_with_search.reward_func \
  --rollout-batch-size 4 --n-samples-per-prompt 4 --num-rollout "${NUM_ROLLOUT:-3}" \
  --rollout-max-response-len 96 --rollout-temperature 1.0 \
  --advantage-estimator grpo --lr 1e-4 --clip-grad 1.0 \
  --use-dynamic-batch-size --max-tokens-per-gpu 8192 \
  --metrics-dir "$OUT" \
  "$@"
