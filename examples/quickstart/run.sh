#!/usr/bin/env bash
# CPU quickstart: a ~1M-parameter model learns arithmetic by SFT, then GRPO with the built-in engine (colocated).
#   bash examples/quickstart/run.sh [OUTPUT_DIR] [more `slime quickstart` flags, e.g. --num-rollout 10]
# Writes OUTPUT_DIR/summary.json (accuracy_after_sft, accuracy_after_rl, wall_seconds), metrics.jsonl, reward_curve.png.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT="${1:-outputs/quickstart}"
shift || true
exec python -m slime.quickstart --output "$OUT" "$@"
