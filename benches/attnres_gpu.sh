#!/usr/bin/env bash
# Training throughput and peak GPU memory of each mode of the GPU Attention Residuals comparison
# (configs/attnres/gpu_*.toml), each measured alone on the GPU, then of K standard runs sharing
# it (to plan how many comparison runs to train at once). Run on the GPU machine from the repo
# root with the CUDA environment of README.md:
#     benches/attnres_gpu.sh STRATA_BINARY OUT_DIR [K]
# Writes OUT_DIR/attnres_gpu.jsonl (one line per measurement, machine included).
set -uo pipefail
bin=$1
out=$2
k=${3:-5}
mkdir -p "$out"
gpu=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1)

# Peak of the GPU's used memory while $@ runs, above what was in use before it started (MiB).
measure() {
    local log=$1; shift
    local before
    before=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 250 >"$log.mem" &
    local smi=$!
    "$@"
    local status=$?
    kill $smi 2>/dev/null
    wait $smi 2>/dev/null
    echo $(( $(sort -n "$log.mem" | tail -1) - before )) >"$log.peak"
    return $status
}

alone() {
    local mode=$1
    local log=$out/alone_$mode
    measure "$log" "$bin" bench-train "configs/attnres/gpu_$mode.toml" --backend cuda \
        --warmup 3 --steps 15 >"$log.json" 2>"$log.err"
    python3 - "$log" "$mode" "$gpu" >>"$out/attnres_gpu.jsonl" <<'PY'
import json, sys
log, mode, gpu = sys.argv[1:]
try:
    row = json.load(open(log + ".json"))
except Exception as e:
    row = {"error": str(e), "stderr": open(log + ".err").read()[-500:]}
row.update(mode=mode, concurrent=1, peak_gpu_mib=int(open(log + ".peak").read()), gpu=gpu)
print(json.dumps(row))
PY
    tail -n 1 "$out/attnres_gpu.jsonl"
}

# The first run compiles and autotunes (the cold start, in its first_step_secs); the rest reuse
# the kernel cache of cubecl.toml.
alone standard

# K standard runs at once: per-run and total throughput when the comparison shares the GPU.
pids=()
for i in $(seq 1 "$k"); do
    "$bin" bench-train configs/attnres/gpu_standard.toml --backend cuda --warmup 3 --steps 15 \
        --set train.seed="$i" >"$out/shared_$i.json" 2>"$out/shared_$i.err" &
    pids+=($!)
done
wait "${pids[@]}"
python3 - "$out" "$k" "$gpu" >>"$out/attnres_gpu.jsonl" <<'PY'
import json, sys
out, k, gpu = sys.argv[1], int(sys.argv[2]), sys.argv[3]
rates = []
for i in range(1, k + 1):
    try:
        rates.append(json.load(open(f"{out}/shared_{i}.json"))["tokens_per_sec"])
    except Exception:
        pass
print(json.dumps({"mode": "standard", "concurrent": k, "finished": len(rates),
                  "tokens_per_sec_each": rates, "tokens_per_sec_total": sum(rates), "gpu": gpu}))
PY
tail -n 1 "$out/attnres_gpu.jsonl"

for mode in block full rescaled seq_block; do
    alone "$mode"
done
