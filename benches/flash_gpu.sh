#!/usr/bin/env bash
# The CubeCL flash-attention kernels (kernels/) on one NVIDIA GPU, on and off in the same call:
# the same binary with STRATA_FLASH_KERNEL=1 (kernels) and =0 (the tensor-op attention). Every
# point is its own process, its device memory sampled by nvidia-smi (benches/gpu_sampler.sh).
#
#   CUDARC_CUDA_VERSION=13000 CARGO_TARGET_DIR=target/cuda-plain cargo build --release \
#       -p strata-experiments --features cuda
#   bash benches/flash_gpu.sh STRATA_BIN attention|train RESULTS_DIR
#
# attention: one layer's mixing (`strata bench-attention`, bf16): the GPT-2-small training shape
# (batch 8, 12 heads of 64, 1024 tokens, dense causal) and a long-context shape (batch 1,
# 16 heads of 128, 4k and 16k tokens, dense and coord3d's BMS pattern), PyTorch SDPA as the
# peer. Rows go to RESULTS_DIR/flash_attention_gpu_raw.csv.
# train: whole training steps of the GPT-2-small shape (`strata bench-train`, batch 8 × 1024,
# f32 and bf16). JSON lines go to RESULTS_DIR/flash_train_gpu.jsonl.
set -u
bin=$1 what=$2 results=${3:-benches/results}
mkdir -p "$results"
export CUDA_PATH=${CUDA_PATH:-/usr/local/cuda}
export LD_LIBRARY_PATH=$CUDA_PATH/lib64:${LD_LIBRARY_PATH:-}
. "$(dirname "$0")/gpu_sampler.sh"
gpu=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -1)

if [ "$what" = attention ]; then
  raw="$results/flash_attention_gpu_raw.csv"
  [ -f "$raw" ] || echo "# GPU: $gpu" > "$raw"
  row() { # LABEL CMD...: appends LABEL,peak,row for each CSV row CMD prints
    local label=$1; shift
    run_sampled /tmp/flash.out /tmp/flash.err "${RUN_TIMEOUT:-200}" "$@"
    if [ "$rc" = 0 ]; then
      grep -v '^variant,' /tmp/flash.out | grep ',' | sed "s/^/$label,$peak,/" >> "$raw"
    else
      echo "$label,$peak,FAILED exit $rc: $(grep -m1 -iE 'error|panicked' /tmp/flash.err | cut -c1-150 | tr '",' "' ")" >> "$raw"
    fi
    tail -n 2 "$raw"
  }
  for kernels in 1 0; do
    STRATA_FLASH_KERNEL=$kernels row "kernels=$kernels" "$bin" bench-attention --backend cuda \
      --dtype bf16 --batch 8 --heads 12 --head-dim 64 --seq 1024 --kinds dense --summaries --rounds 5
    STRATA_FLASH_KERNEL=$kernels row "kernels=$kernels" "$bin" bench-attention --backend cuda \
      --dtype bf16 --batch 1 --heads 16 --head-dim 128 --seq 4096,16384 --kinds dense,coord3d \
      --summaries --rounds 3
  done
  row torch python3 benches/attention_torch.py --variant sdpa --seq 1024 --batch 8 --heads 12 --head-dim 64 --dtype bf16
  for seq in 4096 16384; do
    row torch python3 benches/attention_torch.py --variant sdpa --seq "$seq" --batch 1 --heads 16 --head-dim 128 --dtype bf16
  done
fi

if [ "$what" = train ]; then
  out="$results/flash_train_gpu.jsonl"
  for dtype in ${DTYPES:-f32 bf16}; do
    for kernels in 1 0; do
      STRATA_FLASH_KERNEL=$kernels run_sampled /tmp/train.out /tmp/train.err "${RUN_TIMEOUT:-200}" \
        "$bin" bench-train configs/bench/gpt2_small.toml --backend cuda --dtype "$dtype" \
        --warmup 2 --steps 6 --set train.batch_size=8 --set train.seq_len=1024
      line=$(tail -1 /tmp/train.out)
      [ "$rc" = 0 ] || line="{\"error\": \"exit $rc: $(grep -m1 -iE 'error|panicked' /tmp/train.err | cut -c1-150 | tr '"' "'")\"}"
      echo "{\"kernels\": $kernels, \"dtype\": \"$dtype\", \"peak_device_mib\": ${peak:-null}, \"gpu\": \"$gpu\", \"run\": $line}" | tee -a "$out"
    done
  done
fi
