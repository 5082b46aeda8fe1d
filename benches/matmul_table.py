#!/usr/bin/env python3
"""Tables of `strata bench-matmul` JSON lines (benches/matmul_gpu.sh).

    python3 benches/matmul_table.py RAW.jsonl            # CSV: one row per kernel and product
    python3 benches/matmul_table.py RAW.jsonl --best cuda-bf16   # the fastest kernel's name

Each kernel's step total is the time of all the training step's projection products through
it (count × seconds, summed); a product the kernel refuses is counted at Burn's own kernel's
time, since that is what the linear layers fall back to, and the row says so.
"""
import csv
import json
import sys
from collections import defaultdict


def load(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip().startswith("{")]


def totals(records, backend):
    """{kernel: (step_secs, refused_products)} for one backend label."""
    rows = [r for r in records if r.get("backend") == backend and "kernel" in r]
    key = lambda r: (r["m"], r["k"], r["n"], r["product"])
    burn = {key(r): r["secs"] for r in rows if r["kernel"] == "burn" and "secs" in r}
    out = defaultdict(lambda: [0.0, 0])
    for r in rows:
        secs = r.get("secs", burn.get(key(r)))
        if secs is None:
            continue
        out[r["kernel"]][0] += r["count"] * secs
        out[r["kernel"]][1] += "secs" not in r
    return {k: tuple(v) for k, v in out.items()}


def main():
    records = load(sys.argv[1])
    if "--best" in sys.argv:
        backend = sys.argv[sys.argv.index("--best") + 1]
        best = min(totals(records, backend).items(), key=lambda kv: kv[1][0], default=None)
        print(best[0] if best else "burn")
        return
    w = csv.writer(sys.stdout)
    w.writerow(["backend", "kernel", "product", "m", "k", "n", "count", "ms", "tflops",
                "relative_rms_error", "error", "step_products_ms", "step_refused"])
    for backend in sorted({r["backend"] for r in records if "kernel" in r}):
        step = totals(records, backend)
        for r in records:
            if r.get("backend") != backend or "kernel" not in r:
                continue
            total, refused = step.get(r["kernel"], (None, None))
            w.writerow([backend, r["kernel"], r["product"], r["m"], r["k"], r["n"], r["count"],
                        f"{r['secs'] * 1e3:.3f}" if "secs" in r else "",
                        f"{r['tflops']:.1f}" if "tflops" in r else "",
                        f"{r['relative_rms_error']:.2e}" if "relative_rms_error" in r else "",
                        r.get("error", "")[:80],
                        f"{total * 1e3:.1f}" if total is not None else "", refused])


if __name__ == "__main__":
    main()
