"""PyTorch reference for Strata's default run: the same Llama-style model, byte tokens, data
split, optimizer, schedule and validation windows, trained for a given wall time.

    pip install torch
    python scripts/reference/train_torch.py configs/shakespeare.toml --seconds 600 --threads 2
    python scripts/reference/train_torch.py configs/shakespeare.toml --bench --steps 10   # throughput only

Prints one JSON line. With --seconds, the step count is fixed up front from the measured speed
of the first steps, so that the cosine schedule ends when the time is up.
"""

import argparse
import csv
import json
import os
import resource
import math
import pathlib
import platform
import time
import tomllib

import torch
import torch.nn as nn
import torch.nn.functional as F

BOS, EOS = 256, 257
NAIVE_ATTENTION = False


class RMSNorm(nn.Module):
    def __init__(self, d, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_tables(head_dim, max_len, theta):
    inv = theta ** (-torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.outer(torch.arange(max_len).float(), inv)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def rotate(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Block(nn.Module):
    def __init__(self, m):
        super().__init__()
        d, self.h, self.kv = m["d_model"], m["n_heads"], m["n_kv_heads"]
        self.hd = d // self.h
        self.attn_norm, self.mlp_norm = RMSNorm(d, m["norm_eps"]), RMSNorm(d, m["norm_eps"])
        self.wq = nn.Linear(d, self.h * self.hd, bias=False)
        self.wk = nn.Linear(d, self.kv * self.hd, bias=False)
        self.wv = nn.Linear(d, self.kv * self.hd, bias=False)
        self.wo = nn.Linear(self.h * self.hd, d, bias=False)
        self.gate = nn.Linear(d, m["ffn_hidden"], bias=False)
        self.up = nn.Linear(d, m["ffn_hidden"], bias=False)
        self.down = nn.Linear(m["ffn_hidden"], d, bias=False)

    def forward(self, x, cos, sin):
        b, t, _ = x.shape
        h = self.attn_norm(x)
        q = self.wq(h).view(b, t, self.h, self.hd).transpose(1, 2)
        k = self.wk(h).view(b, t, self.kv, self.hd).transpose(1, 2)
        v = self.wv(h).view(b, t, self.kv, self.hd).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        rep = self.h // self.kv
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        if NAIVE_ATTENTION:
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.hd)
            scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
            a = scores.softmax(-1) @ v
        else:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.wo(a.transpose(1, 2).reshape(b, t, -1))
        h = self.mlp_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class Llama(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.embed = nn.Embedding(m["vocab_size"], m["d_model"])
        self.blocks = nn.ModuleList(Block(m) for _ in range(m["n_layers"]))
        self.norm = RMSNorm(m["d_model"], m["norm_eps"])
        # An untied LM head (TinyLlama's shape) is its own [vocab, d_model] matrix.
        self.head = None if m.get("tie_embeddings", True) else nn.Linear(m["d_model"], m["vocab_size"], bias=False)
        cos, sin = rope_tables(m["d_model"] // m["n_heads"], m["max_seq_len"], m["rope_theta"])
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        std = m.get("init_std", 0.02)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                scaled = name.endswith(("wo.weight", "down.weight"))
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * m["n_layers"]) if scaled else std)

    def forward(self, idx):
        t = idx.shape[1]
        x = self.embed(idx)
        cos, sin = self.cos[:t], self.sin[:t]
        for block in self.blocks:
            x = block(x, cos, sin)
        head = self.embed if self.head is None else self.head
        return self.norm(x) @ head.weight.T


def wildcard(pattern, name):
    import fnmatch
    return fnmatch.fnmatchcase(name, pattern)


def load_tokens(data, split):
    root = pathlib.Path(data["path"])
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    include = data.get("include", [])
    if include:
        files = [f for f in files if any(wildcard(p, f.name) for p in include)]
    held = set(data.get("validation", []))
    ids, text_bytes = [], 0
    for f in files:
        if (f.name in held) == (split == "val"):
            raw = f.read_bytes()
            ids += [BOS] + list(raw) + [EOS]
            text_bytes += len(raw)
    return torch.tensor(ids, dtype=torch.long), text_bytes


def lr_at(step, warmup, total, peak, floor):
    if step < warmup:
        return peak * (step + 1) / warmup
    if step >= total:
        return floor
    p = (step - warmup) / max(1, total - warmup)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * p))


