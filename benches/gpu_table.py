"""Turns benches/train_gpu.sh's JSON lines into train_gpu.csv: tokens/s, model FLOPs
utilisation against the measured bf16 matmul ceiling (all rows), ratio to PyTorch eager."""
import csv
import datetime
import json
import sys
import tomllib

from variant import strata_variant, torch_variant

raw, gpu_file, config = sys.argv[1:4]
# Any further arguments are the `--set key=value` pairs the runs were given (train.* sizes).
rows = [json.loads(line) for line in open(raw) if line.strip()]
name, driver, memory = [f.strip() for f in open(gpu_file).read().strip().split(",")]
gpu = f"{name} (driver {driver})"
m = tomllib.load(open(config, "rb"))["model"]
t = tomllib.load(open(config, "rb"))["train"]
for kv in sys.argv[4:]:
    if kv != "--set" and kv.startswith("train."):
        key, value = kv[len("train."):].split("=")
        t[key] = int(value)
d, L, V, F, T = m["d_model"], m["n_layers"], m["vocab_size"], m["ffn_hidden"], t["seq_len"]
kv_d = d * m.get("n_kv_heads", m["n_heads"]) // m["n_heads"]  # grouped-query k and v widths
heads = 1 if m.get("tie_embeddings", True) else 2
params = heads * V * d + L * (2 * d * d + 2 * d * kv_d + 3 * d * F + 2 * d) + d
flops_per_token = 6 * params + 12 * L * d * T  # PaLM's estimate, attention included
ceiling = next((r for r in rows if r["framework"] == "ceiling"), {})
eager = {r.get("dtype"): r["tokens_per_sec"] for r in rows
         if r["framework"] == "pytorch" and not r.get("compile") and r.get("attention") == "sdpa" and "tokens_per_sec" in r}
def note(r):
    if "failed" in r:
        return r["failed"]
    if r["framework"] == "strata" and "fusion" in r.get("backend", ""):
        return ("features cuda,fusion (Burn's kernel fusion and autotune); first step includes autotuning; "
                "same precision caveats as the unfused rows")
    build = ("features cuda,autotune (Burn's matmul autotuning; the first step includes it)"
             if r.get("autotune") else "no fusion or autotune")
    kernels = ("attention: the nn::fused op, its softmax one kernel each way; RMSNorm, SwiGLU, RoPE and "
               "(binaries from commit d5e71e9 on) the loss one kernel each way"
               if r.get("softmax_kernel") and r.get("elementwise_kernels") else
               "attention: the nn::fused op (before commit c69d513: composed ops keeping the n x n scores)")
    if r["framework"] == "strata" and r.get("mixed_precision") == "bf16":
        return ("train.mixed_precision = bf16: sub-layers and LM head compute in bf16; parameters, gradients, "
                f"AdamW state, residual stream, norms and loss in f32; {kernels}; {build}")
    if r["framework"] == "strata":
        return f"parameters, activations and AdamW state all in this dtype; {kernels}; {build}"
    return "autocast bf16, f32 master weights" if r.get("dtype") == "bf16" else "f32, tf32 off"


def peak_gib(r):
    """PyTorch: max_memory_allocated; Strata: nvidia-smi's memory.used above its value at start."""
    if "peak_memory_gib" in r:
        return f"{r['peak_memory_gib']:.1f}"
    return f"{r['peak_device_mib'] / 1024:.1f}" if r.get("peak_device_mib") else ""


out = csv.writer(sys.stdout)
out.writerow(["date", "gpu", "framework", "variant", "dtype", "batch_size", "seq_len", "tokens_per_sec",
              "mfu_vs_bf16_ceiling", "ratio_to_pytorch_eager_same_dtype", "first_step_secs", "peak_memory_gib", "note"])
for r in rows:
    if r["framework"] == "ceiling":
        continue
    if r["framework"] == "strata":
        variant, dtype = strata_variant(r), r.get("backend", "cuda-f32").split("-")[-1]
        if r.get("mixed_precision") == "bf16":
            dtype = "bf16"
    else:
        variant = torch_variant(r) if "failed" not in r else r["failed"]
        dtype = r.get("dtype", "")
    tps = r.get("tokens_per_sec")
    peak = ceiling.get("bf16_flops")
    mfu = f"{tps * flops_per_token / peak:.3f}" if tps and peak else ""
    ratio = f"{tps / eager[dtype]:.3f}" if tps and dtype in eager else ""
    out.writerow([datetime.date.today().isoformat(), gpu, r["framework"], variant, dtype, t["batch_size"], T,
                  f"{tps:.0f}" if tps else "", mfu, ratio, f"{r.get('first_step_secs', 0):.1f}",
                  peak_gib(r), note(r)])
