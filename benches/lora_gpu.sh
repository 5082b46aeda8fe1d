#!/usr/bin/env bash
# LoRA fine-tuning memory and speed on one NVIDIA GPU, 1.1B TinyLlama shape (random base),
# r = 16 on all seven projections: Strata (bench-train --lora-rank) against transformers + PEFT
# with and without gradient checkpointing, in one invocation. Every run is its own process;
# nvidia-smi samples the device memory in use every 50 ms while it runs, and the run's peak
# (CUDA context included, the same for both frameworks) goes into the table.
#
#   CUDARC_CUDA_VERSION=13000 CARGO_TARGET_DIR=target/cuda-plain cargo build --release \
#       -p strata-experiments --features cuda      # (+fusion: faster steps, minutes of cold start)
#   STRATA_BIN=target/cuda-plain/release/strata bash benches/lora_gpu.sh RESULTS_DIR
#
# Appends JSON lines to RESULTS_DIR/lora_gpu.jsonl and writes RESULTS_DIR/lora_memory.csv
# (benches/lora_table.py, which also merges the JSON lines of several calls).
set -u
results=${1:-benches/results}
mkdir -p "$results"
bin=${STRATA_BIN:-target/cuda-plain/release/strata}
config=configs/bench/tinyllama_1b.toml
export CUDA_PATH=${CUDA_PATH:-/usr/local/cuda}
export LD_LIBRARY_PATH=$CUDA_PATH/lib64:${LD_LIBRARY_PATH:-}
export PYTHONUNBUFFERED=1
raw="$results/lora_gpu.jsonl"
touch "$raw"
. "$(dirname "$0")/gpu_sampler.sh"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$results/gpu.txt"

# Runs "$@" with a memory sampler beside it; appends the command's JSON line with the peak added.
measured() {
  local label=$1; shift
  run_sampled /tmp/lora-run.out /tmp/lora-run.err "${RUN_TIMEOUT:-420}" "$@"
  local out; out=$(tail -1 /tmp/lora-run.out)
  if [ $rc -eq 0 ] && [ -n "$out" ]; then
    python3 -c 'import json,sys; d=json.loads(sys.argv[1]); d["label"]=sys.argv[2]; d["peak_device_mib"]=int(sys.argv[3]); print(json.dumps(d))' \
      "$out" "$label" "$peak" >> "$raw"
  else
    local reason
    reason=$(grep -m1 -iE "out of memory|error|panicked" /tmp/lora-run.err | cut -c1-160 | tr '"' "'")
    [ $rc -eq 124 ] && reason="timeout after ${RUN_TIMEOUT:-420} s"
    echo "{\"label\": \"$label\", \"failed\": \"exit $rc: ${reason:-no output}\", \"peak_device_mib\": ${peak:-0}}" >> "$raw"
  fi
  tail -1 "$raw"
}

# SHAPES="batch seq;batch seq;..." runs a subset, ONLY=strata|peft one side, STRATA_DTYPES a
# subset of "f32 bf16", STRATA_MODES of "plain ckpt offload", STRATA_BASE of "same bf16" (the
# frozen weights in the run's dtype or in bf16) (each call of a lent GPU is time-limited).
IFS=';' read -r -a shapes <<< "${SHAPES:-1 1024;4 1024;1 2048;4 2048}"
for shape in "${shapes[@]}"; do
  set -- $shape; b=$1; s=$2
  [ "${ONLY:-all}" != peft ] && for dtype in ${STRATA_DTYPES:-f32 bf16}; do
    for mode in ${STRATA_MODES:-plain ckpt offload}; do
     for base in ${STRATA_BASE:-same}; do
      # ckpt: recompute per block; offload: and keep the saved block inputs in host memory;
      # base bf16: the frozen weights stored in bf16, adapters in the run's dtype.
      extra=()
      label=strata-$dtype
      [ "$base" = bf16 ] && extra=(--lora-base-dtype bf16) && label+=-bf16base
      [ "$mode" != plain ] && extra+=(--set 'train.activation_checkpointing="block"') && label+=-ckpt
      [ "$mode" = offload ] && extra+=(--set train.offload_activations=true) && label+=-offload
      # STRATA_HEAD_CHUNK=N: the LM head and loss N positions at a time (checkpointed runs).
      [ "$mode" != plain ] && [ -n "${STRATA_HEAD_CHUNK:-}" ] &&
        extra+=(--set "train.head_chunk=$STRATA_HEAD_CHUNK") && label+=-chunk$STRATA_HEAD_CHUNK
      measured "$label-b$b-s$s" "$bin" bench-train "$config" \
        --backend cuda --dtype "$dtype" --lora-rank 16 --warmup 2 --steps 4 \
        --set "train.batch_size=$b" --set "train.seq_len=$s" "${extra[@]}"
     done
    done
  done
  [ "${ONLY:-all}" != strata ] && for dtype in f32 bf16; do
    for ckpt in "" "--checkpointing"; do
      measured "peft-$dtype${ckpt:+-ckpt}-b$b-s$s" python3 benches/lora_peft.py "$config" \
        --batch "$b" --seq "$s" --rank 16 --dtype "$dtype" $ckpt
    done
  done
done

python3 benches/lora_table.py "$results/gpu.txt" "$raw" > "$results/lora_memory.csv"
cat "$results/lora_memory.csv"
