"""Refresh docs/results.md from bench-out/full: the main tables (between the FULL-RUN markers) and the source-run table.

    python benchmarks/recycle_bench_docs.py
"""
import re, subprocess
from pathlib import Path
subprocess.run(["warmstart", "bench", "results", "--out", "bench-out/full"], capture_output=True)
md = Path("bench-out/full/results.md").read_text()
doc = Path("docs/results.md").read_text()
m = re.search(r"## Source runs.*?\n\n(\|.*?\n)\n", md + "\n", re.S)
src = m.group(1) if m else "(none finished yet)\n"
doc = re.sub(r"(## Source runs so far[^\n]*\n\n)(.*?)(\n## )", lambda mm: mm.group(1) + src + mm.group(3), doc, count=1, flags=re.S)
mains = re.findall(r"(## main .*?\n\n\|.*?\n)\n", md, re.S)
block = "\n".join(s.replace("## main", "### full run, main") for s in mains) or "(no target finished yet)\n"
start = "<!-- FULL-RUN-START -->"
end = "<!-- FULL-RUN-END -->"
section = f"{start}\n{block}{end}"
if start in doc:
    doc = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: section, doc, flags=re.S)
else:
    doc = doc.replace("## Source runs so far", "## Full run: targets finished at hand-over (seed 0)\n\n"
                      "Copied from `bench-out/full/results.md` (regenerate with `warmstart bench results --out bench-out/full`).\n\n"
                      + section + "\n\n## Source runs so far", 1)
Path("docs/results.md").write_text(doc)
