"""The llama.cpp peer of `strata bench --suite infer`: per-token KV-cache decoding latency of a
GGUF model (the f32 export `strata bench-decode --gguf-out` writes of the suite's dense model, so
the same shape and weights), the same way Strata's bench-decode measures it: the prompt ids
(37 i + 11) mod 256 evaluated at once, then --tokens greedy tokens one at a time, timed; median
over --rounds after one warm-up round; the prompt's evaluation is timed too (prefill tokens/s).
Prints one JSON line.

    LLAMA_CPP_LIB_PATH=target/llama-cpp/build/bin target/llama-cpp/venv/bin/python \\
        benches/infer_llama_cpp.py model.gguf --prompt 1024 --tokens 32 --rounds 2 --threads 2

llama.cpp keeps its KV cache in f16 (its default) and multiplies f32 weights in f32.
"""

import argparse
import json
import statistics
import time

import llama_cpp
import numpy as np
from llama_cpp import Llama


def main():
    p = argparse.ArgumentParser()
    p.add_argument("gguf")
    p.add_argument("--prompt", type=int, default=1024)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    # logits_all: every prompt position's logits (Strata's bench-gguf computes them too).
    llm = Llama(args.gguf, n_ctx=args.prompt + args.tokens + 8, n_batch=min(args.prompt, 2048),
                n_threads=args.threads, n_threads_batch=args.threads, logits_all=True, seed=0,
                verbose=False)
    prompt = [(i * 37 + 11) % 256 for i in range(args.prompt)]
    per_token, prefill = [], []
    for round in range(args.rounds + 1):
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        prefilled = time.perf_counter() - start
        token = prompt[-1]
        start = time.perf_counter()
        for _ in range(args.tokens):
            llm.eval([token])
            token = int(np.argmax(llm.scores[llm.n_tokens - 1])) % 256
        if round > 0:
            per_token.append((time.perf_counter() - start) * 1e3 / args.tokens)
            prefill.append(args.prompt / prefilled)
    print(json.dumps({
        "framework": "llama.cpp",
        "version": llama_cpp.__version__,
        "ms_per_token": statistics.median(per_token),
        "prefill_tok_s": statistics.median(prefill),
        "prompt_tokens": args.prompt,
        "decode_tokens": args.tokens,
        "rounds": args.rounds,
        "threads": args.threads,
    }))


if __name__ == "__main__":
    main()
