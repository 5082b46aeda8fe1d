#!/usr/bin/env bash
# Kernel-level attention figures on one NVIDIA GPU, in one invocation: Strata's dense attention
# and coord3d's block multi-scale (BMS) path (`strata bench-attention`, bf16, batch 1, 16 heads,
# head dim 128, causal), and as peers PyTorch SDPA (cuDNN/flash) and FlexAttention running the
# same BMS block mask (benches/attention_torch.py). Every point is its own process; nvidia-smi
# samples the device memory in use every 50 ms and the process's peak (CUDA context included)
# goes into the table.
#
#   CUDARC_CUDA_VERSION=13000 CARGO_TARGET_DIR=target/cuda-plain cargo build --release \
#       -p strata-experiments --features cuda
#   STRATA_BIN=target/cuda-plain/release/strata bash benches/attention_gpu.sh RESULTS_DIR
#
# Appends rows to RESULTS_DIR/attention_gpu_raw.csv; benches/attention_table.py turns them into
# RESULTS_DIR/attention_gpu.csv with ratios to SDPA and FlexAttention.
# SEQS="1024 4096" and ONLY=strata|torch|model run a subset (each call of a lent GPU is
# time-limited). The model part (MODEL_SEQS) times whole training steps of the GPT-2-small shape
# at batch 1, dense against coord3d, both with per-block activation checkpointing, and appends
# JSON lines to RESULTS_DIR/attention_model_raw.jsonl.
set -u
results=${1:-benches/results}
mkdir -p "$results"
bin=${STRATA_BIN:-target/cuda-plain/release/strata}
export CUDA_PATH=${CUDA_PATH:-/usr/local/cuda}
export LD_LIBRARY_PATH=$CUDA_PATH/lib64:${LD_LIBRARY_PATH:-}
raw="$results/attention_gpu_raw.csv"
. "$(dirname "$0")/gpu_sampler.sh"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$results/gpu.txt"

# Runs "$@" (which prints CSV rows) beside a memory sampler; appends each row with its label and
# the sampled peak, or one row that says why the run failed.
measured() {
  local label=$1; shift
  run_sampled /tmp/attention-run.out /tmp/attention-run.err "${RUN_TIMEOUT:-240}" "$@"
  local rows; rows=$(grep -v '^variant,' /tmp/attention-run.out | grep ',')
  if [ $rc -eq 0 ] && [ -n "$rows" ]; then
    while IFS= read -r row; do echo "$label,$peak,$row" >> "$raw"; done <<< "$rows"
  else
    local reason
    reason=$(grep -m1 -iE "out of memory|error|panicked" /tmp/attention-run.err | cut -c1-160 | tr '",' "' ")
    [ $rc -eq 124 ] && reason="timeout after ${RUN_TIMEOUT:-240} s"
    echo "$label,$peak,FAILED exit $rc: ${reason:-no output}" >> "$raw"
  fi
  tail -n 2 "$raw"
}

shape=(--batch 1 --heads 16 --head-dim 128)
for seq in ${SEQS:-1024 4096 16384 65536 131072}; do
  if [ "${ONLY:-all}" = all ] || [ "${ONLY:-all}" = strata ]; then
    for kind in dense coord3d; do
      measured "strata-$kind-$seq" "$bin" bench-attention --backend cuda --dtype bf16 "${shape[@]}" \
        --seq "$seq" --kinds "$kind" --summaries --rounds 3
    done
  fi
  if [ "${ONLY:-all}" = all ] || [ "${ONLY:-all}" = torch ]; then
    for variant in sdpa flex_bms; do
      measured "torch-$variant-$seq" python3 benches/attention_torch.py --variant "$variant" \
        --seq "$seq" "${shape[@]}"
    done
  fi
done

if [ "${ONLY:-all}" = all ] || [ "${ONLY:-all}" = model ]; then
  for seq in ${MODEL_SEQS:-4096 16384}; do
    for kind in dense coord3d; do
      run_sampled /tmp/attention-model.out /tmp/attention-model.err "${RUN_TIMEOUT:-240}" \
        "$bin" bench-train configs/bench/gpt2_small.toml \
        --backend cuda --dtype bf16 --steps 3 --warmup 1 --set train.batch_size=1 \
        --set "train.seq_len=$seq" --set "model.max_seq_len=$seq" --set "model.attention=\"$kind\"" \
        --set 'train.activation_checkpointing="block"'
      line=$(tail -1 /tmp/attention-model.out)
      [ -n "$line" ] || line="{\"failed\": \"$(grep -m1 -iE 'memory|error|panicked' /tmp/attention-model.err | cut -c1-120 | tr '\"' "'")\"}"
      python3 -c 'import json,sys; d=json.loads(sys.argv[1]); d.update(attention=sys.argv[2], peak_device_mib=int(sys.argv[3])); print(json.dumps(d))' \
        "$line" "$kind" "$peak" | tee -a "$results/attention_model_raw.jsonl"
    done
  done
fi
