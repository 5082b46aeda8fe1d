"""Builds an instruction-tuning set from the Shakespeare corpus (public domain), for fine-tuning
the default byte-level model:

    python scripts/data/shakespeare_instructions.py [TEXTS_DIR] [OUT.jsonl]

Defaults: data/shakespeare/shksprdata/texts (README's first command fetches it) and
data/shakespeare-instructions.jsonl. Two kinds of example, from lines of verse and prose spoken
in the modern-spelling plays (`*_gut.txt`):
  {"prompt": "Which play?\n<line>", "response": "<Play>"}
  {"prompt": "Continue (<Play>):\n<first words>", "response": "<rest of the line>"}
Lines are 30-50 characters, so that an example in the alpaca template fits the default model's
128-token context.
The title comes from the file name. The order is shuffled with a fixed seed, so the file (and
so the validation examples `data.val_fraction` picks) is the same on every machine.
"""

import json
import pathlib
import random
import re
import sys

texts = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "data/shakespeare/shksprdata/texts")
out = pathlib.Path(sys.argv[2] if len(sys.argv) > 2 else "data/shakespeare-instructions.jsonl")
PER_PLAY = 60

rng = random.Random(20261124)
examples = []
for path in sorted(texts.glob("*_gut.txt")):
    title = path.name.removesuffix("_gut.txt").replace("_", " ").title()
    lines = []
    for raw in path.read_text(encoding="utf-8", errors="replace").splitlines():
        line = raw.strip()
        # Spoken lines: long enough to be recognisable, not a heading, stage direction or name.
        if not 30 <= len(line) <= 50 or line.isupper() or line.startswith(("[", "Enter", "Exit", "Exeunt")):
            continue
        if not re.match(r"^[A-Z][a-z]", line):
            continue
        lines.append(line)
    if len(lines) < 2 * PER_PLAY:
        continue
    for line in rng.sample(lines, PER_PLAY):
        examples.append({"prompt": f"Which play?\n{line}", "response": title})
    for line in rng.sample(lines, PER_PLAY):
        words = line.split()
        cut = max(2, len(words) // 2)
        examples.append({
            "prompt": f"Continue ({title}):\n{' '.join(words[:cut])}",
            "response": " ".join(words[cut:]),
        })
rng.shuffle(examples)
out.parent.mkdir(parents=True, exist_ok=True)
tmp = out.with_suffix(".tmp")
tmp.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in examples), encoding="utf-8")
tmp.replace(out)
print(f"wrote {len(examples)} examples to {out}")
