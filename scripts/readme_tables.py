"""Regenerates README.md's result tables from the CSV files under benches/results/, so the two
cannot drift.

    python3 scripts/readme_tables.py           # rewrite the tables in place
    python3 scripts/readme_tables.py --check   # exit 1 when README.md differs (CI)

A table is written between two markers; the first names the file and, optionally, the columns:

    <!-- table: benches/results/train_cpu.csv | shape, params, strata_tokens_per_sec -->
    ...generated...
    <!-- /table -->

The CSV's `#` lines (what was measured, the machine, the date and build, the peer) are printed
under the table.
"""

import csv
import io
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
MARKER = re.compile(r"<!-- table: (?P<file>[^|>]+?)(?: \| (?P<cols>[^>]+?))? -->\n(?P<body>.*?)<!-- /table -->",
                    re.S)


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


def table(path, columns):
    lines = (ROOT / path).read_text().splitlines()
    notes = [l[1:].strip() for l in lines if l.startswith("#")]
    rows = list(csv.DictReader(io.StringIO("\n".join(l for l in lines if not l.startswith("#")))))
    if not rows:
        sys.exit(f"{path}: no rows")
    columns = columns or list(rows[0])
    missing = [c for c in columns if c not in rows[0]]
    if missing:
        sys.exit(f"{path}: no column {', '.join(missing)} (columns: {', '.join(rows[0])})")
    out = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    out += ["| " + " | ".join(cell(r[c]) for c in columns) + " |" for r in rows]
    out += [""] + [f"<sub>{n}</sub><br>" if i < len(notes) - 1 else f"<sub>{n}</sub>"
                   for i, n in enumerate(notes)]
    return "\n".join(out) + "\n"


def render(readme):
    def replace(m):
        cols = [c.strip() for c in m["cols"].split(",")] if m["cols"] else None
        head = m.group(0).split("\n", 1)[0]
        return f"{head}\n{table(m['file'].strip(), cols)}<!-- /table -->"
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
