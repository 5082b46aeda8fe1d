#!/usr/bin/env bash
# Training's causal attention through the tensor-core flash kernels (STRATA_MMA_ATTENTION=1)
# against the matrix form (products and score kernels, =0) on one NVIDIA GPU: Strata bf16
# training tokens/s, all-bf16 and mixed bf16, on the GPT-2-small shape at batch 64 and the
# TinyLlama-1.1B shape at 8 x 2048, PyTorch eager bf16 beside each, one invocation.
#
#   CUDARC_CUDA_VERSION=13000 CARGO_TARGET_DIR=target/cuda cargo build --release -p strata-experiments --features cuda
#   STRATA_BIN=target/cuda/release/strata bash benches/mma_attention_gpu.sh [RESULTS_DIR]
#
# Appends JSON lines (bench-train's, with `mma_attention`; train_torch.py's) to
# RESULTS_DIR/mma_attention_gpu.jsonl and prints tokens/s per row. Check the kernels first:
# the CUDA GPU test `tensor_core_flash_on_cuda_matches_the_cpu`.
set -u
results=${1:-benches/results}
mkdir -p "$results"
bin=${STRATA_BIN:-target/cuda/release/strata}
export CUDA_PATH=${CUDA_PATH:-/usr/local/cuda}
export LD_LIBRARY_PATH=$CUDA_PATH/lib64:${LD_LIBRARY_PATH:-}
raw="$results/mma_attention_gpu.jsonl"
for shape in ${SHAPES:-tinyllama gpt2}; do
  if [ "$shape" = gpt2 ]; then
    config=configs/bench/gpt2_small.toml; sets=(--set train.batch_size=64)
  else
    config=configs/bench/tinyllama_1b.toml; sets=(--set train.batch_size=8 --set train.seq_len=2048)
  fi
  [ "${NO_TORCH:-0}" = 1 ] || timeout 200 python3 scripts/reference/train_torch.py "$config" --bench --device cuda \
    --warmup 3 --steps 10 --dtype bf16 "${sets[@]}" >> "$raw" \
    || echo "{\"framework\": \"pytorch\", \"failed\": \"$shape\"}" >> "$raw"
  for precision in "--dtype bf16" "--dtype f32 --set train.mixed_precision=\"bf16\""; do
    for mma in 1 0; do
      # shellcheck disable=SC2086 # the precision options are words
      STRATA_MMA_ATTENTION=$mma timeout 200 "$bin" bench-train "$config" --backend cuda $precision \
        --warmup 2 --steps 8 "${sets[@]}" >> "$raw" \
        || echo "{\"framework\": \"strata\", \"mma_attention\": $mma, \"failed\": \"$shape\"}" >> "$raw"
    done
  done
done
python3 - "$raw" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(r.get("framework"), r.get("backend"), r.get("mixed_precision"), r.get("seq_len"), r.get("batch_size"),
          r.get("mma_attention"), r.get("tokens_per_sec"), r.get("failed", ""))
PY
