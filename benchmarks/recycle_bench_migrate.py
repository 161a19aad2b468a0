"""One-off: record ``lora_scaling: 1.0`` in the run.json of recycle-bench runs made before the option existed.

Until 2026-11-25 an SVD or cat merge always wrote alpha = r (scaling 1); the bench variants now say so
explicitly (protocol.VARIANTS), so a resumed run must find the same setting in the runs already made.
Only runs of variants that pin it, with lora_mode svd or cat and no lora_scaling yet, are touched.

    python benchmarks/recycle_bench_migrate.py [bench-out/full]
"""

import json
import sys
from pathlib import Path

from warmstart.bench.protocol import VARIANTS


def main(root: Path) -> None:
    changed = 0
    for run_json in sorted(root.glob("runs/*/*-s*/run.json")):
        variant = run_json.parent.name.rsplit("-s", 1)[0]
        pinned = VARIANTS.get(variant, ({}, {}))[1].get("lora_scaling")
        info = json.loads(run_json.read_text())
        merge = info["config"]["merge"]
        if pinned is None or "lora_scaling" in merge or merge.get("lora_mode") not in ("svd", "cat"):
            continue
        merge["lora_scaling"] = pinned
        tmp = run_json.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(info, indent=2))
        tmp.replace(run_json)
        changed += 1
    print(f"{changed} run.json files now record lora_scaling")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("bench-out/full"))
