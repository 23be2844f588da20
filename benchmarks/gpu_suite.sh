#!/usr/bin/env bash
# bash benchmarks/gpu_suite.sh OUT_DIR PART [SECONDS]    # PART 1|2|3|G|H|I on a 2-GPU host; 4, A-F on a 4-GPU host; J any
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
#   PART D  (4 GPUs)  vs_trl with 200 SFT steps (GPU 0); server_overhead without and with
#                     --enable-overlap-schedule, then vs_trl with short answers (GPU 1); the tensor-parallel tests and
#                     throughput, then the GPU engine tests beside engine_throughput tp 1 without and with the
#                     overlap schedule (GPUs 2,3)
#   PART E  (4 GPUs)  rollout_fidelity (GPU 0) beside engine_throughput with the overlap schedule and the HF
#                     baseline (GPU 1), then the tensor-parallel tests (GPUs 0,1); 4B training over 2 GPUs with
#                     $TRAIN_VARIANTS (GPUs 2,3)
#   PART F  (4 GPUs)  vs_trl (GPU 0), rollout_fidelity (GPU 1), the tensor-parallel and kernel tests, then 4B
#                     training over 2 GPUs with both FSDP options (GPUs 2,3)
#   PART G  GPUs 0,1  4B training over 2 GPUs with the FSDP communication variants (one profiled), the FSDP GPU tests
#   PART H  GPUs 0,1  vs_trl twice side by side (lr 1e-5 from the 200-step SFT model; lr 2e-5 from 120 steps)
#   PART I  GPUs 0,1  4B training on token-balanced shares with the compiled vocabulary head; the disaggregated RL step
#   PART J  every GPU vs_trl over run seeds SEED_BASE.. from one SFT model (final-reward parity with a standard error)
#   PART L  GPU 0     one vs_trl lane of part J with its own SFT stage (seed 5), for a one-GPU H100 machine
#   PART K  (4 GPUs)  part I's 4B training (fp32 and bf16 reduction) and the FSDP GPU tests on GPUs 0,1; part J on 2,3
#   PART M  GPUs 0,1  part K's 4B training, then the disaggregated weight sync (NCCL) and the FSDP GPU tests
#   PART N  GPUs 0,1  the disaggregated RL step (1 trainer + 1 engine, NCCL), then the colocated weight sync (CUDA IPC)
#   PART O  (4 GPUs)  the FSDP-over-4-GPUs RL step from a 120-step SFT model, then 4B training over 4 GPUs
#   PART P  GPUs 0,1  the disaggregated RL step from a 120-step SFT model; then from that model PPO (GPU 0) beside
#                     GRPO (GPU 1), colocated
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
vs_trl_lane() {  # GPU  (RES_TAG: suffix of its files and workdir)
  local tag=${RES_TAG:-}
  SLIME_FSDP_COMPILE=${FAST_COMPILE:-layer} job "vs_trl$tag" "$1" 20 python benchmarks/vs_trl.py \
      --workdir "/tmp/vs$tag" --num-steps "${VS_TRL_STEPS:-16}" --trl-max-seconds "${TRL_MAX_SECONDS:-120}" \
      --rl-step-args "$FAST_ARGS" --out "$RES/vs_trl$tag.json" --slime-out "$RES/rl_step_colocated_fast$tag.json" \
      ${VS_TRL_EXTRA:-}
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
      --num-steps "${RL_STEPS:-8}" --out $RES/rl_step_disaggregated.json ${RL_DISAGG_EXTRA:-}
}
train_4b() {  # GPUS N RESERVE
  job "train_4b_x$2" "$1" "$3" python benchmarks/train_throughput.py --presets qwen3-4b --num-gpus "$2" \
      --variants "${TRAIN_VARIANTS:-eager,layer}" --no-baseline --model-dir $MODELS/train$2 \
      --out "$RES/train_throughput_qwen3-4b_$2gpu.json" ${TRAIN_PROFILE:+--profile "$TRAIN_PROFILE"} ${TRAIN_EXTRA:-}
}
rl_fsdp4() {  # RESERVE
  job rl_fsdp4 0,1,2,3 "$1" python benchmarks/rl_step.py --mode fsdp4 --workdir /tmp/rl4 --num-steps "${RL_STEPS:-8}" \
      --sft-steps 60 --out $RES/rl_step_fsdp4.json
}
seed_lanes() {  # SFT_GPU "GPU GPU ..." FIRST_SEED: one 120-step SFT model, then one vs_trl lane per GPU from it,
  # each with its own run seed (sampling, data order, TRL's seed) on the same problems (--task-seed 0), lr 2e-5
  # (~250 s for the SFT model, then ~290 s for the lanes: 20 steps each); then the mean difference over seeds
  SLIME_FSDP_COMPILE=layer job sft "$1" 300 python benchmarks/rl_step.py --workdir /tmp/sftJ --sft-steps 120 \
      --num-steps 1 $FAST_ARGS --out $RES/rl_step_sft_J.json
  local seed=$3 gpu
  for gpu in $2; do
    FAST_ARGS="$FAST_ARGS --task-seed 0" VS_TRL_STEPS=${VS_TRL_STEPS:-20} TRL_MAX_SECONDS=${TRL_MAX_SECONDS:-140} \
      VS_TRL_EXTRA="--lr 2e-5 --seed $seed --sft-model /tmp/sftJ/sft_model --final-eval-models slime,trl" RES_TAG=_seed$seed vs_trl_lane "$gpu" &
    seed=$((seed + 1))
  done
  wait
  local runs; runs=$(ls "$RES"/vs_trl_seed*.json 2>/dev/null)
  [ "$(echo "$runs" | wc -w)" -ge 2 ] && python benchmarks/vs_trl.py --summarize-seeds $runs --out "$RES/vs_trl_seeds.json"
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
  D) # session 6: vs_trl with the bf16 engine (worked answers, 200 SFT steps; then short answers on GPU 1, where
     # rewards move in 16 steps), the overlap schedule against the step-by-step engine, the tensor-parallel tests
     # (a watchdog has the spawned tp ranks print their stacks if the tests are still running at 230 s)
     FAST_ARGS="$FAST_ARGS --sft-steps ${SFT_STEPS:-200}" vs_trl_lane 0 &
     ( q06 q06_1
       server_overhead server_overhead_grouped 1 330 --grouped
       server_overhead server_overhead_overlap 1 300 --grouped --server-args=--enable-overlap-schedule
       FAST_ARGS="$FAST_ARGS --answer-style short --sft-steps ${SHORT_SFT_STEPS:-80}" RES_TAG=_short vs_trl_lane 1 ) &
     ( ( sleep 230; pkill -USR1 -P "$(pgrep -d, -f 'pytest.*test_engine_tp_gpu')" -f multiprocessing.spawn ) & dog=$!
       job tp_tests 2,3 240 python -m pytest -v -s --tb=short --timeout 150 tests/test_engine_tp_gpu.py
       kill $dog 2>/dev/null
       q06 q06 --device cuda
       job engine_tp2 2,3 130 python benchmarks/engine_throughput.py --model $MODELS/q06 --tp-size 2 --hf-num-seqs 0 \
           --output $RES/engine_throughput_tp2.json
       job gpu_tests 2 20 python -m pytest -v --tb=short --timeout 120 tests/test_engine_gpu.py \
           tests/test_fsdp_packed_attention.py &
       ( job engine_tp1 3 80 python benchmarks/engine_throughput.py --model $MODELS/q06 --hf-num-seqs 0 \
             --output $RES/engine_throughput_tp1.json
         job engine_tp1_overlap 3 20 python benchmarks/engine_throughput.py --model $MODELS/q06 --hf-num-seqs 0 \
             --enable-overlap-schedule --output $RES/engine_throughput_tp1_overlap.json ) & wait ) &
     wait ;;
  E) # session 6, second call: does the engine sample what HF samples (SFT-warmed 0.6B, the task's prompts)?
     # engine_throughput with the overlap schedule and the HF baseline; then the tensor-parallel tests; beside
     # them 4B training on 2 GPUs with the FSDP variants (layers kept gathered, gradients reduced once per step)
     ( ( job fidelity 0 200 python benchmarks/rollout_fidelity.py --workdir /tmp/fid --rl-step-args "--sft-steps 200" \
           --out $RES/rollout_fidelity.json ) &
       ( q06 q06 --device cuda
         job engine_overlap_hf 1 200 python benchmarks/engine_throughput.py --model $MODELS/q06 \
             --enable-overlap-schedule --output $RES/engine_throughput_overlap.json ) &
       wait
       job tp_tests 0,1 20 python -m pytest -v -s --tb=short --timeout 150 tests/test_engine_tp_gpu.py ) &
     TRAIN_VARIANTS=${TRAIN_VARIANTS:-layer,layer-keep,layer-reduce-once} train_4b 2,3 2 20 &
     wait ;;
  F) # session 6, third call, after the Gumbel-noise fix (no token gets u = 1.0): vs_trl (GPU 0); rollout_fidelity
     # (GPU 1); the tensor-parallel tests, the GPU kernel tests, then 4B training with both FSDP options (GPUs 2,3)
     FAST_ARGS="$FAST_ARGS --sft-steps ${SFT_STEPS:-200}" vs_trl_lane 0 &
     job fidelity 1 20 python benchmarks/rollout_fidelity.py --workdir /tmp/fid --rl-step-args "--sft-steps 200" \
         --hf-modes autocast --out $RES/rollout_fidelity.json &
     ( job tp_tests 2,3 330 python -m pytest -v -s --tb=short --timeout 150 tests/test_engine_tp_gpu.py
       job kernel_tests 2 260 python -m pytest -q --tb=short --timeout 120 tests/test_engine_gpu_kernels.py
       TRAIN_VARIANTS=${TRAIN_VARIANTS:-layer-keep-reduce-once} train_4b 2,3 2 20 ) &
     wait ;;
  G) # session 7 (2xH100), first call: 4B training over 2 GPUs with the FSDP communication options (the reduce-once
     # mode now also keeps the gathered layers between micro-batches; bf16 gradient reduction; chunked log-prob
     # head; dynamic shapes from the first compile), one of them profiled; then the 2-GPU FSDP tests (bf16
     # reduce-once against one GPU) beside the overlap schedule's GPU equality test
     TRAIN_VARIANTS=${TRAIN_VARIANTS:-layer-keep,layer-keep-reduce-once-chunked,layer-keep-reduce-once-bf16-chunked,layer-keep-bf16-reduce,layer-keep-reduce-once-chunked-dynamic} \
       TRAIN_PROFILE=${TRAIN_PROFILE:-layer-keep-reduce-once-chunked} train_4b 0,1 2 130
     job fsdp_gpu_tests 0,1 20 python -m pytest -v --tb=short --timeout 150 tests/test_fsdp_gpu.py &
     job overlap_gpu_test 1 20 python -m pytest -v --tb=short --timeout 150 tests/test_engine_gpu.py -k overlap &
     wait ;;
  H) # session 7, second call: vs_trl twice side by side, 24 steps each, with the final eval of both trained
     # policies; lane 0 from the 200-step SFT model at lr 1e-5, lane 1 from a 120-step SFT model at lr 2e-5 (it
     # starts lower); the layers compile with dynamic shapes, so GRPO reuses the SFT stage's compiled graphs
     export SLIME_FSDP_COMPILE_DYNAMIC=${SLIME_FSDP_COMPILE_DYNAMIC:-1}
     FAST_ARGS="$FAST_ARGS --sft-steps 200" VS_TRL_STEPS=24 TRL_MAX_SECONDS=${TRL_MAX_SECONDS:-170} \
       VS_TRL_EXTRA="--lr 1e-5" RES_TAG=_lr1e-5 vs_trl_lane 0 &
     FAST_ARGS="$FAST_ARGS --sft-steps 120" VS_TRL_STEPS=24 TRL_MAX_SECONDS=${TRL_MAX_SECONDS:-170} \
       VS_TRL_EXTRA="--lr 2e-5" RES_TAG=_sft120 vs_trl_lane 1 &
     wait ;;
  I) # session 7, third call: 4B training over 2 GPUs on token-balanced rank shares (train.py's --balance-data)
     # with the compiled vocabulary head; then the disaggregated RL step (1 trainer + 1 engine, NCCL) after the
     # sampler fix
     TRAIN_EXTRA="--balance-data" \
       TRAIN_VARIANTS=${TRAIN_VARIANTS:-layer-keep,layer-keep-reduce-once-chunked,layer-keep-reduce-once-chunked-head,layer-keep-reduce-once-bf16-chunked-head} \
       TRAIN_PROFILE=${TRAIN_PROFILE:-layer-keep-reduce-once-chunked-head} train_4b 0,1 2 200
     RL_DISAGG_EXTRA="--sft-steps 60" rl_disagg 0,1 20 ;;
  J) # reward parity over seeds: one 120-step SFT model, then one vs_trl lane per GPU from it (seeds SEED_BASE..)
     seed_lanes 0 "$(nvidia-smi --query-gpu=index --format=csv,noheader | tr '\n' ' ')" "${SEED_BASE:-1}" ;;
  K) # session 8 (4xH100), first call: 4B training over GPUs 0,1 on balanced shares (fp32 and bf16 gradient
     # reduction), then the 2-GPU FSDP tests; beside them reward parity over two seeds on GPUs 2,3
     ( TRAIN_EXTRA="--balance-data" \
         TRAIN_VARIANTS=${TRAIN_VARIANTS:-layer-keep-reduce-once-chunked,layer-keep-reduce-once-bf16-chunked-head,layer-keep-reduce-once-chunked-head} \
         train_4b 0,1 2 120
       job fsdp_gpu_tests 0,1 20 python -m pytest -v --tb=short --timeout 150 tests/test_fsdp_gpu.py ) &
     seed_lanes 2 "2 3" "${SEED_BASE:-1}" &
     wait ;;
  L) # session 8, one H100: one vs_trl lane as part J's (120 SFT steps, lr 2e-5, task seed 0, run seed 5), the SFT
     # stage inside slime's run; the final eval scores the two trained policies on 128 prompts x 4
     FAST_ARGS="$FAST_ARGS --sft-steps 120 --task-seed 0" VS_TRL_STEPS=20 TRL_MAX_SECONDS=${TRL_MAX_SECONDS:-125} \
       VS_TRL_EXTRA="--lr 2e-5 --seed 5 --final-eval-models slime,trl --final-eval-prompts 128" RES_TAG=_seed5 \
       vs_trl_lane 0 ;;
  M) # session 9 (2xH100): part K's 4B training on GPUs 0,1 (the MFU target's hardware), then the NCCL weight sync
     # of the 0.6B and 4B shapes and the 2-GPU FSDP tests
     TRAIN_EXTRA="--balance-data" \
       TRAIN_VARIANTS=${TRAIN_VARIANTS:-layer-keep-reduce-once-chunked,layer-keep-reduce-once-bf16-chunked-head,layer-keep-reduce-once-chunked-head} \
       train_4b 0,1 2 "${AFTER_TRAIN:-200}"
     job weight_sync 0,1 160 python benchmarks/weight_sync.py --presets qwen3-0.6b,qwen3-4b \
         --modes disaggregated,disaggregated_direct --engine-gpu 1 --model-dir $MODELS/ws --out $RES/weight_sync_nccl.json
     job fsdp_gpu_tests 0,1 20 python -m pytest -v --tb=short --timeout 150 tests/test_fsdp_gpu.py ;;
  N) # session 9 (2xH100), second call: the disaggregated RL step and the 4B colocated weight sync on H100s
     RL_DISAGG_EXTRA="--sft-steps 60" rl_disagg 0,1 "${AFTER_RL:-110}"
     weight_sync_ipc 0 20 ;;
  O) # session 9 (4xH100): the fsdp4 RL step with part J's GRPO settings (120 SFT steps, lr 2e-5: rewards rise there;
     # 60 steps at 5e-5 collapse to no reward) and the fast trainer settings, then 4B training over 4 GPUs
     SLIME_FSDP_COMPILE=layer job rl_fsdp4 0,1,2,3 "${AFTER_RL:-170}" python benchmarks/rl_step.py --mode fsdp4 \
         --workdir /tmp/rl4 --num-steps "${RL_STEPS:-10}" --sft-steps 120 --lr 2e-5 --task-seed 0 $FAST_ARGS \
         --out $RES/rl_step_fsdp4.json
     TRAIN_EXTRA="--balance-data" \
       TRAIN_VARIANTS=${TRAIN_VARIANTS:-layer-keep-reduce-once-chunked-head,layer-keep-reduce-once-bf16-chunked-head} \
       train_4b 0,1,2,3 4 20 ;;
  P) # session 9 (2xH100), third call: part N's disaggregated step with part J's GRPO settings (120 SFT steps, lr 2e-5)
     # and the fast trainer settings; then PPO's first GPU run beside GRPO, both from that SFT model, colocated
     SLIME_FSDP_COMPILE=layer job rl_disagg 0,1 "${AFTER_RL:-170}" python benchmarks/rl_step.py --mode disaggregated \
         --workdir /tmp/rl2 --num-steps "${RL_STEPS:-10}" --sft-steps 120 --lr 2e-5 --task-seed 0 $FAST_ARGS \
         --out $RES/rl_step_disaggregated.json
     for lane in "0 ppo --advantage-estimator=ppo --critic-lr=1e-5 --num-critic-only-steps=2" "1 grpo"; do
       set -- $lane
       SLIME_FSDP_COMPILE=layer job "rl_$2" "$1" 20 python benchmarks/rl_step.py --workdir "/tmp/rl_$2" \
           --sft-model /tmp/rl2/sft_model --num-steps "${RL_STEPS:-10}" --lr 2e-5 --task-seed 0 \
           --max-tokens-per-gpu 8192 --extra-args="--log-probs-chunk-size=4096 ${*:3}" --out "$RES/rl_step_$2.json" &
     done
     wait ;;
  B) train_4b 0,1,2,3 4 "${AFTER_TRAIN:-330}"  # part 4, then (B_DISAGG=1) the disaggregated step, then part 3's training
     rl_fsdp4 "${AFTER_FSDP4:-150}"
     if [ "${B_DISAGG:-0}" = 1 ]; then rl_disagg 0,1 20 & fi
     train_4b 2,3 2 20 & wait ;;
  *) echo "PART must be 1, 2, 3, 4, G, H, I, J, L, M, N, P (or A-F, K, O on a 4-GPU host)" >&2; exit 2 ;;
esac
nvidia-smi --query-gpu=name,memory.used --format=csv >> "$RES/suite.log" 2>&1
tar czf "$OUT/results_$PART.tgz" -C "$RES" . && cp "$RES/suite.log" "$OUT/suite_$PART.log"
for f in "$RES"/*.json; do echo "== $(basename "$f")"; head -c 1200 "$f"; echo; done
cat "$RES/suite.log"
