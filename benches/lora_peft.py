"""The peer for `strata bench-train --lora-rank`: Hugging Face transformers + PEFT LoRA training
steps on random tokens, for a model shape from a Strata config, printed as one JSON line.

    python3 benches/lora_peft.py configs/bench/tinyllama_1b.toml --batch 1 --seq 1024 \
        --rank 16 --dtype f32|bf16 [--checkpointing]

Random base weights (memory and speed do not depend on their values), LoRA on q, k, v, o, gate,
up and down (α = 2r, as Strata's bench), AdamW on the adapters, loss on every position.
`peak_allocated_bytes` is torch.cuda.max_memory_allocated over the timed steps; the driver
(benches/lora_gpu.sh) also samples the process's device memory with nvidia-smi, the measure it
uses for both frameworks.
"""

import argparse
import json
import resource
import time
import tomllib

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

parser = argparse.ArgumentParser()
parser.add_argument("config")
parser.add_argument("--batch", type=int, default=1)
parser.add_argument("--seq", type=int, default=1024)
parser.add_argument("--rank", type=int, default=16)
parser.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
parser.add_argument("--checkpointing", action="store_true")
parser.add_argument("--warmup", type=int, default=2)
parser.add_argument("--steps", type=int, default=6)
parser.add_argument("--device", default="cuda", help="cuda, or cpu (with --threads)")
parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: PyTorch's default)")
args = parser.parse_args()

m = tomllib.load(open(args.config, "rb"))["model"]
config = LlamaConfig(
    vocab_size=m["vocab_size"], hidden_size=m["d_model"], intermediate_size=m["ffn_hidden"],
    num_hidden_layers=m["n_layers"], num_attention_heads=m["n_heads"],
    num_key_value_heads=m.get("n_kv_heads", m["n_heads"]), max_position_embeddings=m["max_seq_len"],
    rope_theta=m.get("rope_theta", 10000.0), tie_word_embeddings=m.get("tie_embeddings", True),
    attn_implementation="sdpa",
)
dtype = torch.float32 if args.dtype == "f32" else torch.bfloat16
cuda = args.device == "cuda"
if args.threads:
    torch.set_num_threads(args.threads)
torch.manual_seed(0)
with torch.device(args.device):
    model = LlamaForCausalLM(config).to(dtype)
if args.checkpointing:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=targets))
model.train()
trainable = [p for p in model.parameters() if p.requires_grad]
optimizer = torch.optim.AdamW(trainable, lr=1e-4)
tokens = args.batch * args.seq
times = []
for step in range(args.warmup + args.steps):
    if step == args.warmup and cuda:
        torch.cuda.reset_peak_memory_stats()
    ids = torch.randint(0, m["vocab_size"], (args.batch, args.seq), device=args.device)
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
    if step >= args.warmup:
        times.append(time.perf_counter() - start)
times.sort()
print(json.dumps({
    "framework": "peft", "dtype": args.dtype, "checkpointing": args.checkpointing,
    "batch_size": args.batch, "seq_len": args.seq, "lora_rank": args.rank,
    "trainable_params": sum(p.numel() for p in trainable),
    "tokens_per_sec": tokens / times[len(times) // 2], "median_step_secs": times[len(times) // 2],
    "peak_allocated_bytes": torch.cuda.max_memory_allocated() if cuda else None,
    "peak_reserved_bytes": torch.cuda.max_memory_reserved() if cuda else None,
    "peak_host_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "torch": torch.__version__, "device": args.device,
}))
