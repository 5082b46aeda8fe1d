"""An independent check of Strata's GGUF export: reads each exported file with the `gguf` Python
package, dequantizes every tensor with it, runs a Llama forward pass in numpy (f64) in
llama.cpp's own conventions (adjacent-pair RoPE, GGUF tensor names and dims), and compares the
logits with the ones Strata computed from the model before export.

    pip install gguf numpy
    python scripts/check/gguf_reference.py target/gguf-check

Reads DIR/tiny-logits.json (written by `cargo test --release -p strata --test integration gguf_export::`) and DIR/tiny-TYPE.gguf.
Exits non-zero when a file's relative RMS logit error exceeds its type's tolerance.
"""

import json
import pathlib
import sys

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize

# Relative RMS logit error allowed per type: f32 checks the layout exactly (f32 vs f64); the
# others add their weight rounding (the same bounds as framework/tests/integration/gguf_export.rs).
TOLERANCE = {"f32": 1e-5, "f16": 2e-3, "bf16": 1.5e-2, "q8_0": 4e-2, "q4_0": 0.45, "q4_1": 0.45, "q5_0": 0.25, "q5_1": 0.25}


def forward(path: pathlib.Path, ids: list[int]) -> np.ndarray:
    reader = GGUFReader(path)
    fields = {f.name: f for f in reader.fields.values()}
    get = lambda key: fields[key].contents()
    assert get("general.architecture") == "llama"
    n_layer, n_head = get("llama.block_count"), get("llama.attention.head_count")
    n_kv = get("llama.attention.head_count_kv")
    eps, base = get("llama.attention.layer_norm_rms_epsilon"), get("llama.rope.freq_base")
    w = {
        t.name: dequantize(t.data, t.tensor_type).astype(np.float64).reshape([int(d) for d in t.shape[::-1]])
        for t in reader.tensors
    }

    def rms_norm(x, gain):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * gain

    def rope(x):  # [T, heads, hd]; rotates adjacent pairs (x[2i], x[2i+1]) as ggml's NORM mode
        t, _, hd = x.shape
        angle = np.arange(t)[:, None] * base ** (-np.arange(0, hd, 2) / hd)
        cos, sin = np.cos(angle)[:, None], np.sin(angle)[:, None]
        out = np.empty_like(x)
        out[..., 0::2] = x[..., 0::2] * cos - x[..., 1::2] * sin
        out[..., 1::2] = x[..., 0::2] * sin + x[..., 1::2] * cos
        return out

    x = w["token_embd.weight"][ids]
    t, d = x.shape
    hd = d // n_head
    mask = np.triu(np.full((t, t), -np.inf), 1)
    for layer in range(n_layer):
        p = lambda name: w[f"blk.{layer}.{name}.weight"]
        h = rms_norm(x, p("attn_norm"))
        q = rope((h @ p("attn_q").T).reshape(t, n_head, hd))
        k = np.repeat(rope((h @ p("attn_k").T).reshape(t, n_kv, hd)), n_head // n_kv, axis=1)
        v = np.repeat((h @ p("attn_v").T).reshape(t, n_kv, hd), n_head // n_kv, axis=1)
        scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd) + mask
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        scores /= scores.sum(-1, keepdims=True)
        x = x + np.einsum("hqk,khd->qhd", scores, v).reshape(t, d) @ p("attn_output").T
        h = rms_norm(x, p("ffn_norm"))
        gate = h @ p("ffn_gate").T
        x = x + (gate / (1 + np.exp(-gate)) * (h @ p("ffn_up").T)) @ p("ffn_down").T
    head = w.get("output.weight", w["token_embd.weight"])
    return rms_norm(x, w["output_norm.weight"]) @ head.T


def main() -> None:
    folder = pathlib.Path(sys.argv[1])
    expected = json.loads((folder / "tiny-logits.json").read_text())
    ids, want = expected["ids"], np.array(expected["logits"]).reshape(len(expected["ids"]), -1)
    failed = False
    for name, tolerance in TOLERANCE.items():
        got = forward(folder / f"tiny-{name}.gguf", ids)
        relative = np.sqrt(((got - want) ** 2).mean()) / np.sqrt((want**2).mean())
        ok = relative <= tolerance
        failed |= not ok
        print(f"{name}: relative RMS logit error {relative:.2e} (allowed {tolerance:.2g}) {'ok' if ok else 'FAILED'}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
