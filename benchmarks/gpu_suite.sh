#!/usr/bin/env bash
# bash benchmarks/gpu_suite.sh OUT_DIR PART [SECONDS]    # PART 1|2|3 on a 2-GPU host; 4, A, B, C, D on a 4-GPU host
#
# The GPU checks and benchmarks of issues 9 and 10 as three calls of a 2-GPU machine and one of a 4-GPU one, or
# two calls (A, B) of a 4-GPU one; C and D re-run the checks that failed in the first 4xH200 pass (2026-11-26),
# each within SECONDS (default 540) of wall time; every JSON and log ends up in OUT_DIR/results_PART.tgz, a summary
# on stdout. Each part stands alone (a machine's /tmp does not outlive it).
#   PART 1  GPU 0     vs_trl: slime colocated (rl_step, per-layer compiled training, 8k-token micro-batches,
#                     chunked log-probs: FAST_ARGS) then TRL's GRPOTrainer, same SFT-warmed model, same GPU
#           GPU 1     loss_overhead (RL loss kernels: reductions vs a per-sample loop), server_overhead
#                     (per-sample and grouped /generate, 0.6B, the rollout's shape), weight_sync
#                     4B colocated (CUDA IPC)
#   PART 2  GPUs 0,1  tensor-parallel engine tests (tp=2 vs tp=1, 0.6B shape) and the GPU engine tests, engine
#                     throughput with --tp-size 2, weight_sync 0.6B and 4B disaggregated (NCCL, flattened
#                     buckets vs one broadcast per tensor)
#   PART 3  GPUs 0,1  rl_step --mode disaggregated (1 trainer + 1 engine, NCCL), then train_throughput 4B with
#                     FSDP over 2 GPUs (eager vs per-layer compiled)
#   PART 4  (4 GPUs)  train_throughput 4B FSDP over 4 GPUs (eager vs per-layer compiled), rl_step --mode fsdp4
#   PART A  (4 GPUs)  parts 1 and 2 side by side (GPU 0, GPU 1, GPUs 2,3), then rl_step --mode disaggregated on 1,2
#   PART B  (4 GPUs)  part 4, then (B_DISAGG=1) the disaggregated step on 0,1 beside part 3's training on 2,3
#   PART C  (4 GPUs)  parts 1 and 2 without vs_trl and loss_overhead, in about 300 s
#   PART D  (4 GPUs)  vs_trl (GPU 0), server_overhead without and with --enable-overlap-schedule (GPU 1), the
#                     tensor-parallel tests and throughput (GPUs 2,3)
# Jobs run under timeouts that leave time to pack the results; each Ray user starts its own instance.
# Ray, fastapi, uvicorn, trl, ... must be importable (docs/gpu_runs.md: how to carry them as wheels).
set -u
OUT=${1:?usage: gpu_suite.sh OUT_DIR PART [SECONDS]}
PART=${2:?usage: gpu_suite.sh OUT_DIR PART [SECONDS]}
BUDGET=${3:-540}
RES=/tmp/gpu_suite_$PART
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

