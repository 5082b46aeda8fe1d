"""benches/attention_gpu.sh's raw rows → the attention_gpu.csv table, with each row's time as a
ratio to PyTorch SDPA and to FlexAttention on the same BMS mask at the same length.

    python3 benches/attention_table.py GPU_TXT RAW.csv [MORE_RAW.csv ...] > attention_gpu.csv

Several raw files are several device calls (numbered in order in the `call` column); a row that
failed in one call and ran in another keeps only the run.
"""

import csv
import sys

COLUMNS = ("variant,seq_len,block_len,summaries,window,batch,heads,head_dim,ms_fwd,ms_fwd_bwd,"
           "peak_mib,time_vs_dense,memory_vs_dense,backend,machine,max_rel_err_vs_masked").split(",")

gpu = open(sys.argv[1]).read().strip()
rows, failed = [], []
for call, path in enumerate(sys.argv[2:], start=1):
    for record in csv.reader(open(path)):
        label, peak = record[0], record[1]
        if record[2].startswith("FAILED"):
            failed.append((label, peak, record[2], call))
            continue
        row = dict(zip(COLUMNS, record[2:]))
        row["peak_device_mib"] = peak
        row["call"] = str(call)
        rows.append(row)
ran = {(r["variant"], r["seq_len"]) for r in rows}
failed = [f for f in failed if (f[0].split("-")[1].replace("flex_bms", "torch_flex_bms")
                                .replace("sdpa", "torch_sdpa"), f[0].rsplit("-", 1)[1]) not in ran]
rows.sort(key=lambda r: (int(r["seq_len"]), r["variant"]))


def find(variant, seq):
    return next((r for r in rows if r["variant"] == variant and r["seq_len"] == seq), None)


def ratio(row, peer, key):
    if peer is None:
        return "NaN"
    try:
        return f"{float(row[key]) / float(peer[key]):.3f}"
    except (ValueError, ZeroDivisionError):
        return "NaN"


print(f"# One attention layer's mixing, bf16, causal; GPU: {gpu}")
print("# peak_device_mib: nvidia-smi memory.used sampled every 50 ms over the whole process (CUDA context,")
print("# the forward-only and the forward+backward runs); Strata: the cuda feature without fusion/autotune.")
print("# coord3d / torch_flex_bms: block multi-scale mask, block_len tokens per block, window blocks;")
print("# max_rel_err_vs_masked: max |gathered - dense masked| / max |dense masked| on the first 2,048")
print("# (Strata) or 4,096 (Flex, against SDPA with the boolean mask) tokens.")
print("# NaN times on cuda: the scores would exceed 2^32 elements, past CubeCL's 32-bit indexing (not run).")
print("variant,seq_len,block_len,window,batch,heads,head_dim,ms_fwd,ms_fwd_bwd,peak_device_mib,"
      "fwd_vs_sdpa,fwd_bwd_vs_sdpa,fwd_vs_flex,fwd_bwd_vs_flex,max_rel_err_vs_masked,backend,call,status")
for row in rows:
    sdpa, flex = find("torch_sdpa", row["seq_len"]), find("torch_flex_bms", row["seq_len"])
    print(",".join([
        row["variant"], row["seq_len"], row["block_len"], row["window"], row["batch"], row["heads"],
        row["head_dim"], row["ms_fwd"], row["ms_fwd_bwd"], row["peak_device_mib"],
        ratio(row, sdpa, "ms_fwd"), ratio(row, sdpa, "ms_fwd_bwd"),
        ratio(row, flex, "ms_fwd"), ratio(row, flex, "ms_fwd_bwd"),
        row["max_rel_err_vs_masked"], row["backend"], row["call"],
        "ok" if row["ms_fwd"] != "NaN" else "not run",
    ]))
for label, peak, why, call in failed:
    variant, seq = label.rsplit("-", 1)
    print(f"{variant},{seq},,,,,,NaN,NaN,{peak},NaN,NaN,NaN,NaN,NaN,,{call},{why}")
