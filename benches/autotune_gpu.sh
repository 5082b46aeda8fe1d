#!/usr/bin/env bash
# Burn's matmul autotuning alone (the `autotune` feature, without fusion) against the default
# build, GPT-2-small shape, with PyTorch eager in the same call:
#
#   CUDARC_CUDA_VERSION=13000 CARGO_TARGET_DIR=target/cuda cargo build --release -p strata-experiments --features cuda
#   CUDARC_CUDA_VERSION=13000 CARGO_TARGET_DIR=target/cuda-tune cargo build --release -p strata-experiments --features cuda,autotune
#   PLAIN_BIN=... TUNE_BIN=... bash benches/autotune_gpu.sh RESULTS_DIR
#
# Writes RESULTS_DIR/train_gpu_autotune.{jsonl,csv} and train_gpu_autotune_profile.csv.
set -u
results=${1:-benches/results}
mkdir -p "$results"
config=configs/bench/gpt2_small.toml
export CUDA_PATH=${CUDA_PATH:-/usr/local/cuda}
export LD_LIBRARY_PATH=$CUDA_PATH/lib64:${LD_LIBRARY_PATH:-}
raw="$results/train_gpu_autotune.jsonl"
: > "$raw"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$results/gpu.txt"
python3 benches/matmul_ceiling.py >> "$raw"
timeout 120 python3 scripts/reference/train_torch.py "$config" --bench --device cuda --warmup 3 --steps 10 --dtype bf16 >> "$raw"
run() {
  bin=$1; shift
  timeout "${STRATA_TIMEOUT:-200}" "$bin" bench-train "$config" --backend cuda --warmup 2 --steps 8 --profile "$@" >> "$raw" \
    || echo "{\"framework\": \"strata\", \"backend\": \"cuda ${*//\"/}\", \"failed\": \"exit $? (timeout or error)\"}" >> "$raw"
}
run "$PLAIN_BIN" --dtype bf16
run "$TUNE_BIN" --dtype bf16
run "$TUNE_BIN" --dtype f32 --set 'train.mixed_precision="bf16"'
[ -n "${SKIP_F32:-}" ] || run "$TUNE_BIN" --dtype f32
python3 benches/gpu_table.py "$raw" "$results/gpu.txt" "$config" > "$results/train_gpu_autotune.csv"
python3 benches/profile_table.py "$raw" > "$results/train_gpu_autotune_profile.csv"
cat "$results/train_gpu_autotune.csv" "$results/train_gpu_autotune_profile.csv"
