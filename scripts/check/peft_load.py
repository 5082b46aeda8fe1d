"""Loads the adapter that `cargo test --release -p strata --test integration lora::` leaves in target/peft-check/ with Hugging Face
PEFT on the fixture base model, and compares PEFT's logits with the ones Strata computed.

    pip install torch transformers peft safetensors
    python scripts/check/peft_load.py

Tolerance: 1e-4 of the largest logit (f32 on both sides; only summation order differs).
"""

import pathlib
import sys

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHECK = ROOT / "target" / "peft-check"

base = LlamaForCausalLM.from_pretrained(ROOT / "framework/tests/fixtures/tiny_llama", torch_dtype=torch.float32)
model = PeftModel.from_pretrained(base, CHECK / "adapter").eval()
expected = load_file(str(CHECK / "expected.safetensors"))
ids = expected["input_ids"].long()
with torch.no_grad():
    logits = model(ids).logits.float()
want = expected["logits"]
scale = want.abs().max().item()
worst = (logits - want).abs().max().item()
print(f"PEFT vs Strata: max |Δ| = {worst:.3e}, largest logit {scale:.3f}")
if not worst <= 1e-4 * scale:
    sys.exit("PEFT's logits differ from Strata's beyond 1e-4 relative")
print("ok: a Strata adapter loads in PEFT and gives the same logits")
