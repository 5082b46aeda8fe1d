"""benches/lora_gpu.sh's JSON lines (one or several files) → the lora_memory.csv table.

    python3 benches/lora_table.py GPU_TXT RUNS.jsonl [MORE.jsonl ...] > lora_memory.csv
"""

import json
import sys

gpu = open(sys.argv[1]).read().strip()
print("# LoRA r=16 on all seven projections, TinyLlama-1.1B shape, random base weights, random tokens.")
print("# dtype: activations, adapters and optimizer state; base_dtype: storage of the frozen weights.")
print("# peak_device_mib: nvidia-smi's memory.used sampled every 50 ms during the run (CUDA context")
print("# included, the same measure for both frameworks); torch_peak_allocated_mib: PyTorch's own")
print(f"# max_memory_allocated. GPU: {gpu}")
print("# first_step_secs: Strata's first step, kernel compilation included (the cold start).")
print("# call: the device call a row came from; rows ran one after another, calls 1-2 on one machine, 3-4 on")
print("# another, 5 on a third and 6 on a fourth, all of the same kind. Strata: the cuda feature without")
print("# fusion/autotune; calls 1-5 with attention composed of tracked tensor ops (commit c6fe1cf and")
print("# before), call 6 with the nn::fused attention op (commit c69d513).")
print("# head_chunk: positions per pass through the LM head and loss (0: all at once).")
print("# offload: the saved block inputs in host memory (Strata's -offload runs); PEFT keeps them on the device.")
print("run,framework,dtype,base_dtype,checkpointing,offload,head_chunk,batch,seq,tokens_per_sec,peak_device_mib,torch_peak_allocated_mib,peak_host_mib,first_step_secs,call,status")
for path in sys.argv[2:]:
    for line in open(path):
        d = json.loads(line)
        parts = d["label"].split("-")
        framework, dtype = parts[0], parts[1]
        batch, seq = parts[-2][1:], parts[-1][1:]
        checkpointing = "on" if "ckpt" in parts else "off"
        # Both frameworks: tokens of one step over the median step time.
        tps = f'{int(batch) * int(seq) / d["median_step_secs"]:.0f}' if "median_step_secs" in d else ""
        alloc = f'{d["peak_allocated_bytes"] / 2**20:.0f}' if "peak_allocated_bytes" in d else ""
        offload = "on" if "offload" in parts else "off"
        base_dtype = "bf16" if "bf16base" in parts else dtype
        head_chunk = d.get("head_chunk", 0) if framework == "strata" else ""
        host = f'{d["peak_host_mib"]:.0f}' if d.get("peak_host_mib") else ""
        first = f'{d["first_step_secs"]:.1f}' if "first_step_secs" in d else ""
        call = d.get("call", "")
        status = d.get("failed", "ok").replace(",", ";")
        print(f'{d["label"]},{framework},{dtype},{base_dtype},{checkpointing},{offload},{head_chunk},{batch},{seq},{tps},{d["peak_device_mib"]},{alloc},{host},{first},{call},{status}')
