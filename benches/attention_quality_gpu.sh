#!/usr/bin/env bash
# Validation loss at 4,096-token windows for dense attention, coord3d (block multi-scale) and the
# window alone, same model, data, seed and tokens (configs/coord3d/quality.toml), on one GPU:
#   STRATA_BIN=target/cuda-plain/release/strata bash benches/attention_quality_gpu.sh OUT_DIR
# Needs data/shakespeare (README's corpus set-up). Writes OUT_DIR/runs/<variant>/ (metrics.csv,
# summary.json) and OUT_DIR/attention_quality.csv.
set -u
out=${1:-benches/results}
bin=${STRATA_BIN:-target/cuda-plain/release/strata}
export CUDA_PATH=${CUDA_PATH:-/usr/local/cuda}
export LD_LIBRARY_PATH=$CUDA_PATH/lib64:${LD_LIBRARY_PATH:-}
mkdir -p "$out/runs"
for variant in ${VARIANTS:-coord3d window dense}; do
  case $variant in
    dense) sets=();;
    coord3d) sets=(--set 'model.attention="coord3d"');;
    window) sets=(--set 'model.attention="coord3d"' --set model.coord3d_multiscale=false);;
  esac
  rm -rf "$out/runs/$variant"
  timeout "${RUN_TIMEOUT:-200}" "$bin" train configs/coord3d/quality.toml --backend cuda \
    "${sets[@]}" --set "name=\"coord3d-quality-$variant\"" --run-dir "$out/runs/$variant" \
    > "$out/runs/$variant.log" 2>&1
  echo "$variant: exit $? $(tail -1 "$out/runs/$variant.log")"
done
python3 - "$out" <<'PY' | tee "$out/attention_quality.csv"
import csv, json, os, sys
out = sys.argv[1]
print("variant,steps,tokens,val_loss,val_bits_per_byte,tokens_per_sec,wall_secs,status")
for variant in ["dense", "coord3d", "window"]:
    run = os.path.join(out, "runs", variant)
    try:
        s = json.load(open(os.path.join(run, "summary.json")))
        print(f"{variant},{s['steps']},{s['tokens']},{s['val_loss']:.4f},{s['val_bits_per_byte']:.4f},"
              f"{s['tokens_per_sec']:.0f},{s['wall_secs']:.1f},finished")
    except (OSError, KeyError, ValueError):
        # An unfinished run: its last validation row.
        rows = [r for r in csv.DictReader(open(os.path.join(run, "metrics.csv"))) if r["val_loss"]] \
            if os.path.exists(os.path.join(run, "metrics.csv")) else []
        last = rows[-1] if rows else {}
        print(f"{variant},{last.get('step', '')},{last.get('tokens', '')},{last.get('val_loss', '')},,"
              f"{last.get('tokens_per_sec', '')},{last.get('elapsed_sec', '')},unfinished")
PY
