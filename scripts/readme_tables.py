"""Regenerates README.md's result tables from the CSV files under benches/results/, so the two
cannot drift.

    python3 scripts/readme_tables.py           # rewrite the tables in place
    python3 scripts/readme_tables.py --check   # exit 1 when README.md differs (CI)

A table is written between two markers; the first names the file and, optionally, the columns
and which rows (`where column=value/value/...`, conditions separated by `;`, all must hold):

    <!-- table: benches/results/train_cpu.csv | shape, params, strata_tokens_per_sec -->
    ...generated...
    <!-- /table -->
    <!-- table: benches/results/lora_memory.csv | run, tokens_per_sec | where batch=1; seq=2048 -->

The CSV's `#` lines (what was measured, the machine, the date and build, the peer) are printed
under the table.
"""

import csv
import io
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
MARKER = re.compile(r"<!-- table: (?P<file>[^|>]+?)(?: \| (?!where )(?P<cols>[^|>]+?))?"
                    r"(?: \| where (?P<where>[^|>]+?))? -->\n(?P<body>.*?)<!-- /table -->", re.S)


def cell(text):
    try:
        value = float(text)
    except ValueError:
        return text
    if value != value:  # NaN: not measured or not applicable
        return "—"
    if abs(value) >= 1000:
        return f"{round(value):,}".replace(",", " ")
    if value.is_integer():
        return str(int(value))
    return f"{value:.4g}"


def conditions(text):
    """`a=x/y; b=z` -> {a: {x, y}, b: {z}}."""
    out = {}
    for part in filter(None, (p.strip() for p in (text or "").split(";"))):
        key, _, values = part.partition("=")
        out[key.strip()] = {v.strip() for v in values.split("/")}
    return out


def table(path, columns, where=None):
    lines = (ROOT / path).read_text().splitlines()
    notes = [l[1:].strip() for l in lines if l.startswith("#")]
    rows = list(csv.DictReader(io.StringIO("\n".join(l for l in lines if not l.startswith("#")))))
    if not rows:
        sys.exit(f"{path}: no rows")
    columns = columns or list(rows[0])
    where = conditions(where)
    missing = [c for c in [*columns, *where] if c not in rows[0]]
    if missing:
        sys.exit(f"{path}: no column {', '.join(missing)} (columns: {', '.join(rows[0])})")
    rows = [r for r in rows if all(r[k] in values for k, values in where.items())]
    if not rows:
        sys.exit(f"{path}: no row has {where}")
    out = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    out += ["| " + " | ".join(cell(r[c]) for c in columns) + " |" for r in rows]
    out += [""] + [f"<sub>{n}</sub><br>" if i < len(notes) - 1 else f"<sub>{n}</sub>"
                   for i, n in enumerate(notes)]
    return "\n".join(out) + "\n"


def render(readme):
    def replace(m):
        cols = [c.strip() for c in m["cols"].split(",")] if m["cols"] else None
        head = m.group(0).split("\n", 1)[0]
        return f"{head}\n{table(m['file'].strip(), cols, m['where'])}<!-- /table -->"
    return MARKER.sub(replace, readme)


def main():
    path = ROOT / "README.md"
    old = path.read_text()
    new = render(old)
    if "--check" in sys.argv:
        if new != old:
            sys.exit("README.md's result tables differ from benches/results/: run python3 scripts/readme_tables.py")
        print(f"README.md: {len(MARKER.findall(old))} result tables match benches/results/")
        return
    path.write_text(new)
    print(f"README.md: {len(MARKER.findall(new))} result tables written")


if __name__ == "__main__":
    main()
