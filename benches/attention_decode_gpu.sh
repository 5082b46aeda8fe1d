#!/usr/bin/env bash
# Decoding at long contexts on one GPU (strata bench-decode, batch 1, bf16): time per token and
# the KV cache a layer group holds after the prompt, dense attention against coord3d (with
# eviction) and coord3d with cross-layer KV sharing (configs/coord3d/decode_*.toml). Dense stops
# at 64k: a 128k prompt's chunked prefill would pass 2^32 scores per chunk or take minutes to mask.
#   STRATA_BIN=target/cuda-plain/release/strata bash benches/attention_decode_gpu.sh OUT_DIR
set -u
out=${1:-benches/results}
bin=${STRATA_BIN:-target/cuda-plain/release/strata}
export CUDA_PATH=${CUDA_PATH:-/usr/local/cuda}
export LD_LIBRARY_PATH=$CUDA_PATH/lib64:${LD_LIBRARY_PATH:-}
mkdir -p "$out"
dense=configs/coord3d/decode_dense.toml
sparse="configs/coord3d/decode_coord3d.toml configs/coord3d/decode_coord3d_kv2.toml"
csv="$out/attention_decode_gpu.csv"
: > "$csv"
for context in ${CONTEXTS:-16384 65536 131072}; do
  configs=$sparse
  [ "$context" -le 65536 ] && configs="$dense $sparse"
  timeout "${RUN_TIMEOUT:-150}" "$bin" bench-decode $configs --backend cuda --dtype bf16 \
    --prompt "$context" --tokens 32 --rounds 2 --chunk 2048 > /tmp/decode.csv 2> /tmp/decode.err
  echo "context $context: exit $?"
  [ -s "$csv" ] || head -1 /tmp/decode.csv >> "$csv"
  tail -n +2 /tmp/decode.csv >> "$csv"
done
cat "$csv"
