"""SmolLM2-135M-Instruct (Q4_1 GGUF) in a real llama.cpp against Strata's engine on the same file:
llama.cpp tokenizes the test texts into the ids Strata gave, its logits for the chat prompt and
Strata's greedy answer agree within the tolerance below, and at every step of the answer where
Strata's best token leads by a clear margin, llama.cpp picks the same token.

    cargo test --release -p strata --test smollm2 -- --ignored
    LLAMA_CPP_LIB_PATH=target/llama-cpp/build/bin target/llama-cpp/venv/bin/python \
        scripts/check/smollm2_llama_cpp.py target/gguf-check

Tolerance: Strata dequantizes the Q4_1 weights once and computes in f32; llama.cpp multiplies the
Q4_1 blocks with activations quantized to 8 bits (Q8_1) and keeps its KV cache in f16. Those
roundings, through 30 layers, allow a relative RMS logit difference of a few percent; 0.1 fails
a wrong permutation, norm or RoPE base by far (they give differences of order 1).
"""

import json
import pathlib
import sys

import numpy as np
from llama_cpp import Llama

TOLERANCE = 0.1
MARGIN = 1.0  # logits: a lead this large cannot be flipped by the roundings above


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
    if failures:
        sys.exit(f"failed: {', '.join(failures)}")
    print("ok: llama.cpp and Strata agree on SmolLM2 and on Strata's re-export of it")


if __name__ == "__main__":
    main()
