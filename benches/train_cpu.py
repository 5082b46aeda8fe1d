"""CPU training throughput, Strata vs PyTorch, same shapes, same thread count, one invocation.

    cargo build --release -p strata-experiments
    pip install torch
    python benches/train_cpu.py            # writes benches/results/train_cpu.csv

Each row: forward + backward + AdamW step on random tokens, timed after warm-up steps. The two
frameworks run one after the other, never at the same time. Strata's thread count follows
RAYON_NUM_THREADS, PyTorch's torch.set_num_threads; both are set to --threads.
"""

import argparse
import csv
import datetime
import json
import os
import pathlib
import platform
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHAPES = {
    # name: (config, overrides)
    "default-0.8M": ("configs/shakespeare.toml", []),
    "d256-L6-4.8M": ("configs/shakespeare.toml", ["model.d_model=256", "model.n_layers=6", "model.n_heads=8",
                                                  "model.n_kv_heads=8", "model.ffn_hidden=688"]),
}


def cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_json(cmd, env):
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--backend", default="flex")
    ap.add_argument("--out", default=str(ROOT / "benches/results/train_cpu.csv"))
    args = ap.parse_args()
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
    strata = ROOT / "target/release/strata"
    rows = []
    for name, (config, overrides) in SHAPES.items():
        sets = [a for o in overrides for a in ("--set", o)]
        ours = run_json([str(strata), "bench-train", config, "--backend", args.backend, "--steps", str(args.steps), *sets], env)
        torch_ = run_json([sys.executable, "scripts/reference/train_torch.py", config, "--bench", "--steps", str(args.steps),
                           "--threads", str(args.threads), *[a for o in overrides for a in ("--set", o)]], env)
        rows.append({
            "date": datetime.date.today().isoformat(),
            "machine": f"{cpu_name()} ({os.cpu_count()} cores)",
            "threads": args.threads,
            "shape": name,
            "params": ours["params"],
            "batch_size": ours["batch_size"],
            "seq_len": ours["seq_len"],
            "strata_backend": ours["backend"],
            "strata_tokens_per_sec": round(ours["tokens_per_sec"], 1),
            "pytorch": torch_["torch"],
            "pytorch_tokens_per_sec": round(torch_["tokens_per_sec"], 1),
            "ratio_strata_over_pytorch": round(ours["tokens_per_sec"] / torch_["tokens_per_sec"], 3),
        })
        print(rows[-1], flush=True)
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
