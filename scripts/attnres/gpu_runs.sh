#!/usr/bin/env bash
# Trains several runs of the GPU Attention Residuals comparison at once on one GPU, then packs
# what the report reads (metrics, summaries, depth profiles, configs, logs; no checkpoints) into
# OUT/attnres-gpu-runs-TAG.tar.gz. Each run is MODE:SEED or MODE:SEED:STEPS, MODE naming
# configs/attnres/gpu_MODE.toml; a run with its own STEPS is named "<config name>-<STEPS>steps".
# Runs that would outlast LIMIT seconds are stopped, and their partial metrics still come back.
#     scripts/attnres/gpu_runs.sh STRATA_BINARY OUT TAG STEPS LIMIT MODE:SEED[:STEPS]...
set -uo pipefail
bin=$1 out=$2 tag=$3 steps=$4 limit=$5
shift 5
mkdir -p runs/attnres-gpu "$out"
pids=()
start=$(date +%s)
first=1
for spec in "$@"; do
    IFS=: read -r mode seed own <<<"$spec"
    dir=runs/attnres-gpu/$mode-s$seed${own:+-${own}steps}
    rm -rf "$dir"
    extra=()
    if [ -n "$own" ]; then
        name=$(sed -n 's/^name = "\(.*\)"/\1/p' "configs/attnres/gpu_$mode.toml")
        extra=(--set "name=$name-${own}steps")
    fi
    left=$((limit - ($(date +%s) - start)))
    timeout "$left" "$bin" train "configs/attnres/gpu_$mode.toml" --backend cuda \
        --set train.seed="$seed" --set train.max_steps="${own:-$steps}" "${extra[@]}" \
        --run-dir "$dir" >"$dir.log" 2>&1 &
    pids+=($!)
    if [ $first = 1 ]; then
        # Let the first run compile and autotune its kernels into the cache (cubecl.toml) before
        # the others start and read it: its first logged step marks that.
        first=0
        for _ in $(seq 1 120); do
            [ "$(wc -l <"$dir/metrics.csv" 2>/dev/null || echo 0)" -ge 2 ] && break
            sleep 3
        done
        echo "$(date +%T) first run past its first step after $(($(date +%s) - start)) s"
    fi
done
while sleep 60; do
    alive=0
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=$((alive + 1)); done
    echo "$(date +%T) running: $alive; $(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader)"
    for spec in "$@"; do
        IFS=: read -r mode seed own <<<"$spec"
        f=runs/attnres-gpu/$mode-s$seed${own:+-${own}steps}/metrics.csv
        [ -f "$f" ] && echo "  $mode s$seed: $(tail -n 1 "$f" | cut -d, -f1,4,5,7)"
    done
    [ "$alive" -eq 0 ] && break
done
wait
tar -C runs -czf "$out/attnres-gpu-runs-$tag.tar.gz" --exclude checkpoints attnres-gpu
ls -la "$out"
