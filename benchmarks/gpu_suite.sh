#!/usr/bin/env bash
# bash benchmarks/gpu_suite.sh OUT_DIR [SECONDS]      # on a 4-GPU host, from the repository root
#
# Runs the GPU checks and benchmarks of issues 9 and 10 side by side on one 4-GPU machine, within SECONDS
# (default 540) of wall time, and leaves every JSON and log in OUT_DIR/results.tgz (plus a summary on stdout):
#   GPUs 0,1  tensor-parallel engine tests, engine_throughput tp=2 vs tp=1, server_overhead, weight_sync (IPC, NCCL, disk),
#             then rl_step --mode disaggregated (1 trainer + 1 engine, NCCL) from the SFT model job B made
#   GPU  2    vs_trl (slime colocated, then TRL GRPOTrainer) — its slime half is rl_step --mode colocated
#   GPU  3    train_throughput (4B, then 0.6B) on one GPU, eager vs per-layer compiled
# Each job runs in its own Ray instance (if any) and under a timeout that leaves time to pack the results.
# Ray, fastapi, uvicorn, trl, ... must be importable (the device tool carries them as wheels: see README).
set -u
OUT=${1:?usage: gpu_suite.sh OUT_DIR [SECONDS]}
BUDGET=${2:-540}
RES=/tmp/gpu_suite
mkdir -p "$OUT" "$RES"
START=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - START) - ${1:-0} )); }
export PYTHONUNBUFFERED=1 SLIME_PROGRESS=0 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# one job: NAME GPUS SECONDS_RESERVED_FOR_LATER COMMAND...
job() {
  local name=$1 gpus=$2 reserve=$3; shift 3
  local t; t=$(left "$reserve")
  if [ "$t" -le 20 ]; then echo "[suite] $name skipped (no time left)" | tee -a "$RES/suite.log"; return 0; fi
  echo "[suite] $name on GPUs $gpus, up to ${t}s: $*" | tee -a "$RES/suite.log"
  local s; s=$(date +%s)
  CUDA_VISIBLE_DEVICES=$gpus timeout -k 10 "$t" "$@" > "$RES/$name.log" 2>&1
  local rc=$?
  echo "[suite] $name rc=$rc in $(( $(date +%s) - s ))s" | tee -a "$RES/suite.log"
}
MODELS=/tmp/suite_models
mkdir -p $MODELS

(  # GPUs 0,1
  job tp_tests 0,1 330 python -m pytest -q -x tests/test_engine_tp_gpu.py tests/test_engine_core_gpu.py \
      tests/test_engine_gpu_kernels.py tests/test_fsdp_packed_attention.py
  job make_q06 0,1 330 python tools/make_tiny_model.py --preset qwen3-0.6b --output $MODELS/q06 --dtype bfloat16 --device cuda
  job engine_tp2 0,1 300 python benchmarks/engine_throughput.py --model $MODELS/q06 --tp-size 2 --hf-num-seqs 0 \
      --output $RES/engine_throughput_tp2.json
  job engine_tp1 0,1 270 python benchmarks/engine_throughput.py --model $MODELS/q06 --tp-size 1 --hf-num-seqs 0 \
      --output $RES/engine_throughput_tp1.json
  job server_overhead 0,1 200 python benchmarks/server_overhead.py --device cuda --model $MODELS/q06 --num-prompts 32 \
      --samples 8 --max-new-tokens 128 --via-router --out $RES/server_overhead.json
  job weight_sync 0,1 170 python benchmarks/weight_sync.py --presets qwen3-0.6b \
      --modes colocated,colocated_direct,disaggregated,disk --disk-reps 2 --engine-gpu 1 --model-dir $MODELS/ws \
      --out $RES/weight_sync_qwen3-0.6b.json
  for _ in $(seq 60); do [ -f /tmp/vs/slime/sft_model/config.json ] && break; sleep 5; done
  job rl_disagg 0,1 20 python benchmarks/rl_step.py --mode disaggregated --sft-model /tmp/vs/slime/sft_model \
      --workdir /tmp/rl2 --num-steps 8 --out $RES/rl_step_disaggregated.json
) &
(  # GPU 2
  job vs_trl 2 20 python benchmarks/vs_trl.py --workdir /tmp/vs --num-steps ${VS_TRL_STEPS:-16} \
      --out $RES/vs_trl.json --slime-out $RES/rl_step_colocated.json
) &
(  # GPU 3: the 4B shape first (the MFU target), then 0.6B with the HF-loop baseline
  job train_4b 3 200 python benchmarks/train_throughput.py --presets qwen3-4b --variants eager,layer --no-baseline \
      --model-dir $MODELS/train --out $RES/train_throughput_qwen3-4b_1gpu.json
  job train_06b 3 20 python benchmarks/train_throughput.py --presets qwen3-0.6b --variants eager,layer \
      --model-dir $MODELS/train --out $RES/train_throughput_qwen3-0.6b.json
) &
wait
nvidia-smi --query-gpu=name,memory.used --format=csv >> "$RES/suite.log" 2>&1
tar czf "$OUT/results.tgz" -C "$RES" . && cp "$RES/suite.log" "$OUT/suite.log"
for f in "$RES"/*.json; do echo "== $(basename "$f")"; head -c 1500 "$f"; echo; done
cat "$RES/suite.log"
