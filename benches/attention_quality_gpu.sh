#!/usr/bin/env bash
# Validation loss at 4,096-token windows for dense attention, coord3d (block multi-scale) and the
# window alone, same model, data, seeds and tokens (configs/coord3d/quality.toml), on one GPU:
#   STRATA_BIN=target/cuda-plain/release/strata bash benches/attention_quality_gpu.sh OUT_DIR
# Needs data/shakespeare (README's corpus set-up). SEEDS="1 2" and STEPS set the runs. Keeps each
# run's metrics.csv and summary.json under OUT_DIR/runs/<variant>-s<seed>/ and writes
# OUT_DIR/attention_quality.csv.
set -u
out=${1:-benches/results}
bin=${STRATA_BIN:-target/cuda-plain/release/strata}
export CUDA_PATH=${CUDA_PATH:-/usr/local/cuda}
export LD_LIBRARY_PATH=$CUDA_PATH/lib64:${LD_LIBRARY_PATH:-}
work=$(mktemp -d)
mkdir -p "$out/runs"
for seed in ${SEEDS:-1}; do
  for variant in ${VARIANTS:-coord3d window dense}; do
    case $variant in
      dense) sets=();;
      coord3d) sets=(--set 'model.attention="coord3d"');;
      window) sets=(--set 'model.attention="coord3d"' --set model.coord3d_multiscale=false);;
    esac
    name=$variant-s$seed
    timeout "${RUN_TIMEOUT:-200}" "$bin" train configs/coord3d/quality.toml --backend cuda \
      "${sets[@]}" --set "name=\"coord3d-quality-$variant\"" --set "train.seed=$seed" \
      --set "train.max_steps=${STEPS:-400}" --set "train.eval_interval=$(( ${STEPS:-400} / 4 ))" \
      --run-dir "$work/$name" > "$work/$name.log" 2>&1
    echo "$name: exit $? $(tail -1 "$work/$name.log")"
    mkdir -p "$out/runs/$name"
    cp "$work/$name/metrics.csv" "$work/$name/summary.json" "$out/runs/$name/" 2>/dev/null
  done
done
python3 - "$out" <<'PY' | tee "$out/attention_quality.csv"
import csv, json, os, sys
out = sys.argv[1]
print("variant,seed,steps,tokens,val_loss,val_bits_per_byte,tokens_per_sec,wall_secs,status")
for name in sorted(os.listdir(os.path.join(out, "runs"))):
    run = os.path.join(out, "runs", name)
    variant, seed = name.rsplit("-s", 1)
    try:
        s = json.load(open(os.path.join(run, "summary.json")))
        print(f"{variant},{seed},{s['steps']},{s['tokens']},{s['val_loss']:.4f},"
              f"{s['val_bits_per_byte']:.4f},{s['tokens_per_sec']:.0f},{s['wall_secs']:.1f},finished")
    except (OSError, KeyError, ValueError):
        # An unfinished run: its last validation row.
        path = os.path.join(run, "metrics.csv")
        rows = [r for r in csv.DictReader(open(path)) if r["val_loss"]] if os.path.exists(path) else []
        last = rows[-1] if rows else {}
        print(f"{variant},{seed},{last.get('step', '')},{last.get('tokens', '')},"
              f"{last.get('val_loss', '')},,{last.get('tokens_per_sec', '')},"
              f"{last.get('elapsed_sec', '')},unfinished")
PY
