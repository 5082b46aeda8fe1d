"""Turns loss_gpu.jsonl (Strata's run summaries and train_torch.py's JSON lines, the default
config trained for its fixed step count on one GPU, one line per seed) into loss_gpu.csv."""
import csv
import json
import sys

out = csv.writer(sys.stdout)
out.writerow(["framework", "recipe", "seed", "steps", "final_train_loss", "val_loss", "val_bits_per_byte", "wall_secs"])
seeds = {}
for line in open(sys.argv[1]):
    if not line.strip():
        continue
    r = json.loads(line)
    framework = r.get("framework", "strata")
    seeds[framework] = seeds.get(framework, 0) + 1  # runs are written in seed order, 1 then 2
    recipe = "autocast bf16, f32 master weights" if framework == "pytorch" else "mixed_precision = bf16, f32 master weights"
    out.writerow([framework, recipe, seeds[framework], r["steps"], f"{r['final_train_loss']:.4f}",
                  f"{r['val_loss']:.4f}", f"{r['val_bits_per_byte']:.4f}", f"{r['wall_secs']:.1f}"])
