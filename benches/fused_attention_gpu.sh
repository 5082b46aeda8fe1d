#!/usr/bin/env bash
# Before/after figures for the fused causal attention op (framework/src/nn/fused) on one GPU:
# the same `strata bench-train` runs with a binary built before the op and one built with it,
# one after the other in the same call, each process's device memory sampled by nvidia-smi.
#
#   bash benches/fused_attention_gpu.sh BEFORE_BIN BEFORE_COMMIT AFTER_BIN AFTER_COMMIT [OUT_CSV]
#
# Both binaries: `--features cuda` (no fusion), built here and carried to the GPU machine.
set -uo pipefail
cd "$(dirname "$0")/.."
source benches/gpu_sampler.sh
before=$1 before_commit=$2 after=$3 after_commit=$4 out=${5:-benches/results/fused_attention_gpu.csv}
gpu=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -1)
tmp=$(mktemp -d)
{
  echo "# strata bench-train (forward, backward, AdamW on random tokens; 2 warm-up + 6 timed steps):"
  echo "# build=before: commit $before_commit (attention composed of tracked tensor ops); build=after:"
  echo "# commit $after_commit (nn::fused causal attention, tensor-op form on the GPU); cuda feature, no fusion."
  echo "# peak_device_mib: nvidia-smi memory.used sampled every 50 ms over the process (CUDA context included)."
  echo "# train-300: \`strata train configs/shakespeare.toml\` for 300 steps on real text (same seed and data): val_loss"
  echo "# shows the two builds train alike (f32 GPU sums differ in order, so not bit for bit)."
  echo "# GPU: $gpu"
  echo "run,build,config,dtype,lora_rank,batch_size,seq_len,tokens_per_sec,peak_device_mib,val_loss,status"
} > "$tmp/csv"

# measure NAME CONFIG DTYPE LORA_RANK BATCH SEQ
measure() {
  local name=$1 config=$2 dtype=$3 lora=$4 batch=$5 seq=$6 build bin tps status
  for build in before after; do
    bin=$before; [ "$build" = after ] && bin=$after
    local args=(bench-train "$config" --backend cuda --dtype "$dtype" --warmup 2 --steps 6
      --set "train.batch_size=$batch" --set "train.seq_len=$seq")
    [ "$lora" != 0 ] && args+=(--lora-rank "$lora")
    run_sampled "$tmp/out" "$tmp/err" 240 "$bin" "${args[@]}"
    tps=$(tail -1 "$tmp/out" | python3 -c 'import json, sys; print(round(json.load(sys.stdin)["tokens_per_sec"], 1))' 2>/dev/null)
    status=ok
    [ "$rc" != 0 ] && status="exit $rc: $(tail -1 "$tmp/err" | tr ',' ';' | cut -c1-100)"
    echo "$name,$build,$config,$dtype,$lora,$batch,$seq,${tps:-},${peak:-},,$status" >> "$tmp/csv"
    echo "$name $build: ${tps:-?} tok/s, ${peak:-?} MiB, $status"
  done
}
# The default model trained for 300 steps by each build: the loss it reaches.
for build in before after; do
  bin=$before; [ "$build" = after ] && bin=$after
  run_sampled "$tmp/out" "$tmp/err" 240 "$bin" train configs/shakespeare.toml --backend cuda \
    --set train.max_steps=300 --set train.eval_interval=300 --run-dir "$tmp/run-$build"
  read -r tps loss < <(python3 -c 'import json, sys; s = json.load(open(sys.argv[1])); print(round(s["tokens_per_sec"], 1), round(s["val_loss"], 4))' "$tmp/run-$build/summary.json" 2>/dev/null)
  status=ok
  [ "$rc" != 0 ] && status="exit $rc: $(tail -1 "$tmp/err" | tr ',' ';' | cut -c1-100)"
  echo "train-300,$build,configs/shakespeare.toml,f32,0,16,128,${tps:-},${peak:-},${loss:-},$status" >> "$tmp/csv"
  echo "train-300 $build: ${tps:-?} tok/s, val loss ${loss:-?}, $status"
done
measure default-0.8M configs/shakespeare.toml f32 0 16 128
measure gpt2-small configs/bench/gpt2_small.toml f32 0 8 1024
measure gpt2-small configs/bench/gpt2_small.toml bf16 0 8 1024
measure tinyllama-1.1B-lora16 configs/bench/tinyllama_1b.toml f32 16 1 2048
measure tinyllama-1.1B-lora16 configs/bench/tinyllama_1b.toml bf16 16 1 2048
mv "$tmp/csv" "$out"
