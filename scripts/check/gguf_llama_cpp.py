"""Strata's GGUF exports in a real llama.cpp (through llama-cpp-python): each file loads; llama.cpp
tokenizes text into the ids Strata's byte tokenizer gives and back; its logits for the test
prompt match Strata's within each type's tolerance; and along Strata's greedy continuation of the
F32 file, llama.cpp picks the same token at every step where Strata's best token leads the
runner-up by more than llama.cpp's own rounding (its KV cache is f16) could move it. A model
exported as Strata's own architecture is refused with llama.cpp's unknown-architecture error. LoRA
adapters written as GGUF adapter files, applied by llama.cpp to the base, give the merged model's
logits.

    scripts/check/llama_cpp.sh target/llama-cpp
    LLAMA_CPP_LIB_PATH=target/llama-cpp/build/bin target/llama-cpp/venv/bin/python \
        scripts/check/gguf_llama_cpp.py target/gguf-check

Reads DIR/tiny-logits.json and DIR/tiny-TYPE.gguf, written by `cargo test --release -p strata --test integration gguf_export::`.
"""

import json
import pathlib
import subprocess
import sys

import numpy as np
from llama_cpp import Llama

# Relative RMS logit error allowed: llama.cpp keeps its KV cache in f16 and quantizes
# activations to 8 bits inside quantized matrix products, on top of the weights' own rounding.
TOLERANCE = {"f32": 3e-3, "f16": 5e-3, "bf16": 2.5e-2, "q8_0": 6e-2, "q4_0": 0.5, "q4_1": 0.5, "q5_0": 0.3, "q5_1": 0.3}


def main() -> None:
    folder = pathlib.Path(sys.argv[1])
    expected = json.loads((folder / "tiny-logits.json").read_text())
    ids = expected["ids"]
    want = np.array(expected["logits"]).reshape(len(ids), -1)
    failures = []
    for name, tolerance in TOLERANCE.items():
        llm = Llama(str(folder / f"tiny-{name}.gguf"), n_ctx=128, n_batch=128, n_threads=2,
                    logits_all=True, seed=0, verbose=False)
        llm.reset()
        llm.eval(ids)
        got = np.array(llm.scores[: llm.n_tokens], dtype=np.float64)
        relative = np.sqrt(((got - want) ** 2).mean()) / np.sqrt((want**2).mean())
        agree = np.mean(got.argmax(-1) == want.argmax(-1))
        ok = relative <= tolerance
        print(f"{name}: relative RMS logit error {relative:.2e} (allowed {tolerance:.2g}), "
              f"argmax agreement {agree:.2f} {'ok' if ok else 'FAILED'}")
        if not ok:
            failures.append(name)
        if name == "f32":
            text = "Hi there, ünïcode!\n\ttabs & <tags>"
            tokens = llm.tokenize(text.encode(), add_bos=True)
            if tokens != [256] + list(text.encode()):
                failures.append("tokenize")
                print(f"tokenize: llama.cpp gives {tokens[:12]}..., Strata [256] + the bytes")
            if llm.detokenize(tokens[1:]) != text.encode():
                failures.append("detokenize")
                print("detokenize: the text does not come back")
            if "tokenize" not in failures and "detokenize" not in failures:
                print(f"tokenizer: {len(tokens)} ids identical to Strata's, text round-trips")
            # Teacher-forced along Strata's greedy path, so one near-tie cannot derail the rest.
            llm.reset()
            llm.eval(ids)
            scale = np.sqrt((want**2).mean())
            disagree, near_ties = [], 0
            for step, (token, margin) in enumerate(zip(expected["greedy"], expected["greedy_margins"])):
                choice = int(np.argmax(llm.scores[llm.n_tokens - 1]))
                if margin < 0.01 * scale:
                    near_ties += 1
                elif choice != token:
                    disagree.append((step, choice, token, margin))
                llm.eval([token])
            print(f"f32 greedy continuation: {len(expected['greedy']) - near_ties} decisive steps, "
                  f"{len(disagree)} disagreements {disagree}; {near_ties} near-ties not compared")
            if disagree:
                failures.append("greedy")
    # A Hugging Face byte-level BPE exported with its merges: llama.cpp gives the same ids.
    bpe = json.loads((folder / "tiny-hf-bpe.json").read_text())
    llm = Llama(str(folder / "tiny-hf-bpe.gguf"), n_ctx=64, n_threads=2, seed=0, verbose=False)
    wrong = []
    for item in bpe["texts"]:
        theirs = llm.tokenize(item["text"].encode(), add_bos=False, special=True)
        if theirs != item["ids"]:
            wrong.append((item["text"], theirs, item["ids"]))
    print(f"HF BPE tokenizer export: {len(bpe['texts']) - len(wrong)} of {len(bpe['texts'])} texts "
          f"tokenized identically {wrong if wrong else ''}")
    if wrong:
        failures.append("bpe-tokenize")
    # LoRA adapters as GGUF adapter files, applied by llama.cpp to the f32 base (adapters left
    # out): the logits of Strata's merged model.
    for name in ("lora", "rslora"):
        expected_lora = json.loads((folder / f"{name}-logits.json").read_text())
        want_lora = np.array(expected_lora["logits"]).reshape(len(expected_lora["ids"]), -1)
        llm = Llama(str(folder / f"{name}-base-f32.gguf"), lora_path=str(folder / f"{name}-adapter.gguf"),
                    n_ctx=128, n_batch=128, n_threads=2, logits_all=True, seed=0, verbose=False)
        llm.reset()
        llm.eval(expected_lora["ids"])
        got = np.array(llm.scores[: llm.n_tokens], dtype=np.float64)
        relative = np.sqrt(((got - want_lora) ** 2).mean()) / np.sqrt((want_lora**2).mean())
        ok = relative <= TOLERANCE["f32"]
        print(f"{name} adapter GGUF on the f32 base: relative RMS logit error {relative:.2e} from "
              f"Strata's merged model (allowed {TOLERANCE['f32']:.2g}) {'ok' if ok else 'FAILED'}")
        if not ok:
            failures.append(f"{name}-adapter")
    # Strata's own architecture (coord3d attention with KV sharing): llama.cpp refuses it by name.
    # Loaded in a child process, whose stderr carries llama.cpp's log.
    strata_file = folder / "tiny-strata-coord3d-kv2-f32.gguf"
    child = subprocess.run(
        [sys.executable, "-c", "import sys; from llama_cpp import Llama; Llama(sys.argv[1], verbose=True)",
         str(strata_file)], capture_output=True, text=True)
    refusal = "unknown model architecture: 'strata'"
    if child.returncode != 0 and refusal in child.stderr:
        print(f"strata architecture: llama.cpp refuses it ({refusal}) ok")
    else:
        failures.append("strata-refusal")
        print(f"strata architecture: exit {child.returncode}, no {refusal!r} in its log: "
              f"{child.stderr[-400:]}")
    if failures:
        sys.exit(f"failed: {', '.join(failures)}")


if __name__ == "__main__":
    main()
