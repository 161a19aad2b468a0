"""Refresh docs/results.md and docs/bench-results/ from a recycle-bench directory.

    python benchmarks/recycle_bench_docs.py [bench-out/full]

Rewrites the tables between the FULL-RUN markers of docs/results.md with the
body of the bench's results.md (main tables per budget, the verdict against the
issue's targets, the ablation tables, the source-run curves) and copies the raw
files (results.json, results.md, curves.png) to docs/bench-results/. The prose
around the markers is written by hand from these tables.
"""

import re
import shutil
import subprocess
import sys
from pathlib import Path

START, END = "<!-- FULL-RUN-START -->", "<!-- FULL-RUN-END -->"


def main(bench: Path = Path("bench-out/full"), doc_path: Path = Path("docs/results.md")) -> None:
    r = subprocess.run(["warmstart", "bench", "results", "--out", str(bench)], capture_output=True, text=True)
    if r.returncode:
        sys.exit(r.stderr.strip() or f"warmstart bench results failed ({r.returncode})")
    md = (bench / "results.md").read_text()
    body = md[md.index("\n## "):].strip() + "\n"  # drop the title and the intro (results.md says how)
    body = re.sub(r"^## ", "### ", body, flags=re.M)
    body = re.sub(r"!\[curves.png\]\(curves.png\)", "![curves](bench-results/curves.png)", body)
    doc = doc_path.read_text()
    if START not in doc or END not in doc:
        sys.exit(f"{doc_path}: no {START} ... {END} markers")
    doc = re.sub(re.escape(START) + r".*?" + re.escape(END), lambda _: f"{START}\n{body}{END}", doc, flags=re.S)
    doc_path.write_text(doc)
    dest = doc_path.parent / "bench-results"
    dest.mkdir(exist_ok=True)
    for name in ("results.json", "results.md", "curves.png"):
        if (bench / name).is_file():
            shutil.copy2(bench / name, dest / name)
    print(f"updated {doc_path} and {dest}/ from {bench}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("bench-out/full"))
