"""The label of one benchmark row of train_gpu.jsonl, shared by gpu_table.py and
profile_table.py: Strata's backend plus its build and options, PyTorch's mode and attention."""


def strata_variant(r):
    """e.g. `cuda-f32+autotune+mixed-bf16`, `cuda-bf16+matmul=double_tma_mma`."""
    variant = r.get("backend", "cuda")
    if r.get("autotune") and "fusion" not in variant:
        variant += "+autotune"
    if r.get("matmul_kernel") not in (None, "burn"):
        variant += "+matmul=" + r["matmul_kernel"]
    if r.get("cublas_wait") == "host":
        variant += "+host-wait"
    if r.get("fused_adamw") is False:
        variant += "+adamw-tensor-ops"
    if r.get("softmax_kernel") is False:
        variant += "+softmax-tensor-ops"
    if r.get("mma_attention"):
        variant += "+mma-attention"
    if r.get("attention_passes") not in (None, 1):
        variant += f"+attention-passes={r['attention_passes']}"
    if r.get("elementwise_kernels") is False:
        variant += "+norm-gate-tensor-ops"
    if r.get("mixed_precision") == "bf16":
        variant += "+mixed-bf16"
    return variant


def torch_variant(r):
    return ("compile" if r.get("compile") else "eager") + "+" + r.get("attention", "sdpa")