FAST_ARGS=${FAST_ARGS:---max-tokens-per-gpu 8192 --extra-args=--log-probs-chunk-size=4096}
# the lanes below take their GPUs as arguments, so one host of 4 GPUs runs the lanes of parts 1 and 2 side by side
vs_trl_lane() {  # GPU
  SLIME_FSDP_COMPILE=${FAST_COMPILE:-layer} job vs_trl "$1" 20 python benchmarks/vs_trl.py --workdir /tmp/vs \
      --num-steps "${VS_TRL_STEPS:-16}" --trl-max-seconds "${TRL_MAX_SECONDS:-120}" --rl-step-args "$FAST_ARGS" \
      --out $RES/vs_trl.json --slime-out $RES/rl_step_colocated_fast.json
}
q06() {  # NAME [--device cuda]: a random-weight bf16 checkpoint of Qwen3-0.6B's shape in $MODELS/NAME
  python tools/make_tiny_model.py --preset qwen3-0.6b --output "$MODELS/$1" --dtype bfloat16 "${@:2}" \
      > "$RES/make_$1.log" 2>&1
}
server_overhead() {  # NAME GPU RESERVE [FLAGS]: host overhead per engine step of the rollout's request shape
  local name=$1 gpu=$2 reserve=$3; shift 3
  job "$name" "$gpu" "$reserve" python benchmarks/server_overhead.py --device cuda --model $MODELS/q06_1 \
      --num-prompts 32 --samples 8 --max-new-tokens 128 --mem-fraction-static 0.3 "$@" --out "$RES/$name.json"
}
weight_sync_ipc() {  # GPU RESERVE
  job weight_sync_ipc "$1" "$2" python benchmarks/weight_sync.py --presets qwen3-0.6b,qwen3-4b \
      --modes colocated,colocated_direct --trainer-gpu 0 --engine-gpu 0 --model-dir $MODELS/ws1 \
      --out $RES/weight_sync_ipc.json
}
one_gpu_lane() {  # GPU
  job loss_overhead "$1" 400 python benchmarks/loss_overhead.py --device cuda --out $RES/loss_overhead.json
  q06 q06_1
  server_overhead server_overhead "$1" 300 --profile
  server_overhead server_overhead_grouped "$1" 300 --grouped --profile
  weight_sync_ipc "$1" 20
}
tp_lane() {  # GPU,GPU RESERVE
  job gpu_tests "$1" "${AFTER_TESTS:-400}" python -m pytest -v -o faulthandler_timeout=100 \
      tests/test_engine_tp_gpu.py tests/test_engine_gpu.py tests/test_fsdp_packed_attention.py
  q06 q06 --device cuda
  job engine_tp2 "$1" $(( 120 + $2 )) python benchmarks/engine_throughput.py --model $MODELS/q06 --tp-size 2 \
      --hf-num-seqs 0 --output $RES/engine_throughput_tp2.json
  job weight_sync "$1" $(( 20 + $2 )) python benchmarks/weight_sync.py --presets qwen3-0.6b,qwen3-4b \
      --modes disaggregated,disaggregated_direct --engine-gpu 1 --model-dir $MODELS/ws --out $RES/weight_sync_nccl.json
}
rl_disagg() {  # GPU,GPU RESERVE
  job rl_disagg "$1" "$2" python benchmarks/rl_step.py --mode disaggregated --workdir /tmp/rl2 \
      --num-steps "${RL_STEPS:-8}" --out $RES/rl_step_disaggregated.json
}
train_4b() {  # GPUS N RESERVE
  job "train_4b_x$2" "$1" "$3" python benchmarks/train_throughput.py --presets qwen3-4b --num-gpus "$2" \
      --variants eager,layer --no-baseline --model-dir $MODELS/train$2 --out "$RES/train_throughput_qwen3-4b_$2gpu.json"
}
rl_fsdp4() {  # RESERVE
  job rl_fsdp4 0,1,2,3 "$1" python benchmarks/rl_step.py --mode fsdp4 --workdir /tmp/rl4 --num-steps "${RL_STEPS:-8}" \
      --sft-steps 60 --out $RES/rl_step_fsdp4.json
}
case "$PART" in
  1) vs_trl_lane 0 & one_gpu_lane 1 & wait ;;
  2) AFTER_TESTS=${AFTER_TESTS:-400} tp_lane 0,1 0 ;;
  3) rl_disagg 0,1 200; train_4b 0,1 2 20 ;;
  4) train_4b 0,1,2,3 4 200; rl_fsdp4 20 ;;
  A) vs_trl_lane 0 &  # parts 1 and 2 side by side, then the disaggregated RL step on the two GPUs free first
     one_gpu_lane 1 & lane1=$!
     AFTER_TESTS=${AFTER_TESTS:-380} tp_lane 2,3 200 & lane23=$!
     wait $lane1 $lane23; rl_disagg 1,2 20; wait ;;
  C) (  # parts 1 and 2 without vs_trl and loss_overhead, in about 300 s
       q06 q06_1
       server_overhead server_overhead_grouped 0 60 --grouped --profile
       server_overhead server_overhead 0 60 --profile ) &
     weight_sync_ipc 1 20 &
     AFTER_TESTS=${AFTER_TESTS:-130} tp_lane 2,3 0 & wait ;;
  D) vs_trl_lane 0 &  # the final vs_trl, the engine's step overhead, the tensor-parallel checks with tracebacks
     ( q06 q06_1
       server_overhead server_overhead_grouped 1 200 --grouped --profile
       server_overhead server_overhead_overlap 1 20 --grouped --server-args=--enable-overlap-schedule ) &
     ( job tp_tests 2,3 150 python -m pytest -v -x --tb=short --timeout 150 -o faulthandler_timeout=140 \
           tests/test_engine_tp_gpu.py
       q06 q06
       job engine_tp2 2,3 60 python benchmarks/engine_throughput.py --model $MODELS/q06 --tp-size 2 --hf-num-seqs 0 \
           --output $RES/engine_throughput_tp2.json
       job gpu_tests 2 20 python -m pytest -v --tb=short --timeout 120 tests/test_engine_gpu.py \
           tests/test_fsdp_packed_attention.py ) &
     wait ;;
  B) train_4b 0,1,2,3 4 "${AFTER_TRAIN:-330}"  # part 4, then (B_DISAGG=1) the disaggregated step, then part 3's training
     rl_fsdp4 "${AFTER_FSDP4:-150}"
     if [ "${B_DISAGG:-0}" = 1 ]; then rl_disagg 0,1 20 & fi
     train_4b 2,3 2 20 & wait ;;
  *) echo "PART must be 1, 2, 3, 4 (or A, B on a 4-GPU host)" >&2; exit 2 ;;
esac
nvidia-smi --query-gpu=name,memory.used --format=csv >> "$RES/suite.log" 2>&1
tar czf "$OUT/results_$PART.tgz" -C "$RES" . && cp "$RES/suite.log" "$OUT/suite_$PART.log"
for f in "$RES"/*.json; do echo "== $(basename "$f")"; head -c 1200 "$f"; echo; done
cat "$RES/suite.log"
