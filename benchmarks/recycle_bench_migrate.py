"""One-off: record the legacy merge/select settings in the run.json of recycle-bench runs made before they existed.

Until 2026-11-25 an SVD or cat merge always wrote alpha = r (``lora_scaling: 1.0``) and split σ evenly
between A and B (``lora_a_norm: None``); the bench variants now pin those explicitly (protocol.VARIANTS),
so a resumed run must find the same settings in the runs already made. Only keys a variant pins to
their legacy value, and that its run.json lacks, are added. Likewise every variant pins
``min_own_gain: None`` in its select settings: runs made before 2026-12-01 chose donors without the
own-task gate, and scored, trained and evaluated in float32 (bf16 autocast is the default since).

    python benchmarks/recycle_bench_migrate.py [bench-out/full]
"""

import json
import sys
from pathlib import Path

from warmstart.bench.protocol import VARIANTS


LEGACY = {"lora_scaling": 1.0, "lora_a_norm": None}
LEGACY_SELECT = {"min_own_gain": None,  # before 2026-12-01 select had no own-task gate
                 "compute_dtype": "float32"}  # ... and scored in float32
# before 2026-12-01 precision "auto" meant fp32 on a CPU, and eval curves ran in fp32
LEGACY_TRAIN = {"precision": ("auto", "fp32"), "eval_dtype": (None, "float32")}


def main(root: Path) -> None:
    changed = 0
    for run_json in sorted(root.glob("runs/*/*-s*/run.json")):
        variant = run_json.parent.name.rsplit("-s", 1)[0]
        pins = VARIANTS.get(variant, ({}, {}))[1]
        info = json.loads(run_json.read_text())
        merge, select = info["config"]["merge"], info["config"]["select"]
        add = {k: v for k, v in pins.items() if k in LEGACY and v == LEGACY[k] and k not in merge}
        if merge.get("lora_mode") not in ("svd", "cat"):
            add = {}
        sel_pins = VARIANTS.get(variant, ({}, {}))[0]
        add_sel = {k: v for k, v in sel_pins.items() if k in LEGACY_SELECT and v == LEGACY_SELECT[k]
                   and k not in select}
        train = info["config"]["train"]
        add_train = {k: new for k, (old, new) in LEGACY_TRAIN.items() if train.get(k) == old}
        if not add and not add_sel and not add_train:
            continue
        merge.update(add)
        select.update(add_sel)
        train.update(add_train)
        tmp = run_json.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(info, indent=2))
        tmp.replace(run_json)
        changed += 1
    print(f"{changed} run.json files now record the legacy merge and select settings")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("bench-out/full"))
