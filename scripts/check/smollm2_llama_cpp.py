"""SmolLM2-135M-Instruct (Q4_1 GGUF) in a real llama.cpp against Strata's engine on the same file:
llama.cpp tokenizes the test texts into the ids Strata gave, its logits for the chat prompt and
Strata's greedy answer agree within the tolerance below, and at every step of the answer where
Strata's best token leads by a clear margin, llama.cpp picks the same token.

Then held-out perplexity: llama.cpp scores the Gettysburg Address with the source file and with
Strata's f32, f16, q8_0 and q4_k_m re-exports, and each must match Strata's score of the same file
(NLL_TOLERANCE); and llama-quantize makes Q4_K_M from Strata's f32 export, which must give Strata's
q4_k_m file's tensor types and bytes.

    cargo test --release -p strata --test integration -- --ignored smollm2::
    LLAMA_CPP_LIB_PATH=target/llama-cpp/build/bin target/llama-cpp/venv/bin/python \
        scripts/check/smollm2_llama_cpp.py target/gguf-check [target/llama-cpp/build/bin/llama-quantize]

Tolerance: Strata dequantizes the Q4_1 weights once and computes in f32; llama.cpp multiplies the
Q4_1 blocks with activations quantized to 8 bits (Q8_1) and keeps its KV cache in f16. Those
roundings, through 30 layers, allow a relative RMS logit difference of a few percent; 0.1 fails
a wrong permutation, norm or RoPE base by far (they give differences of order 1).
"""

import json
import pathlib
import subprocess
import sys

import numpy as np
from llama_cpp import Llama

TOLERANCE = 0.1
MARGIN = 1.0  # logits: a lead this large cannot be flipped by the roundings above
# Held-out loss, nats/token, llama.cpp against Strata on the same file: the roundings above move
# a mean log-probability by hundredths at most.
NLL_TOLERANCE = 0.03


def heldout_nll(path: str, ids: list[int]) -> float:
    llm = Llama(path, n_ctx=512, n_batch=512, n_threads=2, logits_all=True, seed=0, verbose=False)
    llm.eval(ids)
    logits = np.array(llm.scores[: len(ids) - 1], dtype=np.float64)
    top = logits.max(-1, keepdims=True)
    log_probs = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    return float(-log_probs[np.arange(len(ids) - 1), ids[1:]].mean())


def perplexity_and_quantize(folder: pathlib.Path, quantize: str | None) -> list[str]:
    report = json.loads((folder / "smollm2-perplexity.json").read_text())
    failures = []
    for name, ours in report["nll"].items():
        theirs = heldout_nll(report["files"][name], report["ids"])
        ok = abs(theirs - ours) <= NLL_TOLERANCE
        print(f"held-out {name}: Strata {ours:.4f}, llama.cpp {theirs:.4f} nats/token "
              f"(perplexity {np.exp(ours):.2f} / {np.exp(theirs):.2f}) {'ok' if ok else 'FAILED'}")
        if not ok:
            failures.append(f"nll-{name}")
    if quantize:
        from gguf import GGUFReader

        ref = folder / "smollm2-q4_k_m.llama-quantize.gguf"
        subprocess.run([quantize, report["files"]["f32"], str(ref), "Q4_K_M"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        read = lambda p: {t.name: (t.tensor_type.name, np.asarray(t.data).tobytes()) for t in GGUFReader(p).tensors}
        ours, theirs = read(report["files"]["q4_k_m"]), read(ref)
        types = sum(ours[n][0] == theirs[n][0] for n in theirs) if ours.keys() == theirs.keys() else 0
        same = sum(ours[n] == theirs[n] for n in theirs) if ours.keys() == theirs.keys() else 0
        kinds = sorted({t for t, _ in theirs.values()})
        print(f"llama-quantize Q4_K_M of Strata's f32 export: {types}/{len(theirs)} tensor types and "
              f"{same}/{len(theirs)} tensors' bytes identical to Strata's q4_k_m ({', '.join(kinds)})")
        if same != len(theirs):
            failures.append("q4_k_m-bytes")
    return failures


def main() -> None:
    folder = pathlib.Path(sys.argv[1])
    expected = json.loads((folder / "smollm2.json").read_text())
    ids, vocab, prompt_len = expected["ids"], expected["vocab"], expected["prompt_len"]
    want = np.fromfile(folder / "smollm2-logits.f32", dtype="<f4").reshape(len(ids), vocab).astype(np.float64)
    llm = Llama(expected["model"], n_ctx=256, n_batch=256, n_threads=2, logits_all=True, seed=0, verbose=False)
    failures = []
    for item in expected["texts"]:
        theirs = llm.tokenize(item["text"].encode(), add_bos=False, special=True)
        if theirs != item["ids"]:
            failures.append("tokenize")
            print(f"tokenize {item['text']!r}: llama.cpp {theirs}, Strata {item['ids']}")
    if "tokenize" not in failures:
        print(f"tokenizer: {len(expected['texts'])} texts give identical ids")

    llm.reset()
    llm.eval(ids)
    got = np.array(llm.scores[: llm.n_tokens], dtype=np.float64)
    relative = np.sqrt(((got - want) ** 2).mean()) / np.sqrt((want**2).mean())
    print(f"logits over {len(ids)} positions: relative RMS difference {relative:.3e} (allowed {TOLERANCE})")
    if not relative <= TOLERANCE:
        failures.append("logits")
    answer = ids[prompt_len:]
    decisive = [(step, margin) for step, margin in enumerate(expected["greedy_margins"]) if margin >= MARGIN]
    disagree = [
        (step, int(got[prompt_len - 1 + step].argmax()), answer[step])
        for step, _ in decisive
        if int(got[prompt_len - 1 + step].argmax()) != answer[step]
    ]
    print(f"greedy answer: {len(decisive)} of {len(answer)} steps decisive, disagreements {disagree}")
    if disagree:
        failures.append("greedy")

    # Strata's f16 re-export of the model (tokenizer metadata copied from the source file).
    f16 = Llama(str(folder / "smollm2-f16.gguf"), n_ctx=256, n_batch=256, n_threads=2, logits_all=True,
                seed=0, verbose=False)
    same = all(f16.tokenize(t["text"].encode(), add_bos=False, special=True) == t["ids"] for t in expected["texts"])
    f16.reset()
    f16.eval(ids)
    got = np.array(f16.scores[: f16.n_tokens], dtype=np.float64)
    relative = np.sqrt(((got - want) ** 2).mean()) / np.sqrt((want**2).mean())
    print(f"Strata's f16 re-export in llama.cpp: tokenizer {'identical' if same else 'DIFFERENT'}, "
          f"relative RMS logit difference {relative:.3e} (allowed {TOLERANCE})")
    if not same:
        failures.append("f16-tokenize")
    if not relative <= TOLERANCE:
        failures.append("f16-logits")
    failures += perplexity_and_quantize(folder, sys.argv[2] if len(sys.argv) > 2 else None)
    if failures:
        sys.exit(f"failed: {', '.join(failures)}")
    print("ok: llama.cpp and Strata agree on SmolLM2 and on Strata's re-export of it")


if __name__ == "__main__":
    main()
