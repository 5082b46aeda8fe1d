"""The per-step split of benches/train_gpu.sh's --profile runs (train_gpu.jsonl) as CSV:
forward, backward and optimizer, each timed alone; the step's projection products timed alone
(the matmul floor with that framework's matmul); dense attention's forward and backward timed
alone (Strata); and what is left of forward + backward (normalisation, element-wise ops, the
loss, embedding, launches and host overhead)."""
import csv
import json
import sys

from variant import strata_variant, torch_variant

rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
out = csv.writer(sys.stdout)
out.writerow(["framework", "variant", "compute_dtype", "step_ms", "forward_ms", "backward_ms", "optimizer_ms",
              "projection_gemm_ms", "gemm_tflops", "attention_ms", "rest_of_forward_backward_ms"])
ms = lambda s: f"{s * 1e3:.1f}" if s is not None else ""
for r in rows:
    p = r.get("profile")
    if not p:
        continue
    if r["framework"] == "strata":
        variant = strata_variant(r)
    else:
        variant = torch_variant(r) + "-" + r["dtype"]
    fwd_bwd = p["forward_secs"] + p["backward_secs"]
    attention = p.get("attention_secs")
    rest = fwd_bwd - p["gemm_secs"] - (attention or 0.0)
    out.writerow([r["framework"], variant, p["gemm_dtype"].replace("torch.", "").lower(),
                  ms(r["median_step_secs"]), ms(p["forward_secs"]), ms(p["backward_secs"]), ms(p["optimizer_secs"]),
                  ms(p["gemm_secs"]), f"{p['gemm_flops'] / p['gemm_secs'] / 1e12:.0f}", ms(attention), ms(rest)])
