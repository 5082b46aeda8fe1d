"""The measured matmul ceiling MFU is quoted against: an 8192³ product on random data, bf16 and
tf32, CUDA events around 10 repetitions after 3 warm-up ones. Prints one JSON line."""
import json

import torch


def rate(dtype, n=8192, reps=10):
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    for _ in range(3):
        a @ b
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(reps):
        a @ b
    e.record()
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (s.elapsed_time(e) / 1e3)


torch.backends.cuda.matmul.allow_tf32 = True
print(json.dumps({"framework": "ceiling", "bf16_flops": rate(torch.bfloat16), "tf32_flops": rate(torch.float32)}))
