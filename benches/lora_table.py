"""benches/lora_gpu.sh's JSON lines (one or several files) → the lora_memory.csv table.

    python3 benches/lora_table.py GPU_TXT RUNS.jsonl [MORE.jsonl ...] > lora_memory.csv
"""

import json
import sys

gpu = open(sys.argv[1]).read().strip()
print("# LoRA r=16 on all seven projections, TinyLlama-1.1B shape, random base weights, random tokens.")
print("# peak_device_mib: nvidia-smi's memory.used sampled every 50 ms during the run (CUDA context")
print("# included, the same measure for both frameworks); torch_peak_allocated_mib: PyTorch's own")
print(f"# max_memory_allocated. GPU: {gpu}")
print("# offload: Strata's checkpointed runs keep the saved block inputs in host memory; PEFT keeps them on the device.")
print("run,framework,dtype,checkpointing,offload,batch,seq,tokens_per_sec,peak_device_mib,torch_peak_allocated_mib,peak_host_mib,status")
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
        offload = "on" if d.get("offload_activations") else "off"
        host = f'{d["peak_host_mib"]:.0f}' if d.get("peak_host_mib") else ""
        status = d.get("failed", "ok").replace(",", ";")
        print(f'{d["label"]},{framework},{dtype},{checkpointing},{offload},{batch},{seq},{tps},{d["peak_device_mib"]},{alloc},{host},{status}')
