"""One-off: record the legacy merge settings in the run.json of recycle-bench runs made before they existed.

Until 2026-11-25 an SVD or cat merge always wrote alpha = r (``lora_scaling: 1.0``) and split σ evenly
between A and B (``lora_a_norm: None``); the bench variants now pin those explicitly (protocol.VARIANTS),
so a resumed run must find the same settings in the runs already made. Only keys a variant pins to
their legacy value, and that its run.json lacks, are added.

    python benchmarks/recycle_bench_migrate.py [bench-out/full]
"""

import json
import sys
from pathlib import Path

from warmstart.bench.protocol import VARIANTS


LEGACY = {"lora_scaling": 1.0, "lora_a_norm": None}


def main(root: Path) -> None:
    changed = 0
    for run_json in sorted(root.glob("runs/*/*-s*/run.json")):
        variant = run_json.parent.name.rsplit("-s", 1)[0]
        pins = VARIANTS.get(variant, ({}, {}))[1]
        info = json.loads(run_json.read_text())
        merge = info["config"]["merge"]
        add = {k: v for k, v in pins.items() if k in LEGACY and v == LEGACY[k] and k not in merge}
        if not add or merge.get("lora_mode") not in ("svd", "cat"):
            continue
        merge.update(add)
        tmp = run_json.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(info, indent=2))
        tmp.replace(run_json)
        changed += 1
    print(f"{changed} run.json files now record the legacy merge settings")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("bench-out/full"))
