"""Strata's k-quant export against llama.cpp itself, on the model the `gguf_export` test leaves
in DIR (kq-f32.gguf, kq-PRESET.gguf, kq-logits.json):

1. llama-quantize makes each preset from our f32 export; every tensor of our kq-PRESET.gguf must
   have the type llama.cpp chose for it, and the same bytes (both run ggml's reference
   quantizers; a tensor whose bytes differ is listed with the share of blocks that differ);
2. llama.cpp runs our kq-PRESET.gguf: its logits must match ours on the same file (llama.cpp
   multiplies k-quant blocks with 8-bit-quantized activations), and the f32 model's within the
   preset's rounding.

    LLAMA_CPP_LIB_PATH=PREFIX/build/bin PREFIX/venv/bin/python scripts/check/gguf_kquants.py \\
        target/gguf-check PREFIX/build/bin/llama-quantize
"""

import json
import pathlib
import subprocess
import sys

import numpy as np
from gguf import GGUFReader
from llama_cpp import Llama

# Preset → (llama-quantize's name, relative RMS logit error allowed against the f32 model; our
# own engine's bound in the gguf_export test plus room for llama.cpp's activation rounding).
PRESETS = {"q6_k": ("Q6_K", 0.2), "q5_k_m": ("Q5_K_M", 0.36), "q5_k_s": ("Q5_K_S", 0.38),
           "q4_k_m": ("Q4_K_M", 0.7), "q4_k_s": ("Q4_K_S", 0.72)}
# llama.cpp against our engine on the same file: llama.cpp rounds the activations to 8 bits for
# k-quant dot products, and this random 8-layer model amplifies rounding about sevenfold (8-bit
# weights alone give 3.4e-2 in our engine); measured 5.3e-2 to 5.7e-2.
SAME_FILE = 0.09


def tensors(path: pathlib.Path) -> dict:
    return {t.name: (t.tensor_type.name, np.asarray(t.data).tobytes(), t) for t in GGUFReader(path).tensors}


def relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a - b) ** 2)) / np.sqrt(np.mean(b**2)))


def llama_cpp_logits(path: pathlib.Path, ids: list[int], vocab: int) -> np.ndarray:
    llm = Llama(str(path), n_ctx=64, n_batch=64, n_threads=2, logits_all=True, verbose=False)
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float64)[:, :vocab].reshape(-1)


def main() -> None:
    folder, quantize = pathlib.Path(sys.argv[1]), sys.argv[2]
    expected = json.loads((folder / "kq-logits.json").read_text())
    ids, original = expected["ids"], np.array(expected["original"], dtype=np.float64)
    vocab = len(original) // len(ids)
    failed = False
    for preset, (ftype, tolerance) in PRESETS.items():
        ref = folder / f"kq-{preset}.llama-quantize.gguf"
        subprocess.run([quantize, str(folder / "kq-f32.gguf"), str(ref), ftype], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ours, theirs = tensors(folder / f"kq-{preset}.gguf"), tensors(ref)
        if ours.keys() != theirs.keys():
            print(f"{preset}: tensor names differ: {sorted(ours.keys() ^ theirs.keys())}")
            failed = True
            continue
        wrong_type = [f"{n} ({ours[n][0]} vs {theirs[n][0]})" for n in theirs if ours[n][0] != theirs[n][0]]
        differing = []
        for name, (ty, data, tensor) in theirs.items():
            if ours[name][0] == ty and ours[name][1] != data:
                a = np.frombuffer(ours[name][1], np.uint8).reshape(len(tensor.data), -1)
                b = np.frombuffer(data, np.uint8).reshape(len(tensor.data), -1)
                differing.append(f"{name} ({np.mean(np.any(a != b, axis=1)):.1%} of rows)")
        ours_logits = np.array(expected[preset], dtype=np.float64)
        theirs_logits = llama_cpp_logits(folder / f"kq-{preset}.gguf", ids, vocab)
        same_file, to_f32 = relative(theirs_logits, ours_logits), relative(theirs_logits, original)
        ok = not wrong_type and not differing and same_file <= SAME_FILE and to_f32 <= tolerance
        failed |= not ok
        print(f"{preset}: {len(theirs)} tensors, types {'identical' if not wrong_type else 'DIFFER: ' + ', '.join(wrong_type)}; "
              f"bytes {'identical' if not differing else 'DIFFER: ' + ', '.join(differing)}; "
              f"llama.cpp vs ours on our file {same_file:.2e} (≤ {SAME_FILE}), vs f32 model {to_f32:.2e} (≤ {tolerance})"
              f"{'' if ok else '  FAIL'}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
