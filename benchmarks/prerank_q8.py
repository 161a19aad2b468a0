"""How far int8 storage of the pre-rank summaries moves the pre-scores (issue #14, docs/performance.md).

    python benchmarks/prerank_q8.py            # after select_scale.py --stage build; ~2 min, one thread

For every adapter of select_scale's 1,000-adapter catalog: its summary unrounded (float32), as stored
before (float16) and as stored now (int8, a float32 scale per column); the pre-scores of all three
against one base gradient on 16 rows of the target; prints the catalog's bytes and, against float32,
Spearman's ρ, the largest difference as a fraction of the pre-scores' range, and the overlap of the
best 8 and 16 (the shortlist is 8).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/warmstart-select-scale")
    ap.add_argument("--size", type=int, default=1000)
    ap.add_argument("--target", default="country_es")
    args = ap.parse_args()

    import torch
    from safetensors.torch import save
    from scipy.stats import spearmanr

    from warmstart import _halving, _prerank
    from warmstart._gradproxy import base_gradient
    from warmstart._precision import compute
    from warmstart.bench.model import default_model_dir
    from warmstart.library import Library
    from warmstart.select import SelectConfig, candidates_for, load_base, sample_target

    torch.set_num_threads(1)
    work, base = Path(args.work), default_model_dir()
    model, tok = load_base(base)
    data = sample_target(work / "data" / args.target / "train.jsonl", SelectConfig(n=64))
    with Library(work / f"lib{args.size}.db") as lib:
        cands = [c for c in candidates_for(base, lib) if c.kind == "lora"]
    exact = [_prerank.summarise(c.path, quantise=False) for c in cands]
    forms = {"float16": [], "int8": []}
    for blob in exact:
        layout, su, v = _prerank.load_flat(blob)
        meta = {"method": "svd1", "layout": json.dumps(layout)}
        forms["float16"].append(save({"su": su.half(), "v": v.half()}, metadata=meta))
        sus, vs, p, q = [], [], 0, 0
        for _, n_out, n_in, k in layout:
            sus.append(su[p:p + n_out * k])
            vs.append(v[q:q + n_in * k])
            p, q = p + n_out * k, q + n_in * k
        ks = [row[3] for row in layout]
        (a, sa), (b, sb) = _prerank._quantise(sus, ks), _prerank._quantise(vs, ks)
        forms["int8"].append(save({"su": a, "su_scale": sa, "v": b, "v_scale": sb}, metadata=meta))
    with compute(model, "bfloat16"):
        _, g = base_gradient(model, tok, _halving.nested_subset(data, 16, 0), params=_prerank.modules_of(exact[0]),
                             batch_size=16, max_length=512)
    ref = _prerank.prescore_many(g, exact)
    span = max(ref) - min(ref)

    def top(xs, k):
        return set(sorted(range(len(xs)), key=xs.__getitem__)[:k])

    print(f"{len(cands)} adapters; float32 summaries {sum(map(len, exact)) / 1e6:.1f} MB")
    print("| stored as | MB | Spearman ρ vs float32 | max |Δ| / range | best 8 same | best 16 same |")
    print("|---|---|---|---|---|---|")
    for name, blobs in forms.items():
        got = _prerank.prescore_many(g, blobs)
        rho = spearmanr(ref, got).correlation
        worst = max(abs(x - y) for x, y in zip(ref, got)) / span
        print(f"| {name} | {sum(map(len, blobs)) / 1e6:.1f} | {rho:.7f} | {worst:.2e} | "
              f"{len(top(ref, 8) & top(got, 8))}/8 | {len(top(ref, 16) & top(got, 16))}/16 |")


if __name__ == "__main__":
    main()
