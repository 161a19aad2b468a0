"""Fine-tuning transfer: warmstart's streamed pass vs the naive in-memory recipe, on the real small model.

The naive recipe (what the paper's reference code does) loads the three models
with ``from_pretrained``, computes ``new + α·(ft − old)`` on whole state dicts
and calls ``save_pretrained``. warmstart streams one tensor at a time. Both run
in fresh subprocesses; the table gives wall time and peak RSS, and checks that
the two outputs are equal.

    nice -n 10 python benchmarks/transfer_speed.py --work /tmp/transferbench
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

NAIVE = """
import sys, torch
from transformers import AutoModelForCausalLM
old, ft, new, out = sys.argv[1:5]
m = {k: AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32) for k, p in (("o", old), ("f", ft), ("n", new))}
# named_parameters() lists a tied embedding once; a loop over state_dict() would add its diff twice
so, sf = dict(m["o"].named_parameters()), dict(m["f"].named_parameters())
with torch.no_grad():
    for k, v in m["n"].named_parameters():
        v.add_(sf[k] - so[k])
m["n"].save_pretrained(out)
"""

STREAMED = """
import sys
from warmstart.transfer import transfer
transfer(*sys.argv[1:4], sys.argv[4])
"""


def _run(code: str, args: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of a fresh interpreter running ``code``."""
    t0 = time.time()
    pid = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL).pid
    _, status, ru = os.wait4(pid, 0)
    if status != 0:
        raise SystemExit(f"subprocess failed ({status}): {code[:60]}")
    return time.time() - t0, ru.ru_maxrss / 1024


def _make_inputs(work: Path) -> tuple[Path, Path, Path]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from warmstart.bench.model import prepare_model

    old = prepare_model()
    made = []
    for name, seed, scale in (("ft", 1, 2e-3), ("new", 2, 1e-3)):
        d = work / name
        if not (d / "config.json").exists():
            m = AutoModelForCausalLM.from_pretrained(old, dtype=torch.float32)
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for p in m.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * scale)
            m.save_pretrained(d)
            AutoTokenizer.from_pretrained(old).save_pretrained(d)
        made.append(d)
    return Path(old), made[0], made[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/transferbench"))
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    old, ft, new = _make_inputs(args.work)
    rows = []
    for name, code in (("naive (3× from_pretrained)", NAIVE), ("warmstart transfer (streamed)", STREAMED)):
        out = args.work / ("out-naive" if code is NAIVE else "out-ws")
        subprocess.run(["rm", "-rf", str(out)], check=True)
        wall, rss = _run(code, [str(old), str(ft), str(new), str(out)])
        rows.append((name, wall, rss, out))
    from safetensors.torch import load_file

    a, b = load_file(rows[0][3] / "model.safetensors"), load_file(rows[1][3] / "model.safetensors")
    diff = max(float((a[k] - b[k]).abs().max()) for k in b)
    size = sum(f.stat().st_size for f in old.glob("*.safetensors")) / 2**20
    print(f"SmolLM2-135M-Instruct fp32 ({size:.0f} MiB per model), CPU; max |naive − warmstart| = {diff:.2e}")
    print()
    print("| recipe | wall s | peak RSS MiB | RSS / model size |")
    print("|---|---|---|---|")
    for name, wall, rss, _ in rows:
        print(f"| {name} | {wall:.1f} | {rss:.0f} | {rss / size:.2f} |")
    print(f"\nratio warmstart/naive: wall {rows[1][1] / rows[0][1]:.2f}, peak RSS {rows[1][2] / rows[0][2]:.2f}")
    json.dump([r[:3] for r in rows], open(args.work / "results.json", "w"))


if __name__ == "__main__":
    main()
