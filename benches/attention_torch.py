"""PyTorch peers for `strata bench-attention`: one attention variant at one sequence length,
forward and forward + backward, timed (CUDA events on a GPU, the wall clock on the CPU; median of
--rounds after warm-up), printed as one CSV row in bench-attention's columns. `--dtype`
defaults to bf16 on the GPU and f32 on the CPU; `strata bench --suite attention` passes its
backend's. On the CPU (`--device cpu`) only sdpa runs and peak memory is not measured (NaN).

  sdpa      torch.nn.functional.scaled_dot_product_attention, causal (cuDNN / flash kernels)
  flex_bms  FlexAttention (torch.compile) with coord3d's block multi-scale mask as a block mask;
            checked first against SDPA with the same mask as a dense boolean matrix.

    python benches/attention_torch.py --variant flex_bms --seq 16384 [--block-len 128 --window 4]
"""

import argparse
import math
import os
import statistics
import time

import torch
import torch.nn.functional as F


def keeps(i, j, window):
    """coord3d's rule (framework/src/nn/coord3d.rs): does query block i read key block j?"""
    if j > i:
        return False
    d = i - j
    if d < window:
        return True
    level = (d // window).bit_length()
    return j % (1 << level) == 0


def keep_table(blocks, window, device):
    table = torch.zeros(blocks, blocks, dtype=torch.bool)
    for i in range(blocks):
        table[i, [j for j in range(i + 1) if keeps(i, j, window)]] = True
    return table.to(device)


def cpu_name():
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "cpu"


def median_ms(fn, rounds, cuda):
    for _ in range(3 if cuda else 2):
        fn()
    times = []
    for _ in range(rounds):
        if not cuda:
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--variant", choices=["sdpa", "flex_bms"], required=True)
    p.add_argument("--seq", type=int, required=True)
    p.add_argument("--block-len", type=int, default=128)
    p.add_argument("--window", type=int, default=4)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: PyTorch's default)")
    p.add_argument("--dtype", choices=["bf16", "f16", "f32"], default=None,
                   help="default: bf16 on the GPU, f32 on the CPU")
    args = p.parse_args()
    cuda = args.device == "cuda"
    if not cuda and args.variant != "sdpa":
        p.error("on the CPU only --variant sdpa runs")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype_name = args.dtype or ("bf16" if cuda else "f32")
    dev = args.device
    dtype = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[dtype_name]
    shape = (args.batch, args.heads, args.seq, args.head_dim)
    torch.manual_seed(0)
    q, k, v = (torch.randn(shape, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))

    if args.variant == "sdpa":
        attend = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
        block_len, window, check = 0, 0, float("nan")
    else:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        b = args.block_len
        table = keep_table(math.ceil(args.seq / b), args.window, dev)

        def bms(batch, head, q_idx, kv_idx):
            return (kv_idx <= q_idx) & table[q_idx // b, kv_idx // b]

        # _compile: evaluate the mask block by block instead of as one n×n tensor (128 GiB at 128k).
        mask = create_block_mask(bms, None, None, args.seq, args.seq, device=dev, BLOCK_SIZE=b,
                                 _compile=True)
        flex = torch.compile(flex_attention)
        attend = lambda q, k, v: flex(q, k, v, block_mask=mask)
        block_len, window = b, args.window
        # The same mask as a dense boolean matrix through SDPA, on the first 4k tokens.
        n = min(args.seq, 4096)
        with torch.no_grad():
            qs, ks, vs = (x[:, :, :n].detach() for x in (q, k, v))
            pos = torch.arange(n, device=dev)
            dense_mask = (pos[None, :] <= pos[:, None]) & table[pos[:, None] // b, pos[None, :] // b]
            want = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=dense_mask).float()
            small = create_block_mask(bms, None, None, n, n, device=dev, BLOCK_SIZE=b)
            got = flex(qs, ks, vs, block_mask=small).float()
            check = ((got - want).abs().max() / want.abs().max()).item()

    def forward():
        with torch.no_grad():
            attend(q, k, v)

    def forward_backward():
        out = attend(q, k, v)
        out.sum().backward()
        q.grad = k.grad = v.grad = None

    ms_fwd = median_ms(forward, args.rounds, cuda)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    ms_fwd_bwd = median_ms(forward_backward, args.rounds, cuda)
    peak_mib = torch.cuda.max_memory_allocated() / 2**20 if cuda else float("nan")
    name = torch.cuda.get_device_name() if cuda else cpu_name()
    print(
        f"torch_{args.variant},{args.seq},{block_len},0,{window},{args.batch},{args.heads},"
        f"{args.head_dim},{ms_fwd:.3f},{ms_fwd_bwd:.3f},{peak_mib:.1f},NaN,NaN,"
        f"torch-{torch.__version__}-{dtype_name},\"{name}, {os.cpu_count()} threads\",{check:.2e}"
    )


if __name__ == "__main__":
    main()
