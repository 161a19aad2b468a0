"""warmstart extract-lora vs mergekit-extract-lora 0.1.5 on a tiny Llama (built here, nothing downloaded).

    PYTHONPATH=src python benchmarks/mergekit_extract_compare.py \
[--mergekit /work/venv-mergekit/bin/mergekit-extract-lora]

Prints, per rank: tensor keys equal, tensors bitwise equal, max |B·A − B'·A'|, worst ‖ΔW − BA‖/‖ΔW‖,
and whether the two adapter_config.json agree (paths aside).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from warmstart import testing
from warmstart.merge.extract import extract_lora


def _cfg(p: Path) -> dict:
    c = json.loads((p / "adapter_config.json").read_text())
    c.pop("base_model_name_or_path")
    return {k: sorted(v) if isinstance(v, list) else v for k, v in c.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mergekit", default="/work/venv-mergekit/bin/mergekit-extract-lora")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        for tied, rank in [(False, 4), (False, 16), (False, 64), (True, 8), (True, 64)]:
            m = d / f"tied{int(tied)}"
            if not (m / "base").exists():
                base = testing.make_base(m / "base", tie_word_embeddings=tied)
                testing.make_variant(base, m / "ft", seed=1)
            mk, ws = m / f"mk{rank}", m / f"ws{rank}"
            subprocess.run([args.mergekit, "--model", str(m / "ft"), "--base-model", str(m / "base"), "--out-path",
                            str(mk), "--max-rank", str(rank)], check=True, capture_output=True,
                           env={**os.environ, "PYTHONPATH": ""})
            res = extract_lora(m / "ft", m / "base", ws, rank=rank)
            a, b = load_file(ws / "adapter_model.safetensors"), load_file(mk / "adapter_model.safetensors")
            same = all(torch.equal(a[k], b[k]) for k in a) if set(a) == set(b) else False
            ba = max((float((a[k.replace("lora_A", "lora_B")] @ a[k] - b[k.replace("lora_A", "lora_B")] @ b[k])
                            .abs().max()) for k in a if "lora_A" in k), default=0.0)
            worst = max(m["rel_error"] for m in res.modules.values())
            extra = {k: v for k, v in _cfg(ws).items() if _cfg(mk).get(k) != v}
            print(f"{'tied' if tied else 'untied'} rank {rank:3d}: keys equal {set(a) == set(b)} ({len(a)}), "
                  f"bitwise {same}, "
                  f"max|ΔBA| {ba:.3g}, worst rel. error {worst:.3g}, config differs only in {extra or 'nothing'}")


if __name__ == "__main__":
    main()