def make_optimizer(model, t):
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and not n.startswith("embed")]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and not n.startswith("embed"))]
    groups = [{"params": decay, "weight_decay": t.get("weight_decay", 0.1)}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=t["lr"], betas=(t.get("beta1", 0.9), t.get("beta2", 0.95)), eps=t.get("eps", 1e-8))


def projection_gemms(m, rows, dtype, device):
    """Each projection's three products (x·W, dY·Wᵀ, Xᵀ·dY) at one step's rows, timed alone
    (CUDA events on a GPU; median of 10): the same shapes `strata bench-train --profile` times."""
    d, hd = m["d_model"], m["d_model"] // m["n_heads"]
    q, kv, f, layers = m["n_heads"] * hd, m["n_kv_heads"] * hd, m["ffn_hidden"], m["n_layers"]
    shapes = {}
    for d_in, d_out, count in [(d, q, 2 * layers), (d, kv, 2 * layers), (d, f, 2 * layers), (f, d, layers), (d, m["vocab_size"], 1)]:
        shapes[(d_in, d_out)] = shapes.get((d_in, d_out), 0) + count

    def timed(fn):
        for _ in range(2):
            fn()
        out = []
        for _ in range(10):
            if device.type == "cuda":
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record(); fn(); e.record(); torch.cuda.synchronize()
                out.append(s.elapsed_time(e) / 1e3)
            else:
                start = time.perf_counter(); fn(); out.append(time.perf_counter() - start)
        return sorted(out)[len(out) // 2]

    gemms, total, flops = [], 0.0, 0.0
    for (d_in, d_out), count in shapes.items():
        x = torch.randn(rows, d_in, device=device, dtype=dtype)
        w = torch.randn(d_in, d_out, device=device, dtype=dtype)
        dy = torch.randn(rows, d_out, device=device, dtype=dtype)
        g = {"rows": rows, "d_in": d_in, "d_out": d_out, "count": count,
             "forward_secs": timed(lambda: x @ w), "grad_input_secs": timed(lambda: dy @ w.t()),
             "grad_weight_secs": timed(lambda: x.t() @ dy)}
        gemms.append(g)
        total += count * (g["forward_secs"] + g["grad_input_secs"] + g["grad_weight_secs"])
        flops += count * 3 * 2 * rows * d_in * d_out
    return {"gemm_dtype": str(dtype), "gemm_secs": total, "gemm_flops": flops, "gemms": gemms}


def kernel_trace(prof, steps, path):
    """GPU kernels of a torch.profiler run summed by name per step, written to `path` as CSV
    (kernel, launches_per_step, ms_per_step, share_of_kernel_time); returns the kernel and busy
    time per step (the union of the kernels' intervals) and the launches per step."""
    runs = [(e.name, e.time_range.start, e.time_range.end) for e in prof.events()
            if e.device_type == torch.autograd.DeviceType.CUDA and not e.name.startswith("Memcpy")
            and not e.name.startswith("Memset")]
    by_name = {}
    for name, start, end in runs:
        launches, us = by_name.get(name, (0, 0.0))
        by_name[name] = (launches + 1, us + end - start)
    total = sum(us for _, us in by_name.values()) / 1e3 / steps
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        out = csv.writer(f, lineterminator="\n")
        out.writerow(["kernel", "launches_per_step", "ms_per_step", "share_of_kernel_time"])
        for name, (launches, us) in sorted(by_name.items(), key=lambda kv: -kv[1][1]):
            out.writerow([name, f"{launches / steps:.1f}", f"{us / 1e3 / steps:.3f}", f"{us / 1e3 / steps / total:.4f}"])
    os.replace(tmp, path)
    busy, current = 0.0, None
    for start, end in sorted((s, e) for _, s, e in runs):
        if current and start <= current[1]:
            current = (current[0], max(current[1], end))
        else:
            busy += current[1] - current[0] if current else 0.0
            current = (start, end)
    busy += current[1] - current[0] if current else 0.0
    return {"kernel_ms_per_step": total, "gpu_busy_ms_per_step": busy / 1e3 / steps,
            "launches_per_step": len(runs) / steps}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-steps", type=int, help="train exactly this many steps (the config's schedule) instead of --seconds")
    ap.add_argument("--bench", action="store_true", help="time steps on random tokens, no data")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--set", action="append", default=[], help="key.path=value (numbers only)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16"], help="bf16: autocast, f32 master weights")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--naive-attention", action="store_true", help="materialise the n×n scores (no SDPA)")
    ap.add_argument("--profile", action="store_true",
                    help="with --bench: time forward, backward and optimizer apart, and the step's projection products alone")
    ap.add_argument("--kernel-trace", metavar="CSV",
                    help="with --bench on CUDA: the timed steps' GPU kernels summed by name (torch.profiler), as "
                         "`strata bench-train --kernel-trace` writes them")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = tomllib.loads(pathlib.Path(args.config).read_text())
    for kv in args.set:
        key, value = kv.split("=", 1)
        section, name = key.split(".", 1)
        cfg.setdefault(section, {})[name] = type(cfg.get(section, {}).get(name, 0.0))(float(value)) if value.replace(".", "").replace("e-", "").isdigit() else value
    # Strata's defaults for keys a config leaves out (framework/src/model/llama.rs, train/mod.rs).
    m = {"vocab_size": 259, "d_model": 256, "n_layers": 4, "n_heads": 4, "ffn_hidden": 688,
         "max_seq_len": 256, "rope_theta": 10000.0, "norm_eps": 1e-5, "tie_embeddings": True, "init_std": 0.02,
         **cfg.get("model", {})}
    m.setdefault("n_kv_heads", m["n_heads"])
    t = {"seed": 1337, "batch_size": 16, "seq_len": 128, "lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 100,
         "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "grad_clip": 1.0, "eval_batches": 20,
         **cfg.get("train", {})}
    torch.manual_seed(t.get("seed", 1337))
    global NAIVE_ATTENTION
    NAIVE_ATTENTION = args.naive_attention
    device = torch.device(args.device)
    model = Llama(m).to(device)
    opt = make_optimizer(model, t)
    bsz, seq = t["batch_size"], t["seq_len"]
    fwd = torch.compile(model) if args.compile else model
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    info = {"framework": "pytorch", "torch": torch.__version__, "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "dtype": args.dtype, "compile": args.compile, "attention": "naive" if args.naive_attention else "sdpa",
            "params": sum(p.numel() for p in model.parameters()), "batch_size": bsz, "seq_len": seq,
            "machine": platform.processor() or platform.machine()}

    def step(x, y, lr):
        for g in opt.param_groups:
            g["lr"] = lr
        with autocast:
            loss = F.cross_entropy(fwd(x).reshape(-1, m["vocab_size"]).float(), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.get("grad_clip", 1.0))
        opt.step()
        return loss.item()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def profiled_step(x, y, lr):
        """step() with the device finished at each mark: forward (with the loss), backward,
        optimizer (clipping included), each timed alone, as `strata bench-train --profile`."""
        for g in opt.param_groups:
            g["lr"] = lr
        marks = [time.perf_counter()]
        with autocast:
            loss = F.cross_entropy(fwd(x).reshape(-1, m["vocab_size"]).float(), y.reshape(-1))
        sync(); marks.append(time.perf_counter())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sync(); marks.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.get("grad_clip", 1.0))
        opt.step()
        loss.item()
        marks.append(time.perf_counter())
        return [b - a for a, b in zip(marks, marks[1:])]

    if args.bench:
        times, phases = [], []
        tracer = None
        for i in range(args.warmup + args.steps):
            if args.kernel_trace and i == args.warmup:
                tracer = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
                tracer.__enter__()
            x = torch.randint(0, m["vocab_size"], (bsz, seq), device=device)
            start = time.perf_counter()
            step(x, x, 1e-4)  # .item() waits for the device
            elapsed = time.perf_counter() - start
            if args.profile and i >= args.warmup:
                phases.append(profiled_step(x, x, 1e-4))
            if i == 0:
                info["first_step_secs"] = elapsed
            if i >= args.warmup:
                times.append(elapsed)
        if tracer is not None:
            tracer.__exit__(None, None, None)
            info.update(kernel_trace(tracer, args.steps, args.kernel_trace))
        info.update(tokens_per_sec=bsz * seq * args.steps / sum(times), steps=args.steps,
                    median_step_secs=sorted(times)[len(times) // 2])
        if device.type == "cuda":
            info["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        if args.profile:
            med = lambda xs: sorted(xs)[len(xs) // 2]
            info["profile"] = {"forward_secs": med([p[0] for p in phases]),
                               "backward_secs": med([p[1] for p in phases]),
                               "optimizer_secs": med([p[2] for p in phases]),
                               **projection_gemms(m, bsz * seq, torch.bfloat16 if args.dtype == "bf16" else torch.float32, device)}
        print(json.dumps(info))
        return

    train, _ = load_tokens(cfg["data"], "train")
    val, val_bytes = load_tokens(cfg["data"], "val")
    gen = torch.Generator().manual_seed(t.get("seed", 1337))

    def batch():
        starts = torch.randint(0, len(train) - seq - 1, (bsz,), generator=gen)
        w = torch.stack([train[s:s + seq + 1] for s in starts.tolist()]).to(device)
        return w[:, :-1], w[:, 1:]

    start = time.perf_counter()
    # The step count is fixed up front (the cosine schedule ends with the time), from the speed
    # of the steps after the 10th during the first 5 % of the time (30 steps at least): the
    # first steps are slower (allocation, thread start-up), and a 20-step probe under-estimated
    # the speed by ~10 %, ending runs early.
    probe_secs, settle = 0.05 * args.seconds, 10
    horizon = args.max_steps or 10**9
    probe = 0
    while probe < 30 or (not args.max_steps and time.perf_counter() - start < probe_secs):
        if probe == settle:
            settled = time.perf_counter()
        x, y = batch()
        step(x, y, lr_at(probe, t.get("warmup_steps", 100), horizon, t["lr"], t.get("min_lr", 0.0)))
        probe += 1
    per_step = (time.perf_counter() - settled) / (probe - settle)
    total = probe + int((args.seconds - (time.perf_counter() - start)) / per_step)
    if args.max_steps:
        total = args.max_steps
    for i in range(probe, total):
        x, y = batch()
        loss = step(x, y, lr_at(i, t.get("warmup_steps", 100), total, t["lr"], t.get("min_lr", 0.0)))
    wall = time.perf_counter() - start

    # The same evenly spaced validation windows Strata uses.
    model.eval()
    windows = t.get("eval_batches", 20) * bsz
    span = len(val) - seq - 1
    starts = [i * span // windows for i in range(windows)]
    with torch.no_grad(), autocast:
        losses = []
        for c in range(0, windows, bsz):
            w = torch.stack([val[s:s + seq + 1] for s in starts[c:c + bsz]]).to(device)
            logits = model(w[:, :-1]).reshape(-1, m["vocab_size"]).float()
            losses.append(F.cross_entropy(logits, w[:, 1:].reshape(-1)).item())
    val_loss = sum(losses) / len(losses)
    bytes_per_token = val_bytes / len(val)
    info["peak_host_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    info.update(steps=total, wall_secs=wall, final_train_loss=loss, val_loss=val_loss,
                val_bits_per_byte=val_loss / math.log(2) / bytes_per_token,
                tokens_per_sec=total * bsz * seq / wall)
    print(json.dumps(info))


if __name__ == "__main__":
    main()
