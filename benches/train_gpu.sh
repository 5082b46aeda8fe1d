#!/usr/bin/env bash
# GPU training throughput on one NVIDIA GPU: Strata (cuda feature) against PyTorch eager and
# torch.compile, GPT-2-small-like shape (configs/bench/gpt2_small.toml), one invocation.
#
#   CUDARC_CUDA_VERSION=13000 CARGO_TARGET_DIR=target/cuda cargo build --release -p strata-experiments --features cuda
#   STRATA_BIN=target/cuda/release/strata bash benches/train_gpu.sh [all|strata|pytorch] RESULTS_DIR
#
# Appends JSON lines to RESULTS_DIR/train_gpu.jsonl and writes RESULTS_DIR/train_gpu.csv from
# them; the parts can run in separate calls (Strata's cold start takes minutes). Needs python3
# with torch and a GPU. Another shape: CONFIG=configs/bench/tinyllama_1b.toml NAME=train_gpu_tinyllama
# SETS="train.batch_size=2 train.seq_len=2048" (both frameworks get the SETS; the f32 and
# naive-attention PyTorch rows are left out when SHORT=1).
set -u
part=${1:-all}
results=${2:-benches/results}
mkdir -p "$results"
bin=${STRATA_BIN:-target/cuda/release/strata}
config=${CONFIG:-configs/bench/gpt2_small.toml}
sets=()
for kv in ${SETS:-}; do sets+=(--set "$kv"); done
export CUDA_PATH=${CUDA_PATH:-/usr/local/cuda}
export LD_LIBRARY_PATH=$CUDA_PATH/lib64:${LD_LIBRARY_PATH:-}
export PYTHONUNBUFFERED=1
name=${NAME:-train_gpu}
raw="$results/$name.jsonl"
touch "$raw"

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$results/gpu.txt"

if [ "$part" != strata ]; then
# The measured ceiling that MFU is quoted against: a large bf16 (and tf32) matrix product.
python3 benches/matmul_ceiling.py >> "$raw"

torch_run() {
  timeout 300 python3 scripts/reference/train_torch.py "$config" --bench --device cuda --warmup 3 --steps 10 "${sets[@]}" "$@" >> "$raw" \
    || echo "{\"framework\": \"pytorch\", \"failed\": \"$*\"}" >> "$raw"
}
[ "${SHORT:-0}" = 1 ] || torch_run --dtype f32 --profile
torch_run --dtype bf16 --profile
[ "${SHORT:-0}" = 1 ] || torch_run --dtype bf16 --naive-attention
torch_run --dtype bf16 --compile
fi

# f32; f32 parameters with bf16 compute (train.mixed_precision); everything in bf16.
strata_run() {
  timeout "${STRATA_TIMEOUT:-240}" "$bin" bench-train "$config" --backend cuda --warmup 2 --steps 8 --profile "${sets[@]}" "$@" >> "$raw" \
    || echo "{\"framework\": \"strata\", \"backend\": \"cuda ${*//\"/}\", \"failed\": \"exit $? (timeout or error)\"}" >> "$raw"
}
if [ "$part" != pytorch ]; then
  [ "${SHORT:-0}" = 1 ] || strata_run --dtype f32
  strata_run --dtype f32 --set 'train.mixed_precision="bf16"'
  strata_run --dtype bf16
fi

python3 benches/gpu_table.py "$raw" "$results/gpu.txt" "$config" "${sets[@]}" > "$results/$name.csv"
python3 benches/profile_table.py "$raw" > "$results/${name}_profile.csv"
cat "$results/$name.csv" "$results/${name}_profile.csv"
