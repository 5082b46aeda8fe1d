#!/usr/bin/env bash
# The linear layers' GPU matmul kernels on one NVIDIA GPU: every kernel of `strata bench-matmul`
# on the GPT-2-small training step's products (bf16, then f32), then training steps with the
# fastest one (`STRATA_MATMUL`), with the fused AdamW and without it, and PyTorch eager, same call.
#
#   CUDARC_CUDA_VERSION=13000 CARGO_TARGET_DIR=target/cuda cargo build --release -p strata-experiments --features cuda
#   STRATA_BIN=target/cuda/release/strata bash benches/matmul_gpu.sh RESULTS_DIR
#
# Appends JSON lines to RESULTS_DIR/matmul_gpu.jsonl (kernels) and RESULTS_DIR/train_gpu_matmul.jsonl
# (training steps) and writes RESULTS_DIR/matmul_gpu.csv, train_gpu_matmul.csv and
# train_gpu_matmul_profile.csv. Each part has its own time limit so
# that what finished is kept.
set -u
results=${1:-benches/results}
mkdir -p "$results"
bin=${STRATA_BIN:-target/cuda/release/strata}
config=configs/bench/gpt2_small.toml
export CUDA_PATH=${CUDA_PATH:-/usr/local/cuda}
export LD_LIBRARY_PATH=$CUDA_PATH/lib64:${LD_LIBRARY_PATH:-}
export PYTHONUNBUFFERED=1
kernels="$results/matmul_gpu.jsonl"
raw="$results/train_gpu_matmul.jsonl"
touch "$kernels" "$raw"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$results/gpu.txt"

timeout "${MATMUL_TIMEOUT:-200}" "$bin" bench-matmul "$config" --backend cuda --dtype bf16 --repeats 5 >> "$kernels"
best=$(python3 benches/matmul_table.py "$kernels" --best cuda-bf16)
echo "fastest bf16 kernel: $best"

strata_run() {
  timeout "${STRATA_TIMEOUT:-120}" "$bin" bench-train "$config" --backend cuda --warmup 2 --steps 8 --profile "$@" >> "$raw" \
    || echo "{\"framework\": \"strata\", \"backend\": \"cuda ${*//\"/}\", \"failed\": \"exit $? (timeout or error)\"}" >> "$raw"
}
STRATA_MATMUL=$best strata_run --dtype bf16
# The same with AdamW as tensor ops instead of one kernel per parameter: the fused AdamW's gain.
STRATA_FUSED_ADAMW=0 STRATA_MATMUL=$best strata_run --dtype bf16
timeout 90 python3 scripts/reference/train_torch.py "$config" --bench --device cuda --warmup 3 --steps 10 --dtype bf16 >> "$raw" \
  || echo '{"framework": "pytorch", "failed": "--dtype bf16"}' >> "$raw"
STRATA_MATMUL=$best strata_run --dtype f32 --set 'train.mixed_precision="bf16"'
if [ "${SKIP_F32:-0}" != 1 ]; then
  timeout "${MATMUL_TIMEOUT:-200}" "$bin" bench-matmul "$config" --backend cuda --dtype f32 --repeats 5 >> "$kernels"
  best32=$(python3 benches/matmul_table.py "$kernels" --best cuda-f32)
  echo "fastest f32 kernel: $best32"
  STRATA_MATMUL=$best32 strata_run --dtype f32
fi
python3 benches/matmul_table.py "$kernels" > "$results/matmul_gpu.csv"
python3 benches/gpu_table.py "$raw" "$results/gpu.txt" "$config" > "$results/train_gpu_matmul.csv"
python3 benches/profile_table.py "$raw" > "$results/train_gpu_matmul_profile.csv"
