#!/usr/bin/env bash
# Attention's query passes (STRATA_ATTENTION_PASSES) on one NVIDIA GPU: Strata bf16 training
# tokens/s with 1, 2 and 4 passes on the GPT-2-small and TinyLlama-1.1B shapes, PyTorch eager
# bf16 beside each, one invocation.
#
#   CUDARC_CUDA_VERSION=13000 CARGO_TARGET_DIR=target/cuda cargo build --release -p strata-experiments --features cuda
#   STRATA_BIN=target/cuda/release/strata bash benches/attention_passes_gpu.sh [RESULTS_DIR]
#
# Appends JSON lines (bench-train's, with `attention_passes`; train_torch.py's) to
# RESULTS_DIR/attention_passes_gpu.jsonl and prints tokens/s per row.
set -u
results=${1:-benches/results}
mkdir -p "$results"
bin=${STRATA_BIN:-target/cuda/release/strata}
export CUDA_PATH=${CUDA_PATH:-/usr/local/cuda}
export LD_LIBRARY_PATH=$CUDA_PATH/lib64:${LD_LIBRARY_PATH:-}
raw="$results/attention_passes_gpu.jsonl"
for shape in gpt2 tinyllama; do
  if [ $shape = gpt2 ]; then
    config=configs/bench/gpt2_small.toml; sets=()
  else
    config=configs/bench/tinyllama_1b.toml; sets=(--set train.batch_size=2 --set train.seq_len=2048)
  fi
  timeout 200 python3 scripts/reference/train_torch.py "$config" --bench --device cuda --warmup 3 --steps 10 \
    --dtype bf16 "${sets[@]}" >> "$raw" || echo "{\"framework\": \"pytorch\", \"failed\": \"$shape\"}" >> "$raw"
  for passes in 1 2 4; do
    STRATA_ATTENTION_PASSES=$passes timeout 200 "$bin" bench-train "$config" --backend cuda --dtype bf16 \
      --warmup 2 --steps 8 "${sets[@]}" >> "$raw" \
      || echo "{\"framework\": \"strata\", \"attention_passes\": $passes, \"failed\": \"$shape\"}" >> "$raw"
  done
done
python3 - "$raw" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(r.get("framework"), r.get("seq_len"), r.get("attention_passes"), r.get("tokens_per_sec"), r.get("failed", ""))
PY
